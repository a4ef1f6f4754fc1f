"""End-to-end test of the secured control plane (docs/SECURITY.md), on the tiny preset.

Every gRPC channel with TLS and client certificates (mTLS), a client bearer
token and a cluster secret for the workers:
  * a standalone coordinator and 2 workers (UCX data plane) serve a batch with
    exactly `expertmesh generate`'s tokens; a client without the CA, one
    without a client certificate and one without the token are refused; the
    client token cannot register a worker; /metrics wants the token;
  * `expertmesh launch` under mpirun: rank 0 draws the cluster secret and
    shares it by MPI_Bcast; the cluster serves a batch; an outsider that
    holds a client certificate and the client token still cannot register.

Run: EXPERTMESH=build/launch/expertmesh /usr/bin/python3 tests/e2e/test_security.py [Class.test]
"""
import os
import subprocess
import sys
import unittest
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cluster_util as cu  # noqa: E402
from test_cluster import ClusterCase  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(path):
    with open(path, "rb") as f:
        return f.read()


def raw_call(server, method, certs, metadata=(), client_cert=True):
    """Calls /expertmesh.v1.<method> with an empty request over TLS (python grpc) and returns
    (code name, details)."""
    import grpc
    creds = grpc.ssl_channel_credentials(read(certs + "/ca.pem"),
                                         read(certs + "/client.key") if client_cert else None,
                                         read(certs + "/client.pem") if client_cert else None)
    with grpc.secure_channel(server, creds) as ch:
        f = ch.unary_unary("/expertmesh.v1." + method)
        try:
            f(b"", timeout=10, metadata=list(metadata))
            return "OK", ""
        except grpc.RpcError as e:
            return e.code().name, e.details()


class SecurityTest(ClusterCase):
    def setUp(self):
        super().setUp()
        self.certs = os.path.join(self.tmp, "certs")
        subprocess.run([os.path.join(ROOT, "scripts", "make-certs.sh"), self.certs], check=True,
                       capture_output=True, timeout=60)
        self.token_file = os.path.join(self.tmp, "token")
        self.token = "client-token-" + os.urandom(16).hex()
        with open(self.token_file, "w") as f:
            f.write(self.token + "\n")
        self.secret_file = os.path.join(self.tmp, "secret")
        with open(self.secret_file, "w") as f:
            f.write("cluster-secret-" + os.urandom(16).hex() + "\n")
        c = self.certs
        # A client's flags: the CA, its certificate (mTLS), the token.
        self.client = ["--tls-ca", f"{c}/ca.pem", "--tls-cert", f"{c}/client.pem", "--tls-key", f"{c}/client.key",
                       "--auth-token-file", self.token_file]
        self.server_tls = ["--tls-cert", f"{c}/server.pem", "--tls-key", f"{c}/server.key", "--tls-client-ca",
                           f"{c}/ca.pem"]

    def refused(self, server, flags, *expect):
        p = cu.run(["status", "--server", server, "--retry-s", "0", "--rpc-timeout-s", "5", *flags], check=False,
                   timeout=60)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        for e in expect:
            self.assertIn(e, p.stderr)

    def check_outsiders(self, server):
        c = self.certs
        # No TLS at all, TLS without the client certificate, TLS without the token.
        self.refused(server, ["--auth-token-file", self.token_file], "UNAVAILABLE")
        self.refused(server, ["--tls-ca", f"{c}/ca.pem", "--auth-token-file", self.token_file], "UNAVAILABLE")
        self.refused(server, ["--tls-ca", f"{c}/ca.pem", "--tls-cert", f"{c}/client.pem", "--tls-key",
                              f"{c}/client.key"], "UNAUTHENTICATED", "missing bearer token")
        env_flags = ["--tls-ca", f"{c}/ca.pem", "--tls-cert", f"{c}/client.pem", "--tls-key", f"{c}/client.key"]
        p = subprocess.run([cu.EXPERTMESH, "status", "--server", server, "--retry-s", "0", *env_flags],
                           capture_output=True, text=True, timeout=60,
                           env=dict(cu.ENV, EXPERTMESH_API_KEY="wrong-token-0123456789"))
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("PERMISSION_DENIED", p.stderr)
        self.refused(server, [*self.client[:6], "--auth-token-file", self.secret_file], "PERMISSION_DENIED",
                     "wrong bearer token")
        # Past TLS with a client certificate: the client token does not make a worker.
        auth = [("authorization", "Bearer " + self.token)]
        for m in ["WorkerService/Register", "WorkerService/StoreSet", "WorkerService/Heartbeat",
                  "WorkerService/Sync"]:
            self.assertEqual(raw_call(server, m, c)[0], "UNAUTHENTICATED", m)
            code, details = raw_call(server, m, c, auth)
            self.assertEqual(code, "PERMISSION_DENIED", m)
            self.assertIn("cluster secret", details)
        self.assertEqual(raw_call(server, "ClusterService/Shutdown", c)[0], "UNAUTHENTICATED")

    def test_standalone_tls_mtls_and_tokens(self):
        port = cu.free_port()
        server = f"127.0.0.1:{port}"
        metrics_port = cu.free_port()
        coord = cu.start(["coordinator", "--checkpoint", self.f.ckpt, "--pp", "1", "--ep", "2", "--listen", server,
                          "--metrics-listen", f"127.0.0.1:{metrics_port}", *self.server_tls, "--auth-token-file",
                          self.token_file, "--cluster-secret-file", self.secret_file],
                         os.path.join(self.tmp, "coordinator.log"))
        self.procs.append(coord)
        c = self.certs
        workers = [cu.start(["worker", "--coordinator", server, "--tls-ca", f"{c}/ca.pem", "--tls-cert",
                             f"{c}/client.pem", "--tls-key", f"{c}/client.key", "--cluster-secret-file",
                             self.secret_file], os.path.join(self.tmp, f"worker{i}.log")) for i in range(2)]
        self.procs += workers
        cu.wait_serving(server, flags=self.client)
        self.assertEqual(self.submit(server, self.client), self.f.greedy)
        self.check_outsiders(server)
        # A worker with the wrong secret is refused at Register and exits with the reason.
        bad = cu.start(["worker", "--coordinator", server, "--tls-ca", f"{c}/ca.pem", "--tls-cert", f"{c}/client.pem",
                        "--tls-key", f"{c}/client.key", "--cluster-secret-file", self.token_file],
                       os.path.join(self.tmp, "bad_worker.log"))
        self.procs.append(bad)
        self.assertNotEqual(bad.wait(timeout=60), 0)
        self.assertIn("wrong cluster secret", cu.read_log(bad))
        # Metrics want the token.
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with self.assertRaises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        self.assertEqual(e.exception.code, 401)
        req = urllib.request.Request(url, headers={"Authorization": "Bearer " + self.token})
        with urllib.request.urlopen(req, timeout=10) as r:
            self.assertIn("expertmesh_serving 1", r.read().decode())
        self.assertIn("TLS with client certificates, client token on, cluster secret on", cu.read_log(coord))
        # The Python example client speaks the same TLS and token.
        py = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "examples", "client.py"), "--server", server,
                             "--tls-ca", f"{c}/ca.pem", "--tls-cert", f"{c}/client.pem", "--tls-key",
                             f"{c}/client.key", "--auth-token-file", self.token_file, "status", "--json"],
                            capture_output=True, text=True, timeout=60)
        self.assertEqual(py.returncode, 0, py.stderr)
        self.assertIn('"serving": true', py.stdout)
        py = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "examples", "client.py"), "--server", server,
                             "--tls-ca", f"{c}/ca.pem", "--tls-cert", f"{c}/client.pem", "--tls-key",
                             f"{c}/client.key", "status"], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if k != "EXPERTMESH_API_KEY"})
        self.assertNotEqual(py.returncode, 0)
        self.assertIn("UNAUTHENTICATED", py.stderr)
        self.shutdown_with(server, [coord] + workers)

    def test_launch_shares_a_generated_secret(self):
        addr_file = os.path.join(self.tmp, "addr")
        c = self.certs
        # Rank 0 serves with server.pem; the workers verify it with the CA and present server.pem
        # (its key usage allows client authentication) for mTLS.
        p = cu.start(["launch", "--checkpoint", self.f.ckpt, "--pp", "1", "--ep", "2", "--listen", "127.0.0.1:0",
                      "--address-file", addr_file, *self.server_tls, "--tls-ca", f"{c}/ca.pem", "--auth-token-file",
                      self.token_file], os.path.join(self.tmp, "launch.log"), mpirun_np=3)
        self.procs.append(p)
        server = cu.wait_for_file(addr_file, 120, [p])
        cu.wait_serving(server, flags=self.client)
        self.assertEqual(self.submit(server, self.client), self.f.greedy)
        self.check_outsiders(server)
        # Holding the secret file of the standalone case means nothing here: the secret is per job.
        self.assertEqual(raw_call(server, "WorkerService/Register", c,
                                  [("x-expertmesh-worker-secret", read(self.secret_file).decode().strip())])[0],
                         "PERMISSION_DENIED")
        self.shutdown_with(server, [p])

    def shutdown_with(self, server, procs):
        cu.run(["shutdown", "--server", server, *self.client], timeout=90)
        for p in procs:
            try:
                rc = p.wait(timeout=60)
            except Exception:
                self.fail("process did not exit after shutdown:\n" + cu.read_log(p))
            self.assertEqual(rc, 0, cu.read_log(p))


if __name__ == "__main__":
    unittest.main(verbosity=2)
