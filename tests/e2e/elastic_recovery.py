"""Elastic recovery times (docs/CLUSTER.md): kill -9 of one, then a second worker under coordinator
--elastic-ep, no replacement, a long job running. Not a ctest; run it by hand:
  EXPERTMESH=build/launch/expertmesh python3 tests/e2e/elastic_recovery.py CKPT TMPDIR HEARTBEAT_TIMEOUT_S \
      [--pp 1 --ep 4] [--redundant-experts R] [--victims 1,3]
Per loss it prints: MISSING after the kill (detection), SERVING after detection (the coordinator's view),
"rebuilt" (the slowest survivor's "data plane rebuilt ... in X", which includes loading the experts it gains),
generating again (the survivors' step counters move) and the experts the re-placement made ranks load.
"""
import argparse, json, os, re, signal, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__))))
import cluster_util as cu

ap = argparse.ArgumentParser()
ap.add_argument("ckpt")
ap.add_argument("tmp")
ap.add_argument("heartbeat_timeout_s")
ap.add_argument("--pp", type=int, default=1)
ap.add_argument("--ep", type=int, default=4)
ap.add_argument("--redundant-experts", type=int, default=0)
ap.add_argument("--victims", default="1,3")
ap.add_argument("--max-new-tokens", type=int, default=3000)
ap.add_argument("--during-recovery", type=float, default=-1,
                help="kill the second victim this many seconds after the first loss is detected (while the "
                     "survivors re-place and rebuild) and time the recovery from both losses")
a = ap.parse_args()
victims = [int(v) for v in a.victims.split(",")]
n_workers = a.pp * a.ep
os.makedirs(a.tmp, exist_ok=True)
prompts = f"{a.tmp}/p.jsonl"
cu.make_prompts(prompts, 16, 1024, seed=1)
port = cu.free_port()
server = f"127.0.0.1:{port}"
procs = []


def rebuilt_seconds(log_path, generation):
    """The worker's "data plane rebuilt for generation G in X" (X in s), or None."""
    with open(log_path) as f:
        m = re.findall(rf"data plane rebuilt for generation {generation} in ([0-9.]+)(ms|s)", f.read())
    if not m:
        return None
    v, unit = m[-1]
    return float(v) / (1000 if unit == "ms" else 1)


try:
    procs.append(cu.start(["coordinator", "--checkpoint", a.ckpt, "--pp", str(a.pp), "--ep", str(a.ep), "--listen",
                           server, "--heartbeat-timeout-s", a.heartbeat_timeout_s, "--elastic-ep",
                           "--redundant-experts", str(a.redundant_experts)], f"{a.tmp}/coord.log"))
    for i in range(n_workers):
        procs.append(cu.start(["worker", "--coordinator", server], f"{a.tmp}/w{i}.log"))
        time.sleep(0.2)
    t = time.time()
    cu.wait_serving(server, 900)
    print(f"PP{a.pp}xEP{a.ep}, redundant experts {a.redundant_experts}: serving after {time.time() - t:.1f} s",
          flush=True)
    st = json.loads(cu.run(["status", "--server", server, "--json"]).stdout)
    logs = {w["worker_id"]: p.log_path for w in st["workers"] for p in procs[1:] if p.pid == w["pid"]}
    pids = {w["worker_id"]: w["pid"] for w in st["workers"]}
    workers = {p.pid: p for p in procs[1:]}
    cu.run(["submit", "--server", server, "--prompts", prompts, "--max-new-tokens", str(a.max_new_tokens),
            "--detach"])
    gen = 1
    for n, victim_id in enumerate(victims):
        cu.wait_status(server, lambda st: st.get("serving") and int(st.get("generation", 0)) == gen and
                       st["running_sequences"] > 0, "running", 300)
        time.sleep(1.0)
        loaded0 = int(json.loads(cu.run(["status", "--server", server, "--json"]).stdout)
                      .get("vacancy_experts_to_load", 0))
        pid = pids[victim_id]
        os.killpg(pid, signal.SIGKILL)
        workers.pop(pid).wait(timeout=20)
        t_kill = time.time()
        st = cu.wait_status(server, lambda st: int(st.get("workers_lost", 0)) == n + 1, "detected", 120, 0.02)
        t_det = time.time()
        if a.during_recovery >= 0 and n == 0 and len(victims) > 1:
            time.sleep(a.during_recovery)
            st2 = json.loads(cu.run(["status", "--server", server, "--json"]).stdout)
            print(f"second kill during recovery ({time.time() - t_det:.2f} s after detection; serving: "
                  f"{st2.get('serving')})", flush=True)
            pid2 = pids[victims[1]]
            os.killpg(pid2, signal.SIGKILL)
            workers.pop(pid2).wait(timeout=20)
            st = cu.wait_status(server, lambda st: int(st.get("workers_lost", 0)) == 2, "detected", 120, 0.02)
            print(f"second loss detected {time.time() - t_det:.2f} s after the first", flush=True)
            t_det = time.time()
            n = 1
        g = int(st["generation"])
        st = cu.wait_status(server, lambda st: st.get("serving") and int(st.get("generation", 0)) >= g, "serving",
                            600, 0.02)
        t_srv = time.time()
        steps0 = sum(int(w.get("steps", 0)) for w in st["workers"])
        st = cu.wait_status(server, lambda st: st.get("serving") and st["running_sequences"] > 0 and
                            sum(int(w.get("steps", 0)) for w in st["workers"]) > steps0, "generating", 600, 0.02)
        t_gen = time.time()
        gen = int(st["generation"])
        alive = [i for i in range(n_workers) if i not in victims[:n + 1]]
        rebuilt = [rebuilt_seconds(logs[i], gen) for i in alive]
        rebuilt = max((r for r in rebuilt if r is not None), default=float("nan"))
        loaded = int(st.get("vacancy_experts_to_load", 0)) - loaded0
        print(f"PP{a.pp}xEP{a.ep} R={a.redundant_experts}: {n + 1} of {n_workers} lost (worker {victim_id}), "
              f"no replacement: MISSING {t_det - t_kill:.2f} s after the kill, SERVING {t_srv - t_det:.2f} s, "
              f"rebuilt (slowest survivor) {rebuilt:.2f} s, generating again {t_gen - t_det:.2f} s after detection "
              f"({t_gen - t_kill:.2f} s after the kill); experts loaded for the re-placement: {loaded}", flush=True)
        if n + 1 >= len(victims):
            break
finally:
    for p in procs:
        cu.kill(p)
    print("logs in", a.tmp)
