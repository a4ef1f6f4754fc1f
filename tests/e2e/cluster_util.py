"""Helpers for end-to-end tests: run expertmesh verbs, start local clusters.

Every process started here is killed when the test ends; every wait has a
deadline, so a hang is a failure, never a stuck CI job.
"""
import json
import os
import random
import signal
import subprocess
import time

EXPERTMESH = os.environ.get("EXPERTMESH", "expertmesh")
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader"]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def run(args, timeout=120, check=True, **kw):
    p = subprocess.run([EXPERTMESH] + args, capture_output=True, text=True, timeout=timeout, env=ENV, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"expertmesh {' '.join(args)} exited {p.returncode}:\n{p.stderr[-4000:]}")
    return p


def results(stdout):
    """Parses `generate` / `submit` output: list of token lists in index order."""
    lines = [json.loads(l) for l in stdout.splitlines() if l.strip()]
    assert [l["index"] for l in lines] == list(range(len(lines))), stdout
    return [l["tokens"] for l in lines]


def make_prompts(path, n, vocab, seed=0, max_len=30):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            length = 1 + (i * 7 + rng.randrange(max_len)) % max_len
            f.write(json.dumps({"tokens": [rng.randrange(vocab) for _ in range(length)]}) + "\n")


def wait_for_file(path, timeout, procs=()):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path) as f:
                text = f.read().strip()
            if text:
                return text
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process exited early ({p.returncode}) while waiting for {path}:\n"
                                     + read_log(p))
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout}s")


def read_log(p):
    path = getattr(p, "log_path", None)
    if path and os.path.exists(path):
        with open(path) as f:
            return f.read()[-6000:]
    return ""


def start(args, log_path, mpirun_np=None, wrap=(), env=None):
    """Starts `expertmesh args` (under mpirun -np N, or after `wrap`, e.g. `ip netns exec NS`)."""
    cmd = list(wrap) + ([*MPIRUN, "-np", str(mpirun_np)] if mpirun_np else []) + [EXPERTMESH] + args
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(ENV, **(env or {})),
                             start_new_session=True)
    p.log_path = log_path
    return p


def kill(p, sig=signal.SIGKILL):
    if p.poll() is None:
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=20)


def wait_status(server, ready, what, timeout=120, period=0.2, flags=()):
    """Polls `expertmesh status --json` (with `flags`, e.g. TLS and token) until ready(status) holds
    and returns that status; an unreachable coordinator counts as not ready. Fails naming `what` and
    the last answer."""
    end = time.time() + timeout
    last = ""
    while time.time() < end:
        p = run(["status", "--server", server, "--json", *flags], check=False, timeout=30)
        if p.returncode == 0:
            st = json.loads(p.stdout)
            if ready(st):
                return st
            last = p.stdout[-500:]
        else:
            last = p.stderr[-500:]
        time.sleep(period)
    raise AssertionError(f"cluster at {server}: {what} not seen within {timeout}s: {last}")


def wait_serving(server, timeout=120, flags=()):
    return wait_status(server, lambda st: st.get("serving"), "serving", timeout, flags=flags)


def health(server, service=""):
    """grpc.health.v1.Health/Check by hand (no grpc_health package on Debian):
    returns "SERVING", "NOT_SERVING", ... or raises."""
    import grpc
    svc = service.encode()
    req = (b"\x0a" + bytes([len(svc)]) + svc) if svc else b""
    with grpc.insecure_channel(server) as ch:
        call = ch.unary_unary("/grpc.health.v1.Health/Check")
        resp = call(req, timeout=10)
    status = resp[1] if len(resp) >= 2 and resp[0] == 0x08 else 0
    return {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}[status]


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class NetnsHosts:
    """N "hosts" on this machine: network namespaces em<id>h1..hN, each with its
    own loopback and one veth into a bridge em<id>br in the root namespace
    (10.<a>.<b>.1/24); host i is 10.<a>.<b>.(10 + i). Processes run in host i
    through `wrap(i)` = ["ip", "netns", "exec", name]. Needs root (CAP_NET_ADMIN)
    and iproute2; `available()` says why not. Everything is removed by down(),
    also after a failure halfway through up()."""

    def __init__(self, n):
        self.n = n
        tag = os.getpid() % 10000
        self.prefix = f"em{tag}"
        self.subnet = f"10.{77 + tag // 250 % 100}.{tag % 250}"
        self.bridge = self.prefix + "br"
        self.names = [f"{self.prefix}h{i}" for i in range(1, n + 1)]

    @staticmethod
    def available():
        if os.geteuid() != 0:
            return "needs root for ip netns"
        probe = f"emprobe{os.getpid() % 100000}"
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if r.returncode != 0:
            return "ip netns add failed: " + (r.stderr.strip() or "?")
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return ""

    def _ip(self, *args, ns=None):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: {r.stderr.strip()}")

    def address(self, i):
        return f"{self.subnet}.{10 + i}"

    def wrap(self, i):
        return ["ip", "netns", "exec", self.names[i - 1]]

    def up(self):
        try:
            self._ip("link", "add", self.bridge, "type", "bridge")
            self._ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            self._ip("link", "set", self.bridge, "up")
            for i, ns in enumerate(self.names, start=1):
                self._ip("netns", "add", ns)
                outer, inner = f"{self.prefix}v{i}", f"{self.prefix}p{i}"
                self._ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                self._ip("link", "set", inner, "netns", ns)
                self._ip("link", "set", outer, "master", self.bridge)
                self._ip("link", "set", outer, "up")
                self._ip("addr", "add", f"{self.address(i)}/24", "dev", inner, ns=ns)
                self._ip("link", "set", inner, "up", ns=ns)
                self._ip("link", "set", "lo", "up", ns=ns)
        except Exception:
            self.down()
            raise
        return self

    def down(self):
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth pair along
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
