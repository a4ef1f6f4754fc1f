"""End-to-end tests of the cluster runtime on the tiny preset.

Under mpirun (`expertmesh launch`: rank 0 coordinator, MPI data plane) and
standalone (`expertmesh coordinator` + workers, UCX data plane), a batch of
16 prompts of different lengths submitted over gRPC must return exactly the
tokens `expertmesh generate` returns in one process: greedy, and seeded
sampling. Also: cancel, gRPC health, a coordinator killed with SIGKILL
mid-job and restarted on its journal, workers killed with SIGKILL mid-job
and replaced by new `expertmesh worker` processes, SIGTERM, Prometheus
metrics, and a cluster spread over three network namespaces (UCX over TCP).

Run: EXPERTMESH=build/launch/expertmesh /usr/bin/python3 tests/e2e/test_cluster.py [Class.test]
(the temporary folder with checkpoint, logs and journals is removed at exit; EM_KEEP_TMP=1 keeps it)
"""
import atexit
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_util as cu  # noqa: E402

VOCAB = 1024
NEW = 6
SAMPLING = ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "5"]


class Fixture:
    """One tiny fp32 checkpoint, 16 prompts and their single-process results."""
    dir = None

    @classmethod
    def get(cls):
        if cls.dir is None:
            cls.dir = tempfile.mkdtemp(prefix="em-e2e-")
            if not os.environ.get("EM_KEEP_TMP"):  # checkpoint, logs and journals of every case
                atexit.register(shutil.rmtree, cls.dir, True)
            cls.ckpt = os.path.join(cls.dir, "ckpt")
            cu.run(["checkpoint", "--preset", "tiny", "--dtype", "fp32", "--seed", "3", "--out", cls.ckpt])
            cls.prompts = os.path.join(cls.dir, "prompts.jsonl")
            cu.make_prompts(cls.prompts, 16, VOCAB, seed=1)
            base = ["generate", "--checkpoint", cls.ckpt, "--prompts", cls.prompts, "--max-new-tokens", str(NEW)]
            cls.greedy = cu.results(cu.run(base).stdout)
            cls.sampled = cu.results(cu.run(base + SAMPLING).stdout)
            assert cls.greedy != cls.sampled
        return cls


class ClusterCase(unittest.TestCase):
    procs = []

    def setUp(self):
        self.f = Fixture.get()
        self.tmp = tempfile.mkdtemp(prefix="em-case-", dir=self.f.dir)
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            cu.kill(p)

    def submit(self, server, extra=(), new=NEW, prompts=None):
        return cu.results(cu.run(["submit", "--server", server, "--prompts", prompts or self.f.prompts,
                                  "--max-new-tokens", str(new), *extra], timeout=240).stdout)

    def reference(self, new):
        """`expertmesh generate`'s greedy tokens for the fixture's prompts, `new` new tokens each."""
        return cu.results(cu.run(["generate", "--checkpoint", self.f.ckpt, "--prompts", self.f.prompts,
                                  "--max-new-tokens", str(new)]).stdout)

    def submit_detached(self, server, new, request_id):
        """Submits the fixture's prompts without waiting and returns the job id; `submit --request-id`
        later waits for the results."""
        out = cu.run(["submit", "--server", server, "--prompts", self.f.prompts, "--max-new-tokens", str(new),
                      "--request-id", request_id, "--detach"])
        return json.loads(out.stdout)["job_id"]

    def check_batch(self, server):
        self.assertEqual(self.submit(server), self.f.greedy)
        self.assertEqual(self.submit(server, SAMPLING), self.f.sampled)

    def shutdown(self, server, procs):
        cu.run(["shutdown", "--server", server], timeout=90)
        for p in procs:
            try:
                rc = p.wait(timeout=60)
            except Exception:
                self.fail("process did not exit after shutdown:\n" + cu.read_log(p))
            self.assertEqual(rc, 0, cu.read_log(p))


class MpirunTest(ClusterCase):
    def launch(self, pp, ep, extra=()):
        addr_file = os.path.join(self.tmp, "addr")
        p = cu.start(["launch", "--checkpoint", self.f.ckpt, "--pp", str(pp), "--ep", str(ep), "--listen",
                      "127.0.0.1:0", "--address-file", addr_file, *extra],
                     os.path.join(self.tmp, "launch.log"), mpirun_np=1 + pp * ep)
        self.procs.append(p)
        server = cu.wait_for_file(addr_file, 120, [p])
        st = cu.wait_serving(server)
        self.assertEqual((st["plan"]["pp"], st["plan"]["ep"]), (pp, ep))
        return p, server, st

    def run_plan(self, pp, ep, extra=()):
        p, server, st = self.launch(pp, ep, extra)
        self.check_batch(server)
        self.shutdown(server, [p])
        return st

    def test_pp2_ep2(self):
        self.run_plan(2, 2)

    def test_pp1_ep4(self):
        self.run_plan(1, 4)

    def test_pp4_ep1(self):
        self.run_plan(4, 1)

    def test_automatic_rebalance_over_mpi(self):
        # Every second, whatever the gain: the placement changes under a running job.
        p, server, _ = self.launch(2, 2, ["--redundant-experts", "4", "--eplb-interval-s", "1", "--eplb-min-tokens",
                                          "1", "--eplb-min-gain", "0"])
        long_new = 600
        want = self.reference(long_new)
        self.assertEqual(self.submit(server, new=long_new), want)
        st = cu.wait_status(server, lambda st: int(st["plan"].get("placement_version", 0)) >= 2,
                            "an automatic rebalance", 30, 0.2)
        self.assertGreaterEqual(int(st["rebalance"]["rebalances"]), 1)
        self.check_batch(server)
        self.shutdown(server, [p])
        self.assertRegex(cu.read_log(p), r"switched to placement version \d+")

    def test_uneven_stages_with_redundant_experts(self):
        st = self.run_plan(2, 2, ["--layers-per-stage", "1,3", "--redundant-experts", "16"])
        stages = st["plan"]["stages"]
        self.assertEqual([(s["layer_begin"], s["layer_end"]) for s in stages], [(0, 1), (1, 4)])


class StandaloneTest(ClusterCase):
    coordinator_flags = ()  # more `expertmesh coordinator` flags, for every start of the case's coordinator
    pp, ep = 2, 2           # the plan of the case's cluster

    def start_coordinator(self, port, journal, log, heartbeat_timeout_s=30):
        self.metrics_port = cu.free_port()
        p = cu.start(["coordinator", "--checkpoint", self.f.ckpt, "--pp", str(self.pp), "--ep", str(self.ep), "--listen",
                      f"127.0.0.1:{port}", "--journal", journal, "--heartbeat-timeout-s", str(heartbeat_timeout_s),
                      "--metrics-listen", f"127.0.0.1:{self.metrics_port}", *self.coordinator_flags],
                     os.path.join(self.tmp, log))
        self.procs.append(p)
        return p

    def start_cluster(self, heartbeat_timeout_s=30, worker_flags=()):
        port = cu.free_port()
        server = f"127.0.0.1:{port}"
        journal = os.path.join(self.tmp, "journal")
        coord = self.start_coordinator(port, journal, "coordinator.log", heartbeat_timeout_s)
        workers = [cu.start(["worker", "--coordinator", server, *worker_flags],
                            os.path.join(self.tmp, f"worker{i}.log"))
                   for i in range(self.pp * self.ep)]
        self.procs += workers
        cu.wait_serving(server)
        return server, port, journal, coord, workers

    def test_batch_health_and_shutdown(self):
        server, _, _, coord, workers = self.start_cluster()
        self.assertEqual(cu.health(server), "SERVING")
        self.assertEqual(cu.health(server, "expertmesh.v1.JobService"), "SERVING")
        self.check_batch(server)
        time.sleep(1.5)  # one heartbeat: expert load reaches the coordinator
        st = json.loads(cu.run(["status", "--server", server, "--json"]).stdout)
        routed = sum(sum(int(c) for c in l["tokens_per_expert"]) for l in st["expert_load"])  # int64 as JSON strings
        self.assertGreater(routed, 0)
        # Prometheus metrics say the same.
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            metrics = {}
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    metrics[name] = float(value)
        self.assertEqual(metrics["expertmesh_serving"], 1)
        self.assertEqual(metrics['expertmesh_workers{health="ready"}'], 4)
        self.assertEqual(metrics['expertmesh_jobs{state="succeeded"}'], 2)
        self.assertEqual(sum(v for k, v in metrics.items() if k.startswith("expertmesh_expert_routed_tokens_total")),
                         routed)
        self.assertGreater(sum(v for k, v in metrics.items() if k.startswith("expertmesh_worker_tokens_total")), 0)
        self.shutdown(server, [coord] + workers)

    def test_cancel_stops_the_work(self):
        server, _, _, coord, workers = self.start_cluster()
        job = json.loads(cu.run(["submit", "--server", server, "--prompts", self.f.prompts, "--max-new-tokens",
                                 "3000", "--detach"]).stdout)["job_id"]
        time.sleep(1.0)
        cu.run(["cancel", "--server", server, "--job", job])
        cu.wait_status(server, lambda st: st["running_sequences"] == 0 and st["queued_sequences"] == 0 and
                       all(w["active_sequences"] == 0 for w in st["workers"]), "work stopped after cancel", 30, 0.3)
        jobs = json.loads(cu.run(["jobs", "--server", server, "--json"]).stdout)
        state = [j for j in jobs["jobs"] if j["job_id"] == job][0]["state"]
        self.assertEqual(state, "JOB_STATE_CANCELLED")
        # The cluster still serves after a cancel.
        self.assertEqual(self.submit(server), self.f.greedy)
        self.shutdown(server, [coord] + workers)

    def test_cancel_of_a_huge_job_frees_the_cluster_within_a_step(self):
        # Issue 15: a job of long prompts fills every stage-0 worker (64 sequences each); cancelled, it
        # must stop within a step (chunked prefill: at most --max-step-tokens per step), so the next
        # 1-token job is answered in seconds, not after the prompts' whole prefill.
        server, _, _, coord, workers = self.start_cluster()
        huge = os.path.join(self.tmp, "huge.jsonl")
        rng = random.Random(7)
        with open(huge, "w") as f:
            for _ in range(256):
                f.write(json.dumps({"tokens": [rng.randrange(VOCAB) for _ in range(4000)]}) + "\n")
        job = json.loads(cu.run(["submit", "--server", server, "--prompts", huge, "--max-new-tokens", "8",
                                 "--detach"]).stdout)["job_id"]
        cu.wait_status(server, lambda st: st["running_sequences"] > 0, "the huge job running", 30, 0.1)
        time.sleep(1.0)  # the workers are prefilling
        t0 = time.time()
        cu.run(["cancel", "--server", server, "--job", job])
        one = os.path.join(self.tmp, "one.jsonl")
        with open(one, "w") as f:
            f.write(json.dumps({"tokens": [5, 6, 7]}) + "\n")
        got = self.submit(server, prompts=one, new=1)
        elapsed = time.time() - t0
        want = cu.results(cu.run(["generate", "--checkpoint", self.f.ckpt, "--prompts", one,
                                  "--max-new-tokens", "1"]).stdout)
        self.assertEqual(got, want)
        print(f"cancel of 256 x 4000-token prompts -> next 1-token job answered in {elapsed:.2f} s", file=sys.stderr)
        self.assertLess(elapsed, 15, "the cancelled job kept the cluster busy")
        self.shutdown(server, [coord] + workers)

    def test_coordinator_sigkill_and_restart_finishes_the_job(self):
        server, port, journal, coord, workers = self.start_cluster()
        rid = "e2e-restart-1"
        long_new = 48
        want = self.reference(long_new)
        job = self.submit_detached(server, long_new, rid)
        time.sleep(0.5)  # mid-job
        cu.kill(coord, signal.SIGKILL)
        coord2 = self.start_coordinator(port, journal, "coordinator2.log")
        cu.wait_serving(server, timeout=120)
        # The same request id finds the journaled job; the client waits for its results.
        got = self.submit(server, ["--request-id", rid], new=long_new)
        self.assertEqual(got, want)
        jobs = json.loads(cu.run(["jobs", "--server", server, "--json"]).stdout)
        self.assertIn(job, [j["job_id"] for j in jobs["jobs"]])
        self.shutdown(server, [coord2] + workers)


    def test_lost_workers_are_replaced_and_the_job_finishes(self):
        # 5 s without a heartbeat makes a worker MISSING (loaded 2-core CI machines stall for a second or two).
        server, _, _, coord, workers = self.start_cluster(heartbeat_timeout_s=5)
        long_new = 600  # several seconds of work for the cluster, resumed after its tokens after each loss
        want = self.reference(long_new)
        rid = "e2e-lost-worker-1"
        self.submit_detached(server, long_new, rid)
        by_pid = {p.pid: p for p in workers}
        replacements = []
        # A stage-1 worker first, then a stage-0 worker (it holds sequences), each replaced while the job runs.
        for n, victim_id in enumerate([3, 0]):
            st = self.wait_generating(server, 1 + n)
            pid = [w for w in st["workers"] if w["worker_id"] == victim_id][0]["pid"]
            victim = by_pid.pop(pid)
            cu.kill(victim, signal.SIGKILL)
            t_kill = time.time()
            # The replacement starts at once: it waits until the coordinator finds the victim MISSING.
            r = cu.start(["worker", "--coordinator", server], os.path.join(self.tmp, f"replacement{n}.log"))
            self.procs.append(r)
            replacements.append(r)
            by_pid[r.pid] = r
            st = cu.wait_status(server, lambda st: int(st.get("generation", 0)) == 2 + n, "the loss noticed", 60, 0.05)
            t_detect = time.time()
            st = self.wait_generation(server, 2 + n)
            print(f"worker {victim_id} killed: noticed after {t_detect - t_kill:.2f} s (heartbeat timeout 5 s), "
                  f"serving again {time.time() - t_detect:.2f} s later (replacement started at the kill)",
                  file=sys.stderr)
            self.assertEqual(int(st.get("workers_lost", 0)), 1 + n)
            self.assertEqual([w for w in st["workers"] if w["worker_id"] == victim_id][0]["pid"], r.pid)
        # The same request id waits for the job; its tokens are those of a single process.
        got = self.submit(server, ["--request-id", rid], new=long_new)
        self.assertEqual(got, want)
        # And the healed cluster serves new work.
        self.assertEqual(self.submit(server), self.f.greedy)
        survivors = [p for p in workers if p.pid in by_pid]
        self.shutdown(server, [coord] + list(by_pid.values()))
        for p in survivors:  # they kept their shard and rebuilt only the data plane, twice
            with open(p.log_path) as f:
                log = f.read()
            self.assertIn("data plane rebuilt for generation 2", log)
            self.assertIn("data plane rebuilt for generation 3", log)

    def test_pp1_ep4_two_workers_killed_at_once_resume_on_replacements(self):
        # Issue 15: kill -9 two of the four EP ranks of one stage mid-job; their sequences (and everyone's,
        # the data plane is rebuilt) resume after the tokens generated before; the job returns exactly the
        # single-process tokens.
        self.pp, self.ep = 1, 4
        server, _, _, coord, workers = self.start_cluster(heartbeat_timeout_s=5)
        long_new = 600
        want = self.reference(long_new)
        rid = "e2e-two-lost-1"
        self.submit_detached(server, long_new, rid)
        st = self.wait_generating(server, 1)
        pids = {w["pid"] for w in st["workers"] if w["worker_id"] in (1, 2)}
        victims = [p for p in workers if p.pid in pids]
        self.assertEqual(len(victims), 2)
        for v in victims:
            os.killpg(v.pid, signal.SIGKILL)
        t_kill = time.time()
        repl = [cu.start(["worker", "--coordinator", server], os.path.join(self.tmp, f"replacement{i}.log"))
                for i in range(2)]
        self.procs += repl
        st = cu.wait_status(server, lambda st: int(st.get("generation", 0)) >= 2, "the losses noticed", 60, 0.05)
        t_detect = time.time()
        cu.wait_status(server, lambda st: st.get("serving") and int(st.get("workers_lost", 0)) == 2, "serving again",
                       120, 0.05)
        print(f"PP1xEP4, 2 workers killed: noticed after {t_detect - t_kill:.2f} s, serving again "
              f"{time.time() - t_detect:.2f} s later", file=sys.stderr)
        got = self.submit(server, ["--request-id", rid], new=long_new)
        self.assertEqual(got, want)
        for v in victims:
            v.wait(timeout=20)
        self.shutdown(server, [coord] + [p for p in workers if p not in victims] + repl)

    def test_sigstopped_worker_turns_not_serving_and_is_readmitted(self):
        # Issue 15: a wedged (SIGSTOPped) worker. Its peers' exchanges stall past --step-timeout-s (4 s) and
        # they report it: NOT_SERVING well before the heartbeat timeout (10 s). Stopped past the heartbeat
        # timeout too, it is MISSING; after SIGCONT it rejoins (no replacement), and the job finishes with the
        # single-process tokens, its sequences resumed after the tokens generated before.
        server, _, _, coord, workers = self.start_cluster(heartbeat_timeout_s=10,
                                                          worker_flags=("--step-timeout-s", "4"))
        long_new = 600
        want = self.reference(long_new)
        rid = "e2e-sigstop-1"
        self.submit_detached(server, long_new, rid)
        st = self.wait_generating(server, 1)
        pid = [w for w in st["workers"] if w["worker_id"] == 1][0]["pid"]  # stage 0, EP rank 1
        victim = [p for p in workers if p.pid == pid][0]
        os.killpg(victim.pid, signal.SIGSTOP)
        t0 = time.time()
        try:
            while time.time() - t0 < 30 and cu.health(server) == "SERVING":
                time.sleep(0.1)
            detected = time.time() - t0
            self.assertLess(detected, 9, "NOT_SERVING only after the heartbeat timeout")
            time.sleep(max(0.0, 13 - (time.time() - t0)))  # past the heartbeat timeout: MISSING
            st = json.loads(cu.run(["status", "--server", server, "--json"]).stdout)
            self.assertEqual([w for w in st["workers"] if w["worker_id"] == 1][0]["health"], "WORKER_HEALTH_MISSING")
        finally:
            os.killpg(victim.pid, signal.SIGCONT)
        t1 = time.time()
        cu.wait_serving(server, timeout=60)
        back = time.time() - t1
        print(f"SIGSTOP: NOT_SERVING after {detected:.2f} s; SIGCONT -> serving again in {back:.2f} s",
              file=sys.stderr)
        got = self.submit(server, ["--request-id", rid], new=long_new)
        self.assertEqual(got, want)
        self.assertIn("is READY again", cu.read_log(coord))
        self.shutdown(server, [coord] + workers)

    def test_sigterm_worker_leaves_and_sigterm_coordinator_keeps_the_job(self):
        # A long heartbeat timeout: the leaving worker must be noticed through its goodbye, not a timeout.
        server, port, journal, coord, workers = self.start_cluster(heartbeat_timeout_s=60)
        long_new = 600
        want = self.reference(long_new)
        rid = "e2e-sigterm-1"
        self.submit_detached(server, long_new, rid)
        st = self.wait_generating(server, 1)
        pid = [w for w in st["workers"] if w["worker_id"] == 2][0]["pid"]
        leaving = [p for p in workers if p.pid == pid][0]
        t0 = time.time()
        leaving.send_signal(signal.SIGTERM)
        self.assertEqual(leaving.wait(timeout=30), 0, cu.read_log(leaving))
        self.assertIn("left the cluster on request", cu.read_log(leaving))
        st = cu.wait_status(server, lambda st: int(st.get("generation", 0)) == 2, "generation 2", 20, 0.1)
        self.assertEqual(int(st.get("generation", 0)), 2, st)
        self.assertLess(time.time() - t0, 20)
        self.assertEqual([w for w in st["workers"] if w["worker_id"] == 2][0]["health"], "WORKER_HEALTH_EXITED")
        repl = cu.start(["worker", "--coordinator", server], os.path.join(self.tmp, "replacement.log"))
        self.procs.append(repl)
        self.wait_generating(server, 2)
        # SIGTERM the coordinator: it stops at once with exit code 0, the job stays in the journal.
        coord.send_signal(signal.SIGTERM)
        self.assertEqual(coord.wait(timeout=30), 0, cu.read_log(coord))
        self.assertIn("their jobs are in the journal", cu.read_log(coord))
        coord2 = self.start_coordinator(port, journal, "coordinator2.log", 60)
        cu.wait_serving(server, timeout=120)
        got = self.submit(server, ["--request-id", rid], new=long_new)
        self.assertEqual(got, want)
        self.shutdown(server, [coord2, repl] + [p for p in workers if p is not leaving])

    def test_rebalance_mid_job_keeps_the_results_and_survives_a_restart(self):
        self.coordinator_flags = ("--redundant-experts", "4")
        server, port, journal, coord, workers = self.start_cluster()
        self.assertEqual(self.submit(server), self.f.greedy)  # some expert load to balance
        st = cu.wait_status(server, lambda st: int(st["rebalance"].get("window_tokens", 0)) > 0,
                            "expert load reported", 30, 0.2)
        before = st["plan"]
        self.assertEqual(int(before.get("placement_version", 0)), 1)
        long_new = 1500
        want = self.reference(long_new)
        rid = "e2e-rebalance-1"
        self.submit_detached(server, long_new, rid)
        self.wait_generating(server, 1)
        # --force: the short warm-up is below --eplb-min-tokens.
        out = json.loads(cu.run(["rebalance", "--server", server, "--force", "--wait-s", "60"]).stdout)
        self.assertEqual(out["outcome"], "committed", out)
        self.assertEqual(out["placement_version"], 2)
        self.assertLess(out["imbalance_after"], out["imbalance_before"])
        mid = json.loads(cu.run(["status", "--server", server, "--json"]).stdout)
        # The job is still running across the switch (1000 tokens take the tiny cluster several seconds).
        self.assertGreater(mid["running_sequences"] + mid["queued_sequences"], 0, "job ended before the switch")
        got = self.submit(server, ["--request-id", rid], new=long_new)
        self.assertEqual(got, want)
        st = json.loads(cu.run(["status", "--server", server, "--json"]).stdout)
        self.assertEqual(int(st["plan"]["placement_version"]), 2)
        self.assertEqual(int(st["rebalance"]["rebalances"]), 1)
        self.assertNotEqual(st["plan"]["stages"], before["stages"])
        for p in workers:  # every worker loaded its new experts and switched
            log = cu.read_log(p)
            self.assertIn("placement version 2 staged", log)
            self.assertIn("switched to placement version 2", log)
        # A restarted coordinator serves the committed placement from its journal; the workers keep theirs.
        committed = st["plan"]["stages"]
        cu.kill(coord, signal.SIGKILL)
        coord2 = self.start_coordinator(port, journal, "coordinator2.log")
        st = cu.wait_serving(server, timeout=120)
        self.assertEqual(int(st["plan"]["placement_version"]), 2)
        self.assertEqual(st["plan"]["stages"], committed)
        self.assertEqual(self.submit(server), self.f.greedy)
        self.shutdown(server, [coord2] + workers)

    def wait_generation(self, server, generation, timeout=120):
        """Waits until the cluster serves again in data-plane generation `generation`."""
        return cu.wait_status(server, lambda st: st.get("serving") and int(st.get("generation", 0)) == generation,
                              f"serving in generation {generation}", timeout)

    def kill_one_by_one(self, server, by_id, victims, label):
        """SIGKILLs the workers `victims` (ids) one after the other with no replacement, each once the job
        generates again after the previous loss; checks each loss makes a new generation, prints the times."""
        for n, victim_id in enumerate(victims):
            if n > 0:
                self.wait_generating(server, 1 + n)
            os.killpg(by_id[victim_id].pid, signal.SIGKILL)
            t_kill = time.time()
            cu.wait_status(server, lambda st: int(st.get("generation", 0)) == 2 + n, "the loss noticed", 60, 0.02)
            t_detect = time.time()
            st = self.wait_generation(server, 2 + n)
            print(f"elastic {label}, {n + 1} of {len(by_id)} lost, no replacement: noticed {t_detect - t_kill:.2f} s "
                  f"after the kill (heartbeat timeout 3 s), serving again {time.time() - t_detect:.2f} s after "
                  f"detection", file=sys.stderr)
            self.assertEqual(int(st.get("workers_lost", 0)), 1 + n)

    def wait_generating(self, server, generation, timeout=60):
        """Waits until the cluster serves in `generation` and runs the job there (then half a second
        more), or has already finished it (a fast machine; the caller's checks hold either way)."""
        st = cu.wait_status(server, lambda st: st.get("serving") and int(st.get("generation", 0)) == generation and
                            (st["running_sequences"] > 0 or st["queued_sequences"] == 0),
                            f"the job running in generation {generation}", timeout)
        if st["running_sequences"] > 0:
            time.sleep(0.5)
        return st


class ElasticTest(StandaloneTest):
    """Elastic expert parallelism (coordinator --elastic-ep, pp = 1): lost workers are not replaced; the
    survivors take their experts and serve; a worker started later takes a vacant place back."""
    coordinator_flags = ("--elastic-ep",)
    pp, ep = 1, 4

    def test_pp1_ep4_serves_on_survivors_and_a_replacement_rejoins(self):
        server, _, _, coord, workers = self.start_cluster(heartbeat_timeout_s=3)
        long_new = 600
        want = self.reference(long_new)
        rid = "e2e-elastic-1"
        self.submit_detached(server, long_new, rid)
        by_id = {}
        st = self.wait_generating(server, 1)
        for w in st["workers"]:
            by_id[w["worker_id"]] = [p for p in workers if p.pid == w["pid"]][0]
        # One worker, then a second: no replacement; the job goes on on the survivors.
        self.kill_one_by_one(server, by_id, [1, 3], "PP1xEP4")
        got = self.submit(server, ["--request-id", rid], new=long_new)
        self.assertEqual(got, want)
        self.assertEqual(self.submit(server), self.f.greedy)  # new work on the two survivors
        # A worker started now takes a vacant place back; the cluster serves all four again.
        r = cu.start(["worker", "--coordinator", server], os.path.join(self.tmp, "replacement.log"))
        self.procs.append(r)
        st = cu.wait_status(server, lambda st: st.get("serving") and int(st.get("generation", 0)) == 4
                            and r.pid in [w["pid"] for w in st["workers"]], "the replacement serving", 120, 0.05)
        self.check_batch(server)
        live = [by_id[0], by_id[2], r]
        self.shutdown(server, [coord] + live)


class ElasticPipelineTest(StandaloneTest):
    """Elastic EP with pipeline stages (--elastic-ep, PP2xEP2): lanes re-pair around vacant places, a live
    worker without a lane holds its experts and joins its stage's all-to-alls with zero tokens."""
    coordinator_flags = ("--elastic-ep",)
    pp, ep = 2, 2

    def test_pp2_ep2_serves_on_survivors_and_a_replacement_rejoins(self):
        server, _, _, coord, workers = self.start_cluster(heartbeat_timeout_s=3)
        long_new = 400
        want = self.reference(long_new)
        rid = "e2e-elastic-pp2-1"
        self.submit_detached(server, long_new, rid)
        st = self.wait_generating(server, 1)
        by_id = {w["worker_id"]: [p for p in workers if p.pid == w["pid"]][0] for w in st["workers"]}
        # Worker 1 (stage 0, rank 1): lane 1 dies, worker 3 (stage 1) serves its experts without a lane.
        # Then worker 2 (stage 1, rank 0): no lane is intact; 0 -> 3 is re-paired into one lane.
        self.kill_one_by_one(server, by_id, [1, 2], "PP2xEP2")
        got = self.submit(server, ["--request-id", rid], new=long_new)
        self.assertEqual(got, want)
        self.assertEqual(self.submit(server), self.f.greedy)  # new work on the re-paired lane
        with open(by_id[3].log_path) as f:
            self.assertIn("no pipeline lane", f.read())  # generation 2: it served stage 1's experts only
        # A worker started now takes vacant place 1 back: lane 1 -> 3 serves, worker 0 (stage 0) has no lane.
        r = cu.start(["worker", "--coordinator", server], os.path.join(self.tmp, "replacement.log"))
        self.procs.append(r)
        st = cu.wait_status(server, lambda st: st.get("serving") and int(st.get("generation", 0)) == 4
                            and r.pid in [w["pid"] for w in st["workers"]], "the replacement serving", 120, 0.05)
        self.check_batch(server)
        self.shutdown(server, [coord, by_id[0], by_id[3], r])


    def test_pp2_ep2_sigstopped_worker_is_served_around_and_readmitted(self):
        """A worker SIGSTOPped for 30 s: its place turns vacant at the heartbeat timeout and the job goes on
        around it; after SIGCONT the same process is readmitted (no replacement) and its lane serves again."""
        server, _, _, coord, workers = self.start_cluster(heartbeat_timeout_s=3, worker_flags=("--step-timeout-s", "3"))
        long_new = 200
        want = self.reference(long_new)
        rid = "e2e-elastic-pp2-stop"
        self.submit_detached(server, long_new, rid)
        st = self.wait_generating(server, 1)
        victim = [p for p in workers if p.pid == [w for w in st["workers"] if w["worker_id"] == 3][0]["pid"]][0]
        os.killpg(victim.pid, signal.SIGSTOP)
        t0 = time.time()
        try:
            st = cu.wait_status(server, lambda st: st.get("serving") and 3 in [int(i) for i in
                                                                              st.get("vacant_worker_ids", [])],
                                "serving around the stopped worker", 25, 0.05)
            print(f"SIGSTOP of worker 3: serving around it {time.time() - t0:.2f} s after the stop", file=sys.stderr)
            time.sleep(max(0.0, 30 - (time.time() - t0)))
        finally:
            os.killpg(victim.pid, signal.SIGCONT)
        t1 = time.time()
        st = cu.wait_status(server, lambda st: st.get("serving") and not st.get("vacant_worker_ids"),
                            "the stopped worker readmitted", 60, 0.05)
        print(f"SIGCONT: readmitted and serving in {time.time() - t1:.2f} s", file=sys.stderr)
        self.assertEqual([w for w in st["workers"] if w["worker_id"] == 3][0]["pid"], victim.pid)
        self.assertEqual(self.submit(server, ["--request-id", rid], new=long_new), want)
        self.check_batch(server)
        self.shutdown(server, [coord] + workers)


# ElasticTest and ElasticPipelineTest reuse StandaloneTest's helpers, not its tests.
for _case in (ElasticTest, ElasticPipelineTest):
    for _name in dir(StandaloneTest):
        if _name.startswith("test_") and _name not in _case.__dict__:
            setattr(_case, _name, None)


class MultiHostTest(ClusterCase):
    """A standalone cluster over a real network: three network namespaces as hosts
    (coordinator on host 1, two workers on each of hosts 2 and 3), UCX over TCP
    between the workers (UCX_TLS=tcp: no shared memory even between the workers of
    one host), gRPC over the hosts' addresses, the client on the root namespace."""

    def test_three_hosts_over_tcp(self):
        why = cu.NetnsHosts.available()
        if why:
            self.skipTest("no network namespaces here: " + why)
        hosts = cu.NetnsHosts(3).up()
        self.addCleanup(hosts.down)
        port = 50051
        server = f"{hosts.address(1)}:{port}"
        coord = cu.start(["coordinator", "--checkpoint", self.f.ckpt, "--pp", "2", "--ep", "2", "--listen",
                          f"0.0.0.0:{port}", "--heartbeat-timeout-s", "30"],
                         os.path.join(self.tmp, "coordinator.log"), wrap=hosts.wrap(1))
        self.procs.append(coord)
        workers = []
        for i in range(4):
            workers.append(cu.start(["worker", "--coordinator", server], os.path.join(self.tmp, f"worker{i}.log"),
                                    wrap=hosts.wrap(2 + i // 2), env={"UCX_TLS": "tcp"}))
            time.sleep(0.3)  # registration order = worker id: ids 0-1 on host 2, 2-3 on host 3
        self.procs += workers
        st = cu.wait_serving(server, timeout=120)
        self.assertEqual(sorted(w["pid"] for w in st["workers"]), sorted(p.pid for p in workers))
        self.check_batch(server)
        self.shutdown(server, [coord] + workers)


class BadRequestTest(ClusterCase):
    def test_invalid_requests_get_invalid_argument(self):
        addr_file = os.path.join(self.tmp, "addr")
        p = cu.start(["launch", "--checkpoint", self.f.ckpt, "--listen", "127.0.0.1:0", "--address-file",
                      addr_file], os.path.join(self.tmp, "launch.log"), mpirun_np=2)
        self.procs.append(p)
        server = cu.wait_for_file(addr_file, 120, [p])
        cu.wait_serving(server)
        bad = os.path.join(self.tmp, "bad.jsonl")
        for line, needle in [('{"tokens": [1, 5000]}', "out of range"), ('{"tokens": []}', "tokens")]:
            with open(bad, "w") as f:
                f.write(line + "\n")
            r = cu.run(["submit", "--server", server, "--prompts", bad, "--max-new-tokens", "2"], check=False)
            self.assertNotEqual(r.returncode, 0)
            self.assertEqual(r.stdout, "")
            self.assertIn(needle, r.stderr)
        r = cu.run(["cancel", "--server", server, "--job", "no-such-job"], check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("NOT_FOUND", r.stderr)
        self.shutdown(server, [p])


class NonFiniteTest(ClusterCase):
    def test_nan_lm_head_fails_the_job_with_an_error(self):
        """Issue 15: NaN weights make the logits NaN; the last stage fails the sequence instead of
        sampling token 0, the job turns FAILED naming the sequence, and `submit` exits non-zero."""
        ckpt = os.path.join(self.tmp, "nan_ckpt")
        shutil.copytree(self.f.ckpt, ckpt)
        shard = os.path.join(ckpt, "model-00001-of-00001.safetensors")
        with open(shard, "rb") as f:
            buf = bytearray(f.read())
        (n,) = struct.unpack("<Q", buf[:8])
        e = json.loads(buf[8:8 + n])["lm_head.weight"]
        assert e["dtype"] == "F32", e
        b, end = e["data_offsets"]
        buf[8 + n + b:8 + n + end] = struct.pack("<I", 0x7FC00000) * ((end - b) // 4)
        with open(shard, "wb") as f:
            f.write(buf)
        addr_file = os.path.join(self.tmp, "addr")
        p = cu.start(["launch", "--checkpoint", ckpt, "--pp", "2", "--ep", "1", "--listen", "127.0.0.1:0",
                      "--address-file", addr_file], os.path.join(self.tmp, "launch.log"), mpirun_np=3)
        self.procs.append(p)
        server = cu.wait_for_file(addr_file, 120, [p])
        cu.wait_serving(server)
        r = cu.run(["submit", "--server", server, "--prompts", self.f.prompts, "--max-new-tokens", "3"],
                   check=False, timeout=240)
        self.assertNotEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, "")  # no sequence printed as a success
        self.assertIn("FAILED", r.stderr)
        self.assertRegex(r.stderr, r"sequence \d+ failed: step 0: the model's logits are not finite")
        # The cluster still serves: the failure was the job's, not the workers'.
        cu.wait_serving(server)
        self.shutdown(server, [p])


if __name__ == "__main__":
    unittest.main(verbosity=2)
