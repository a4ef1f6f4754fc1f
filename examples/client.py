#!/usr/bin/python3
"""A Python client for an expertmesh coordinator (docs/API.md).

Runs on Debian's python3-grpcio and python3-protobuf. The message classes are
generated at start-up from proto/expertmesh.proto with protoc (the
protobuf-compiler package, which building expertmesh already needs) or with
grpc_tools when that module is installed; the RPCs are called through
grpcio's generic channel methods, so no gRPC code generator is needed.

  examples/client.py --server 127.0.0.1:50051 submit --prompts p.jsonl --max-new-tokens 16
  examples/client.py --server 127.0.0.1:50051 status
  examples/client.py --server 127.0.0.1:50051 health
  examples/client.py --server 127.0.0.1:50051 submit --tokens 1,2,3 --detach   # prints the job id
  examples/client.py --server 127.0.0.1:50051 watch job-000001
  examples/client.py --server 127.0.0.1:50051 cancel job-000001
  examples/client.py --server 127.0.0.1:50051 jobs
  examples/client.py --server 127.0.0.1:50051 rebalance [--force]        # live expert rebalancing
  examples/client.py --server 127.0.0.1:50051 shutdown

`submit` prints one line {"index":i,"tokens":[...]} per prompt in input order,
exactly like `expertmesh generate` and `expertmesh submit`; sequence i gets
seed --seed + i. Errors print "client.py: CODE: message" and exit 1.
"""

import argparse
import atexit
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = os.path.join(HERE, "..", "proto", "expertmesh.proto")

HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
"""


def load_messages(proto_path):
    """Generates expertmesh_pb2 and health_pb2 into a temporary folder and imports them."""
    out = tempfile.mkdtemp(prefix="expertmesh_client_")
    atexit.register(shutil.rmtree, out, True)
    with open(os.path.join(out, "health.proto"), "w") as f:
        f.write(HEALTH_PROTO)
    proto_dir, proto_name = os.path.split(os.path.abspath(proto_path))
    jobs = [(proto_dir, proto_name), (out, "health.proto")]
    try:
        from grpc_tools import protoc as grpc_protoc  # optional
    except ImportError:
        grpc_protoc = None
    for include, name in jobs:
        args = ["protoc", "-I" + include, "--python_out=" + out, os.path.join(include, name)]
        if grpc_protoc is not None:
            rc = grpc_protoc.main(args)
        else:
            exe = shutil.which("protoc")
            if exe is None:
                sys.exit("client.py: needs protoc (apt-get install protobuf-compiler) or grpc_tools")
            rc = subprocess.call([exe] + args[1:])
        if rc != 0:
            sys.exit("client.py: protoc failed on " + name)
    sys.path.insert(0, out)
    return importlib.import_module("expertmesh_pb2"), importlib.import_module("health_pb2")


class Client:
    """Thin wrappers over the coordinator's RPCs; each returns the response message."""

    def __init__(self, server, pb, health_pb, timeout, tls_ca=None, tls_cert=None, tls_key=None, token=""):
        """tls_ca: PEM file of the CA that signed the coordinator's certificate (TLS); tls_cert/tls_key:
        this client's certificate for mTLS; token: the client bearer token (docs/SECURITY.md)."""
        self.pb, self.health_pb, self.timeout = pb, health_pb, timeout
        self.metadata = [("authorization", "Bearer " + token)] if token else []
        options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000)]
        if tls_ca:
            def read(path):
                with open(path, "rb") as f:
                    return f.read()
            creds = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key) if tls_key else None,
                                                 read(tls_cert) if tls_cert else None)
            self.channel = grpc.secure_channel(server, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(server, options=options)

    def _unary(self, method, request, response_cls):
        call = self.channel.unary_unary(method, request_serializer=lambda m: m.SerializeToString(),
                                        response_deserializer=response_cls.FromString)
        return call(request, timeout=self.timeout, metadata=self.metadata)

    def submit(self, request):
        return self._unary("/expertmesh.v1.JobService/SubmitJob", request, self.pb.SubmitJobResponse)

    def get_job(self, job_id):
        return self._unary("/expertmesh.v1.JobService/GetJob", self.pb.GetJobRequest(job_id=job_id), self.pb.Job)

    def watch(self, job_id):
        call = self.channel.unary_stream("/expertmesh.v1.JobService/WatchJob",
                                         request_serializer=lambda m: m.SerializeToString(),
                                         response_deserializer=self.pb.WatchJobResponse.FromString)
        return call(self.pb.WatchJobRequest(job_id=job_id), metadata=self.metadata)

    def cancel(self, job_id):
        return self._unary("/expertmesh.v1.JobService/CancelJob", self.pb.CancelJobRequest(job_id=job_id), self.pb.Job)

    def list_jobs(self, limit):
        return self._unary("/expertmesh.v1.JobService/ListJobs", self.pb.ListJobsRequest(limit=limit),
                           self.pb.ListJobsResponse)

    def status(self):
        return self._unary("/expertmesh.v1.ClusterService/GetClusterStatus", self.pb.GetClusterStatusRequest(),
                           self.pb.ClusterStatus)

    def rebalance(self, force):
        return self._unary("/expertmesh.v1.ClusterService/RebalanceExperts",
                           self.pb.RebalanceExpertsRequest(force=force), self.pb.RebalanceExpertsResponse)

    def shutdown(self):
        return self._unary("/expertmesh.v1.ClusterService/Shutdown", self.pb.ShutdownRequest(),
                           self.pb.ShutdownResponse)

    def health(self, service=""):
        return self._unary("/grpc.health.v1.Health/Check", self.health_pb.HealthCheckRequest(service=service),
                           self.health_pb.HealthCheckResponse)


def read_prompts(args):
    if args.tokens:
        return [[int(t) for t in p.split(",") if t.strip()] for p in args.tokens]
    prompts = []
    with open(args.prompts) as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["tokens"])
    return prompts


RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def cmd_submit(client, args):
    pb = client.pb
    req = pb.SubmitJobRequest(client_request_id=args.request_id or "py-" + uuid.uuid4().hex)
    for i, tokens in enumerate(read_prompts(args)):
        seq = req.sequences.add(tokens=tokens, max_new_tokens=args.max_new_tokens,
                                stop_token_ids=args.stop_token_ids)
        seq.sampling.temperature = args.temperature
        seq.sampling.top_k = args.top_k
        seq.sampling.top_p = args.top_p
        seq.sampling.seed = args.seed + i
    give_up = time.time() + args.retry_s
    while True:  # the request id makes retries safe
        try:
            job_id = client.submit(req).job_id
            break
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or time.time() > give_up:
                raise
            time.sleep(0.5)
    if args.detach:
        print(json.dumps({"job_id": job_id}, separators=(",", ":")))
        return 0
    results, state = {}, pb.JOB_STATE_QUEUED
    while True:  # a watch broken by a coordinator restart is started again
        try:
            for m in client.watch(job_id):
                results[m.result.index] = m.result
                state = m.state
            break
        except grpc.RpcError as e:
            if e.code() not in RETRYABLE or time.time() > give_up:
                raise
            time.sleep(0.5)
    for i in range(len(req.sequences)):
        r = results.get(i)
        if r is not None and r.finish_reason != pb.FINISH_REASON_CANCELLED:
            print(json.dumps({"index": i, "tokens": list(r.tokens)}, separators=(",", ":")))
    sys.stdout.flush()
    if state != pb.JOB_STATE_SUCCEEDED:
        print("client.py: job %s ended %s" % (job_id, pb.JobState.Name(state)), file=sys.stderr)
        return 1
    return 0


def cmd_watch(client, args):
    for m in client.watch(args.job_id):
        print(json.dumps({"index": m.result.index, "tokens": list(m.result.tokens),
                          "finish_reason": client.pb.FinishReason.Name(m.result.finish_reason),
                          "state": client.pb.JobState.Name(m.state)}, separators=(",", ":")))
    return 0


def cmd_status(client, args):
    from google.protobuf import json_format
    st = client.status()
    if args.json:
        print(json_format.MessageToJson(st, preserving_proto_field_name=True))
        return 0
    pb = client.pb
    print("serving: %s  plan: pp=%d ep=%d redundant_experts=%d  queued %d, running %d" % (
        st.serving, st.plan.pp, st.plan.ep, st.plan.redundant_experts, st.queued_sequences, st.running_sequences))
    rb = st.rebalance
    print("expert placement version %d, %d rebalances, imbalance since the last one %.3f%s" % (
        rb.placement_version, rb.rebalances, rb.window_imbalance,
        ", version %d pending (%d workers loaded it)" % (rb.pending_version, rb.workers_staged)
        if rb.pending_version else ""))
    for s in st.plan.stages:
        print("stage %d: layers [%d, %d)%s%s, %d MoE layers" % (
            s.stage, s.layer_begin, s.layer_end, " +embedding" if s.has_embedding else "",
            " +head" if s.has_head else "", len(s.placement)))
    for w in st.workers:
        print("worker %d (stage %d, ep_rank %d) %s:%d %s, %d active, %d steps" % (
            w.worker_id, w.stage, w.ep_rank, w.host or "-", w.pid, pb.WorkerHealth.Name(w.health),
            w.active_sequences, w.steps))
    for l in st.expert_load:
        total = sum(l.tokens_per_expert)
        hot = max(range(len(l.tokens_per_expert)), key=lambda e: l.tokens_per_expert[e]) if total else -1
        print("layer %d: %d routed tokens%s" % (l.layer, total, ", hottest expert %d" % hot if total else ""))
    return 0


def cmd_health(client, args):
    r = client.health(args.service)
    print(client.health_pb.HealthCheckResponse.ServingStatus.Name(r.status))
    return 0 if r.status == client.health_pb.HealthCheckResponse.SERVING else 1


def cmd_cancel(client, args):
    j = client.cancel(args.job_id)
    print(json.dumps({"job_id": j.job_id, "state": client.pb.JobState.Name(j.state),
                      "num_sequences": j.num_sequences, "num_finished": j.num_finished}, separators=(",", ":")))
    return 0


def cmd_jobs(client, args):
    for j in client.list_jobs(args.limit).jobs:
        print("%s %s %d/%d %d tokens" % (j.job_id, client.pb.JobState.Name(j.state), j.num_finished,
                                         j.num_sequences, j.generated_tokens))
    return 0


def cmd_rebalance(client, args):
    r = client.rebalance(args.force)
    out = {"outcome": "unchanged", "reason": r.reason, "placement_version": 0,
           "imbalance_before": r.imbalance_before, "imbalance_after": r.imbalance_after,
           "experts_to_load": r.experts_to_load}
    if r.started:
        out["outcome"], out["placement_version"] = "pending", r.pending_version
        end = time.time() + args.wait_s
        while time.time() < end:
            rb = client.status().rebalance
            if rb.placement_version >= r.pending_version:
                out["outcome"] = "committed"
                break
            if rb.pending_version != r.pending_version:
                print("client.py: placement version %d was dropped: %s" % (r.pending_version, rb.last_error),
                      file=sys.stderr)
                return 1
            time.sleep(0.2)
    print(json.dumps(out, separators=(",", ":")))
    return 0


def cmd_shutdown(client, args):
    client.shutdown()
    print("shutdown requested")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True, help="the coordinator's host:port")
    p.add_argument("--proto", default=PROTO, help="path to expertmesh.proto")
    p.add_argument("--timeout", type=float, default=30, help="deadline of each unary call, seconds")
    p.add_argument("--tls-ca", help="PEM CA of the coordinator's certificate: connect with TLS")
    p.add_argument("--tls-cert", help="this client's PEM certificate (mTLS)")
    p.add_argument("--tls-key", help="its PEM private key")
    p.add_argument("--auth-token-file", help="file with the client bearer token (default: $EXPERTMESH_API_KEY)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", help="submit a batch and print the results")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompts", help="JSON lines {\"tokens\": [ids...]}")
    g.add_argument("--tokens", action="append", help="one prompt as comma-separated ids (repeatable)")
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop-token-ids", type=lambda v: [int(x) for x in v.split(",") if x], default=[])
    s.add_argument("--request-id", default="")
    s.add_argument("--detach", action="store_true", help="print the job id and return")
    s.add_argument("--retry-s", type=float, default=300, help="keep retrying while the coordinator is unreachable")
    w = sub.add_parser("watch", help="stream a job's results")
    w.add_argument("job_id")
    st = sub.add_parser("status", help="plan, workers, health, expert load")
    st.add_argument("--json", action="store_true")
    h = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING")
    h.add_argument("--service", default="", help="\"\" (the server) or expertmesh.v1.JobService")
    c = sub.add_parser("cancel", help="cancel a job")
    c.add_argument("job_id")
    j = sub.add_parser("jobs", help="list recent jobs")
    j.add_argument("--limit", type=int, default=20)
    r = sub.add_parser("rebalance", help="re-place the experts from the observed load, live (EPLB)")
    r.add_argument("--force", action="store_true", help="even when the predicted gain is small")
    r.add_argument("--wait-s", type=float, default=60, help="wait this long for the workers to switch (0: return)")
    sub.add_parser("shutdown", help="stop the workers, then the coordinator")
    args = p.parse_args()

    pb, health_pb = load_messages(args.proto)
    token = os.environ.get("EXPERTMESH_API_KEY", "").strip()
    if args.auth_token_file:
        with open(args.auth_token_file) as f:
            token = f.read().strip()
    client = Client(args.server, pb, health_pb, args.timeout, args.tls_ca, args.tls_cert, args.tls_key, token)
    handlers = {"submit": cmd_submit, "watch": cmd_watch, "status": cmd_status, "health": cmd_health,
                "cancel": cmd_cancel, "jobs": cmd_jobs, "rebalance": cmd_rebalance, "shutdown": cmd_shutdown}
    try:
        return handlers[args.cmd](client, args)
    except grpc.RpcError as e:
        print("client.py: %s: %s" % (e.code().name, e.details()), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
