#!/usr/bin/python3
"""`expertmesh coordinator` + `submit` / `status` / `cancel` / `shutdown` and
examples/client.py against fake workers written in Python (Register,
Heartbeat, Sync like real workers; tokens are a pure function of the prompt,
seed and step). Includes a coordinator killed with SIGKILL mid-job and
restarted on the same journal while `expertmesh submit` keeps waiting.

usage: test_cli.py --expertmesh BIN --workdir DIR
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, os.path.join(ROOT, "examples"))
import client as em_client  # noqa: E402

import grpc  # noqa: E402

VOCAB = 1024


def fake_token(tokens, seed, step):
    h = seed * 7919 + step * 31
    for t in tokens:
        h = (h * 131 + t) % (1 << 62)
    return h % VOCAB


class FakeWorker(threading.Thread):
    """One worker: registers, heartbeats, and (stage 0) syncs every few ms."""

    def __init__(self, server, pb, index, slow=0.0):
        super().__init__(daemon=True)
        self.pid = os.getpid() * 100 + index  # distinct "processes" in one Python process
        self.pb, self.slow = pb, slow
        self.channel = grpc.insecure_channel(server, options=[("grpc.max_reconnect_backoff_ms", 500)])
        self.stop = threading.Event()
        self.worker_id = -1
        self.generation = 0
        self.rejoin_after = 0
        self.shutdown_seen = False
        self.cancelled = []

    def call(self, method, req, resp_cls, timeout=5):
        f = self.channel.unary_unary("/expertmesh.v1.WorkerService/" + method,
                                     request_serializer=lambda m: m.SerializeToString(),
                                     response_deserializer=resp_cls.FromString)
        return f(req, timeout=timeout)

    def register(self):
        r = self.call("Register", self.pb.RegisterRequest(host="py", pid=self.pid, worker_id=self.worker_id,
                                                          rejoin_after_generation=self.rejoin_after),
                      self.pb.RegisterResponse, timeout=30)
        self.worker_id, self.stage, self.epoch, self.generation = r.worker_id, r.stage, r.epoch, r.generation
        self.rejoin_after = 0

    def run(self):
        pb = self.pb
        held = {}
        while not self.stop.is_set():
            try:
                if self.worker_id < 0 or getattr(self, "need_register", False):
                    self.register()
                    self.need_register = False
                hb = self.call("Heartbeat", pb.HeartbeatRequest(worker_id=self.worker_id, host="py", pid=self.pid,
                                                                    active_sequences=len(held)),
                               pb.HeartbeatResponse)
                if hb.epoch != self.epoch:
                    self.need_register = True  # the coordinator restarted
                    held.clear()
                    continue
                if hb.shutdown:
                    self.shutdown_seen = True
                    self.call("Heartbeat", pb.HeartbeatRequest(worker_id=self.worker_id, host="py", pid=self.pid,
                                                                   exiting=True),
                              pb.HeartbeatResponse)
                    return
                if self.stage != 0:
                    time.sleep(0.05)
                    continue
                req = pb.SyncRequest(worker_id=self.worker_id, host="py", pid=self.pid, epoch=self.epoch,
                                     generation=self.generation)
                for seq_id, s in list(held.items()):
                    u = req.updates.add(seq_id=seq_id)
                    t = fake_token(s["tokens"], s["seed"], s["step"])
                    s["step"] += 1
                    u.new_tokens.append(t)
                    if t in s["stop"]:
                        u.finish_reason = pb.FINISH_REASON_STOP
                    elif s["step"] >= s["max"]:
                        u.finish_reason = pb.FINISH_REASON_LENGTH
                    if u.finish_reason:
                        del held[seq_id]
                req.free_slots = 4 - len(held)
                r = self.call("Sync", req, pb.SyncResponse)
                if r.epoch != self.epoch:
                    held.clear()
                    self.need_register = True
                    continue
                if r.generation != self.generation:  # a real worker rebuilds its data plane
                    held.clear()
                    self.need_register = True
                    self.rejoin_after = self.generation
                    continue
                for c in r.cancel:
                    held.pop(c, None)
                    self.cancelled.append(c)
                for a in r.assign:
                    q = a.request
                    held[a.seq_id] = {"tokens": list(q.tokens), "seed": q.sampling.seed, "step": 0,
                                      "max": q.max_new_tokens, "stop": set(q.stop_token_ids)}
                time.sleep(0.01 + self.slow)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    self.need_register = True
                time.sleep(0.1)


def start_coordinator(bin_, ckpt, work, tag, pp, ep, extra=()):
    addr_file = os.path.join(work, tag + ".addr")
    if os.path.exists(addr_file):
        os.remove(addr_file)
    log = open(os.path.join(work, tag + ".log"), "w")
    p = subprocess.Popen([bin_, "coordinator", "--checkpoint", ckpt, "--pp", str(pp), "--ep", str(ep),
                          "--listen", "127.0.0.1:0", "--journal", os.path.join(work, "journal"),
                          "--address-file", addr_file, "--heartbeat-timeout-s", "2"] + list(extra),
                         stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        if os.path.exists(addr_file):
            return p, open(addr_file).read().strip()
        if p.poll() is not None:
            sys.exit("coordinator exited early; see " + log.name)
        time.sleep(0.05)
    sys.exit("coordinator did not start")


def check(cond, what):
    if not cond:
        print("FAIL: " + what)
        sys.exit(1)
    print("ok: " + what)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expertmesh", required=True)
    ap.add_argument("--workdir", required=True)
    a = ap.parse_args()
    work = a.workdir
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    ckpt = os.path.join(work, "ckpt")
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        # The tiny preset's shape is all the coordinator reads.
        json.dump({"model_type": "deepseek_v3", "vocab_size": VOCAB, "hidden_size": 160, "intermediate_size": 320,
                   "moe_intermediate_size": 24, "num_hidden_layers": 4, "first_k_dense_replace": 1,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 256,
                   "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "q_lora_rank": 96, "kv_lora_rank": 64,
                   "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
                   "max_position_embeddings": 4096}, f)
    prompts = [[1 + i, 2 + 2 * i, 3][: 1 + i % 3] for i in range(16)]
    prompts_file = os.path.join(work, "p.jsonl")
    with open(prompts_file, "w") as f:
        for p in prompts:
            f.write(json.dumps({"tokens": p}) + "\n")
    seed, max_new = 5, 6
    expected = [json.dumps({"index": i, "tokens": [fake_token(p, seed + i, s) for s in range(max_new)]},
                           separators=(",", ":")) for i, p in enumerate(prompts)]

    pb, health_pb = em_client.load_messages(os.path.join(ROOT, "proto", "expertmesh.proto"))
    coord, addr = start_coordinator(a.expertmesh, ckpt, work, "c1", 2, 2)
    client = em_client.Client(addr, pb, health_pb, 10)
    check(client.health().status == health_pb.HealthCheckResponse.NOT_SERVING, "NOT_SERVING before workers")
    # Server reflection lists the services (ServerReflectionRequest{list_services: ""} in wire format).
    refl = client.channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    listed = b"".join(refl(iter([b"\x3a\x00"]), timeout=10))
    check(all(n in listed for n in (b"expertmesh.v1.JobService", b"expertmesh.v1.ClusterService",
                                     b"grpc.health.v1.Health")), "server reflection lists the services")
    workers = [FakeWorker(addr, pb, i, slow=0.02) for i in range(4)]
    for w in workers:
        w.start()
    for _ in range(100):
        if client.health().status == health_pb.HealthCheckResponse.SERVING:
            break
        time.sleep(0.1)
    check(client.health("expertmesh.v1.JobService").status == health_pb.HealthCheckResponse.SERVING, "SERVING")

    em = [a.expertmesh]
    r = subprocess.run(em + ["submit", "--server", addr, "--prompts", prompts_file, "--max-new-tokens", str(max_new),
                             "--seed", str(seed)], capture_output=True, text=True, timeout=60)
    check(r.returncode == 0 and r.stdout.splitlines() == expected,
          "expertmesh submit prints generate's lines in input order\n" + r.stdout + r.stderr)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "client.py"), "--server", addr, "submit",
                        "--prompts", prompts_file, "--max-new-tokens", str(max_new), "--seed", str(seed)],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 0 and r.stdout.splitlines() == expected, "client.py submit gives the same lines\n" + r.stderr)
    r = subprocess.run(em + ["status", "--server", addr], capture_output=True, text=True, timeout=30)
    check(r.returncode == 0 and "SERVING" in r.stdout and "READY" in r.stdout, "expertmesh status\n" + r.stdout)
    r = subprocess.run(em + ["status", "--server", addr, "--json"], capture_output=True, text=True, timeout=30)
    check(r.returncode == 0 and json.loads(r.stdout)["serving"] is True, "expertmesh status --json")
    r = subprocess.run(em + ["submit", "--server", addr, "--prompts", prompts_file, "--max-new-tokens", "5000"],
                       capture_output=True, text=True, timeout=30)
    check(r.returncode == 1 and "INVALID_ARGUMENT: sequences[0].max_new_tokens" in r.stderr, "invalid submit\n" + r.stderr)
    # The fake workers report no expert load: nothing to rebalance on, said by both clients.
    r = subprocess.run(em + ["rebalance", "--server", addr], capture_output=True, text=True, timeout=30)
    check(r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "no expert load observed" in r.stderr,
          "expertmesh rebalance without load\n" + r.stderr)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "client.py"), "--server", addr, "rebalance"],
                       capture_output=True, text=True, timeout=60)
    check(r.returncode == 1 and "FAILED_PRECONDITION: no expert load observed" in r.stderr,
          "client.py rebalance without load\n" + r.stderr)
    r = subprocess.run(em + ["cancel", "--server", addr, "--job", "job-999999"], capture_output=True, text=True)
    check(r.returncode == 1 and "NOT_FOUND" in r.stderr, "cancel of an unknown job")

    # Cancel a long job: the workers are told to drop its running sequences.
    r = subprocess.run(em + ["submit", "--server", addr, "--prompts", prompts_file, "--max-new-tokens", "3000",
                             "--detach"], capture_output=True, text=True, timeout=30)
    long_job = json.loads(r.stdout)["job_id"]
    time.sleep(0.5)
    r = subprocess.run(em + ["cancel", "--server", addr, "--job", long_job], capture_output=True, text=True)
    check(r.returncode == 0 and json.loads(r.stdout)["state"] == "CANCELLED", "cancel")
    time.sleep(0.5)
    check(sum(len(w.cancelled) for w in workers) > 0, "the workers received cancel for running sequences")

    # SIGKILL mid-job, restart on the same journal: `expertmesh submit` keeps waiting and completes.
    sub = subprocess.Popen(em + ["submit", "--server", addr, "--prompts", prompts_file, "--max-new-tokens", "40",
                                 "--seed", str(seed), "--request-id", "crash-test"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    coord.send_signal(signal.SIGKILL)
    coord.wait()
    port = addr.rsplit(":", 1)[1]
    coord, addr2 = start_coordinator(a.expertmesh, ckpt, work, "c2", 2, 2, ["--listen", "127.0.0.1:" + port])
    check(addr2 == addr, "restarted on the same address")
    out, err = sub.communicate(timeout=90)
    expected40 = [json.dumps({"index": i, "tokens": [fake_token(p, seed + i, s) for s in range(40)]},
                             separators=(",", ":")) for i, p in enumerate(prompts)]
    check(sub.returncode == 0 and out.splitlines() == expected40,
          "a job survives a SIGKILLed coordinator\n" + err[-2000:])

    r = subprocess.run(em + ["shutdown", "--server", addr, "--wait-s", "30"], capture_output=True, text=True,
                       timeout=60)
    check(r.returncode == 0, "expertmesh shutdown\n" + r.stdout + r.stderr)
    check(coord.wait(timeout=30) == 0, "the coordinator exited cleanly")
    for w in workers:
        w.join(timeout=10)
    check(all(w.shutdown_seen for w in workers), "every worker was told to shut down")
    print("test_cli: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
