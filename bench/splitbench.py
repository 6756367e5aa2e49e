"""PVC to Bound through a real control plane, per-node shape against the split shape, on a partition pool.

One storage node (no kubelet) with a partition pool on one sparse loop disk; the real kube-apiserver, scheduler,
controller-manager and external-provisioner (tests/k8s/controlplane.py). For each shape the same claims are made:
one at a time (BENCH_SPLIT_REPEATS times), then BENCH_SPLIT_CLAIMS at once, each with a pod so that
WaitForFirstConsumer lets the scheduler pick the node. Measured per claim: from its creation until the API shows it
Bound (polled every 50 ms); p50/p95 per case, and the split's time over the per-node shape's.

- per-node: `localdisk serve` (all roles) with external-provisioner --node-deployment beside it (today's peers'
  shape and localdisk's before the split);
- split: `serve --role node` (node agent) and `serve --role controller` behind a central external-provisioner; every
  CreateVolume is a LocalVolume object carried out by the node agent.

Needs root (loop devices) and the control-plane binaries (`bash ../shared/k8s/unpack.sh`). Output: a table, and JSON
to the path given as the first argument (default bench-split.json). Nothing here asserts a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from common import log, ms, pct

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from localdisk.k8s import DRIVER_NAME
from localdisk.sizes import GiB, MiB
from tests.k8s import controlplane
from tests.k8s.controlplane import NAMESPACE, ControlPlane, localdisk_command, wait_for

DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "deploy"
CLASS = "bench"
CLAIM = 64 * MiB
NODE = "n1"
Obj = dict[str, Any]
KEEP: list[Any] = []


@contextlib.contextmanager
def loop_disk(size: int) -> Iterator[str]:
    work = Path(tempfile.mkdtemp(prefix="localdisk-loop-"))
    image = work / "disk.img"
    with image.open("wb") as handle:
        handle.truncate(size)
    device = subprocess.run(
        ["losetup", "--find", "--show", "--partscan", "--", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
        shutil.rmtree(work, ignore_errors=True)


def deploy(name: str) -> list[Obj]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def start(plane: ControlPlane, shape: str, disk: str) -> None:
    api = plane.admin
    api.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    docs = deploy("crds.yaml") + [
        d
        for name in ("clusterrole.yaml", "clusterrolebinding.yaml", "role.yaml", "rolebinding.yaml", "csidriver.yaml")
        for d in deploy(name)
    ]
    for doc in docs:
        api.apply(doc)
    api.apply(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": CLASS},
            "provisioner": DRIVER_NAME,
            "volumeBindingMode": "WaitForFirstConsumer",
            "parameters": {"backend": "partition"},
        }
    )
    plane.register_node(NODE)
    pool = f'[pools.partition.default]\ndefault = true\ndisks = ["{disk}"]\nadopt = "never"\n'
    common = [
        "--strict-topology=true",
        "--immediate-topology=false",
        "--enable-capacity=true",
        "--capacity-ownerref-level=-1",
        "--capacity-poll-interval=1s",
        "--timeout=60s",
        "--worker-threads=50",
    ]
    env = {**os.environ, "NAMESPACE": NAMESPACE, "NODE_NAME": NODE, "POD_NAME": "localdisk-bench"}
    if shape == "per-node":
        socket = plane.serve_node(NODE, {}, pool_config=pool)
        args = [
            "--node-deployment=true",
            "--node-deployment-immediate-binding=false",
            f"--kubeconfig={plane.kubeconfig}",
        ]
    else:
        plane.serve_node(NODE, {}, ("--role=node", f"--kubeconfig={plane.node_kubeconfig}"), pool_config=pool)
        socket = plane.work / "controller.sock"
        controller = plane._start(
            "localdisk-controller",
            [
                localdisk_command(),
                "serve",
                "--role=controller",
                f"--kubeconfig={plane.controller_kubeconfig}",
                f"--endpoint=unix://{socket}",
                "--log-format=text",
                "--log-level=warning",
            ],
        )
        plane._wait_up(controller, "the controller", socket.exists, 60)
        args = ["--leader-election=false", f"--kubeconfig={plane.controller_kubeconfig}"]
    plane._start(
        "csi-provisioner", [str(plane.bin_dir / "csi-provisioner"), f"--csi-address={socket}", *common, *args], env
    )
    config = {"apiVersion": "kubescheduler.config.k8s.io/v1", "kind": "KubeSchedulerConfiguration"}
    scheduler = plane.scheduler(config, feature_gates=None)
    KEEP.append(scheduler)  # an unreferenced context manager would be collected, and stop the scheduler with it
    scheduler.__enter__()

    def capacity() -> bool:
        listed = api.get(f"/apis/storage.k8s.io/v1/namespaces/{NAMESPACE}/csistoragecapacities")["items"]
        return any(i["storageClassName"] == CLASS and i.get("capacity") not in (None, "0") for i in listed)

    wait_for("the node's capacity", lambda: capacity() or None, 120)


def claims_at_once(api: controlplane.Api, prefix: str, count: int) -> list[float]:
    """Create `count` claims (each with a pod) at once; seconds from each claim's creation to its Bound."""
    base = "/api/v1/namespaces/default"
    created: dict[str, float] = {}
    for index in range(count):
        name = f"{prefix}-{index}"
        api.create(
            f"{base}/persistentvolumeclaims",
            {
                "metadata": {"name": name},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": CLASS,
                    "resources": {"requests": {"storage": str(CLAIM)}},
                },
            },
        )
        created[name] = time.monotonic()
        api.create(
            f"{base}/pods",
            {
                "metadata": {"name": name},
                "spec": {
                    "containers": [{"name": "app", "image": "busybox"}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": name}}],
                },
            },
        )
    bound: dict[str, float] = {}
    deadline = time.monotonic() + 600
    while len(bound) < count and time.monotonic() < deadline:
        for claim in api.get(f"{base}/persistentvolumeclaims")["items"]:
            name = claim["metadata"]["name"]
            if name in created and name not in bound and claim["status"].get("phase") == "Bound":
                bound[name] = time.monotonic()
        time.sleep(0.05)
    if len(bound) < count:
        raise TimeoutError(f"{count - len(bound)} of {count} claims not bound in 600 s")
    for name in created:
        api.delete(f"{base}/pods/{name}", {"gracePeriodSeconds": 0})
        api.delete(f"{base}/persistentvolumeclaims/{name}")
    wait_for("every PV to be deleted", lambda: not api.get("/api/v1/persistentvolumes")["items"] or None, 600)
    return [bound[n] - created[n] for n in created]


def run_shape(shape: str, disk: str, repeats: int, count: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"localdisk-bench-{shape}-"))
    plane = ControlPlane(work, controlplane.kube_bin_dir())
    try:
        plane.start()
        start(plane, shape, disk)
        single = [claims_at_once(plane.admin, f"one{i}", 1)[0] for i in range(repeats)]
        log(f"{shape}: 1 claim x{repeats}: p50 {ms(pct(single, 0.5))} ms")
        burst = claims_at_once(plane.admin, "many", count)
        log(f"{shape}: {count} claims at once: p50 {ms(pct(burst, 0.5))} ms, p95 {ms(pct(burst, 0.95))} ms")
        return {
            "one": {
                "p50_ms": ms(pct(single, 0.5)),
                "p95_ms": ms(pct(single, 0.95)),
                "runs": repeats,
                "seconds": single,
            },
            "burst": {"p50_ms": ms(pct(burst, 0.5)), "p95_ms": ms(pct(burst, 0.95)), "claims": count, "seconds": burst},
        }
    finally:
        for scheduler in KEEP:
            scheduler.__exit__(None, None, None)
        KEEP.clear()
        plane.stop()
        if not os.environ.get("BENCH_SPLIT_KEEP"):  # set it to read the processes' logs afterwards
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    missing = controlplane.missing()
    if missing:
        sys.exit(f"splitbench: {missing}")
    repeats = int(os.environ.get("BENCH_SPLIT_REPEATS", "5"))
    count = int(os.environ.get("BENCH_SPLIT_CLAIMS", "50"))
    results: dict[str, Any] = {}
    with loop_disk(count * CLAIM + 1 * GiB) as disk:
        for shape in os.environ.get("BENCH_SPLIT_SHAPES", "per-node,split").split(","):
            subprocess.run(["wipefs", "--all", "--quiet", disk], check=True)  # each shape starts from a blank disk
            results[shape] = run_shape(shape, disk, repeats, count)
    if len(results) < 2:
        print(json.dumps(results, indent=2))
        return
    print()
    print(f"PVC to Bound (partition pool, {CLAIM // MiB} MiB claims), ms")
    print(f"{'case':<22}{'per-node p50/p95':>20}{'split p50/p95':>18}{'split/per-node p50':>22}")
    for case, label in (("one", "1 claim"), ("burst", f"{count} claims at once")):
        before, after = results["per-node"][case], results["split"][case]
        ratio = after["p50_ms"] / before["p50_ms"] if before["p50_ms"] else float("nan")
        print(
            f"{label:<22}{before['p50_ms']:>11}/{before['p95_ms']:<8}{after['p50_ms']:>9}/{after['p95_ms']:<8}"
            f"{ratio:>18.2f}"
        )
    out = sys.argv[1] if len(sys.argv) > 1 else "bench-split.json"
    Path(out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
