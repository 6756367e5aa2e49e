"""The Kubernetes adapter: what localdisk does through the Kubernetes API rather than through CSI.

The CSI sidecars cover provisioning, resizing and snapshots. What they leave undone lives here: releasing the
claims of a node that was deleted (`nodeloss`), finding volumes on a node's disks that no PersistentVolume points to
(`orphans`), and the leader election (`leader`) and watch plumbing (`watch`) the cluster-wide `localdisk controller`
runs on. This package talks to the API server with kubernetes-asyncio and never speaks gRPC, so the names the CSI
layer defines are repeated here and a test keeps both in step.
"""

import os

DRIVER_NAME = "localdisk.csi.io"
"""Must equal `localdisk.csi.DRIVER_NAME`: PersistentVolumes carry it in `spec.csi.driver`."""
TOPOLOGY_KEY = "topology.localdisk.io/node"
"""Must equal `localdisk.csi.TOPOLOGY_KEY`: PersistentVolumes name their node through it in `spec.nodeAffinity`."""

RELEASE_ON_NODE_LOSS = "localdisk.csi.io/release-on-node-loss"
"""Annotation on a StorageClass or a PVC; `"false"` keeps the claims of a deleted node (the PVC's value wins)."""
NODE_LOST_SINCE = "localdisk.csi.io/node-lost-since"
"""Put on a PV by `localdisk controller` when its node is first seen gone (a wire time): the grace period counts
from it, across restarts and fail-overs; removed again when the node comes back."""
PROVISIONER_FINALIZER = "external-provisioner.volume.kubernetes.io/finalizer"
"""Put on PVs by the external-provisioner; only the provisioner of the PV's own node would ever remove it."""
COMPONENT = "localdisk-controller"


def in_cluster() -> bool:
    """Whether this process runs in a pod (the API address is in its environment). Here, not in `client`, so that
    `localdisk serve` can ask without importing kubernetes-asyncio (about a second of start-up)."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
