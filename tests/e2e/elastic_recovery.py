"""Elastic recovery times (docs/CLUSTER.md): kill -9 of 1, then 2 of the 4 workers of PP1xEP4 under
coordinator --elastic-ep, no replacement. Not a ctest; run it by hand:
  EXPERTMESH=build/launch/expertmesh python3 tests/e2e/elastic_recovery.py CKPT TMPDIR HEARTBEAT_TIMEOUT_S
"""
import json, os, signal, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "tests/e2e"))
import cluster_util as cu

ckpt, tmp, hb = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(tmp, exist_ok=True)
prompts = f"{tmp}/p.jsonl"
cu.make_prompts(prompts, 16, 1024, seed=1)
port = cu.free_port()
server = f"127.0.0.1:{port}"
procs = []
try:
    procs.append(cu.start(["coordinator", "--checkpoint", ckpt, "--pp", "1", "--ep", "4", "--listen", server,
                           "--heartbeat-timeout-s", hb, "--elastic-ep"], f"{tmp}/coord.log"))
    for i in range(4):
        procs.append(cu.start(["worker", "--coordinator", server], f"{tmp}/w{i}.log"))
    workers = {p.pid: p for p in procs[1:]}
    t = time.time()
    cu.wait_serving(server, 900)
    print(f"serving after {time.time() - t:.1f} s", flush=True)
    cu.run(["submit", "--server", server, "--prompts", prompts, "--max-new-tokens", "3000", "--detach"])
    gen = 1
    for n, victim_id in enumerate([1, 3]):
        cu.wait_status(server, lambda st: st.get("serving") and int(st.get("generation", 0)) == gen and
                       st["running_sequences"] > 0, "running", 300)
        time.sleep(1.0)
        st = json.loads(cu.run(["status", "--server", server, "--json"]).stdout)
        pid = [w for w in st["workers"] if w["worker_id"] == victim_id][0]["pid"]
        steps0 = 0
        os.killpg(pid, signal.SIGKILL)
        workers.pop(pid).wait(timeout=20)
        t_kill = time.time()
        st = cu.wait_status(server, lambda st: int(st.get("workers_lost", 0)) == n + 1, "detected", 120, 0.02)
        t_det = time.time()
        g = int(st["generation"])
        st = cu.wait_status(server, lambda st: st.get("serving") and int(st.get("generation", 0)) >= g, "serving", 600, 0.02)
        t_srv = time.time()
        steps0 = sum(int(w.get("steps", 0)) for w in st["workers"])
        cu.wait_status(server, lambda st: st.get("serving") and st["running_sequences"] > 0 and
                       sum(int(w.get("steps", 0)) for w in st["workers"]) > steps0, "generating", 600, 0.02)
        t_gen = time.time()
        print(f"{n + 1} of 4 lost, no replacement: MISSING {t_det - t_kill:.2f} s after the kill, SERVING "
              f"{t_srv - t_det:.2f} s and generating again {t_gen - t_det:.2f} s after that "
              f"({t_gen - t_kill:.2f} s after the kill)", flush=True)
        gen = int(st["generation"])
finally:
    for p in procs:
        cu.kill(p)
    print("logs in", tmp)
