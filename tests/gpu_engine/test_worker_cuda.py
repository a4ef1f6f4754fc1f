#!/usr/bin/env python3
"""Workers with `--device cuda` in standalone clusters on one GPU.

  EXPERTMESH=build/launch/expertmesh python3 test_worker_cuda.py [Test.name ...]

Without a usable GPU it prints one line "no CUDA device: ..." and exits 0.

The tiny fp32 checkpoint (seed 11) and the tie-free prompts of
prompts.jsonl, 10 greedy tokens each; workers run `--cuda-precision fp32`,
so every plan must give exactly the tokens of `generate --device cpu`:
  * PP1 x EP1: one worker, the whole model on the GPU (CUDA graphs on);
  * PP2 x EP1 and PP1 x EP2: two workers sharing the one GPU, over the UCX
    data plane with `--device-data-plane host` (hidden states and EP tokens
    staged through host memory: NCCL refuses two ranks on one GPU, so the
    NCCL device plane needs a machine with two GPUs).
"""
import atexit
import json
import os
import shutil
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "e2e"))
import cluster_util as cu  # noqa: E402

NEW = 10
CUDA = ["--device", "cuda", "--cuda-precision", "fp32", "--cuda-cache-tokens", "8192", "--cuda-max-step-tokens",
        "2048"]


class Fixture:
    dir = None

    @classmethod
    def get(cls):
        if cls.dir is None:
            cls.dir = tempfile.mkdtemp(prefix="em-gpu-worker-")
            if not os.environ.get("EM_KEEP_TMP"):
                atexit.register(shutil.rmtree, cls.dir, True)
            cls.ckpt = os.path.join(cls.dir, "ckpt")
            cu.run(["checkpoint", "--preset", "tiny", "--dtype", "fp32", "--seed", "11", "--out", cls.ckpt])
            cls.prompts = os.path.join(cls.dir, "prompts.jsonl")
            shutil.copy(os.path.join(HERE, "prompts.jsonl"), cls.prompts)
            base = ["generate", "--checkpoint", cls.ckpt, "--prompts", cls.prompts, "--max-new-tokens", str(NEW)]
            cls.cpu = cu.results(cu.run(base + ["--device", "cpu"]).stdout)
        return cls


class CudaWorkers(unittest.TestCase):
    def setUp(self):
        self.f = Fixture.get()
        self.tmp = tempfile.mkdtemp(prefix="case-", dir=self.f.dir)
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            cu.kill(p)

    def cluster(self, pp, ep, worker_flags):
        port = cu.free_port()
        server = f"127.0.0.1:{port}"
        coord = cu.start(["coordinator", "--checkpoint", self.f.ckpt, "--pp", str(pp), "--ep", str(ep), "--listen",
                          server, "--journal", os.path.join(self.tmp, "journal")],
                         os.path.join(self.tmp, "coordinator.log"))
        self.procs.append(coord)
        workers = [cu.start(["worker", "--coordinator", server, *CUDA, *worker_flags],
                            os.path.join(self.tmp, f"worker{i}.log")) for i in range(pp * ep)]
        self.procs += workers
        try:
            cu.wait_serving(server, timeout=180)
        except AssertionError:
            raise AssertionError("\n".join(cu.read_log(p) for p in self.procs))
        return server, [coord] + workers

    def run_plan(self, pp, ep, worker_flags=()):
        server, procs = self.cluster(pp, ep, list(worker_flags))
        got = cu.results(cu.run(["submit", "--server", server, "--prompts", self.f.prompts, "--max-new-tokens",
                                 str(NEW)], timeout=240).stdout)
        self.assertEqual(got, self.f.cpu, "PP%d x EP%d on the GPU vs generate --device cpu\n%s" % (
            pp, ep, cu.read_log(procs[1])))
        cu.run(["shutdown", "--server", server], timeout=90)
        for p in procs:
            self.assertEqual(p.wait(timeout=60), 0, cu.read_log(p))
        sys.stderr.write("PP%d x EP%d: %d sequences x %d tokens equal the CPU's\n" % (pp, ep, len(got), NEW))

    def test_pp1_ep1(self):
        self.run_plan(1, 1)

    def test_pp2_ep1_host_plane(self):
        self.run_plan(2, 1, ["--data-plane", "ucx", "--device-data-plane", "host"])

    def test_pp1_ep2_host_plane(self):
        self.run_plan(1, 2, ["--data-plane", "ucx", "--device-data-plane", "host"])


def main():
    tmp = tempfile.mkdtemp(prefix="em-gpu-probe-")
    atexit.register(shutil.rmtree, tmp, True)
    ck = os.path.join(tmp, "ck")
    cu.run(["checkpoint", "--preset", "tiny", "--dtype", "bf16", "--seed", "1", "--out", ck])
    pf = os.path.join(tmp, "p.jsonl")
    with open(pf, "w") as f:
        f.write(json.dumps({"tokens": [1, 2, 3]}) + "\n")
    r = cu.run(["generate", "--checkpoint", ck, "--prompts", pf, "--max-new-tokens", "1", "--device", "cuda"],
               check=False)
    shutil.rmtree(tmp, ignore_errors=True)
    if r.returncode != 0:
        for l in r.stderr.splitlines():
            if "no CUDA device:" in l:
                print(l[l.index("no CUDA device:"):])
                return 0
        sys.exit("expertmesh generate --device cuda failed: " + r.stderr)
    prog = unittest.main(argv=sys.argv, exit=False, verbosity=2)
    return 0 if prog.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
