"""Builders for the API objects the tests put into the fake server, shaped as the real cluster makes them."""

from __future__ import annotations

from typing import Any

from localdisk.k8s import DRIVER_NAME, PROVISIONER_FINALIZER, TOPOLOGY_KEY

Obj = dict[str, Any]


def node(name: str) -> Obj:
    return {"metadata": {"name": name, "labels": {TOPOLOGY_KEY: name}}}


def storage_class(name: str, annotations: dict[str, str] | None = None) -> Obj:
    return {
        "metadata": {"name": name, "annotations": annotations or {}},
        "provisioner": DRIVER_NAME,
        "volumeBindingMode": "WaitForFirstConsumer",
    }


def claim(namespace: str, name: str, volume: str = "", annotations: dict[str, str] | None = None) -> Obj:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": annotations or {},
            "finalizers": ["kubernetes.io/pvc-protection"],
        },
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
            "storageClassName": "localdisk-lvm",
            **({"volumeName": volume} if volume else {}),
        },
    }


def volume(
    name: str,
    node_name: str,
    *,
    bound_to: Obj | None = None,
    driver: str = DRIVER_NAME,
    handle: str | None = None,
    storage_class_name: str = "localdisk-lvm",
    reclaim_policy: str = "Delete",
    finalizers: tuple[str, ...] = ("kubernetes.io/pv-protection", PROVISIONER_FINALIZER),
) -> Obj:
    """A PV as the external-provisioner makes it: CSI source, node affinity, claimRef to the bound PVC."""
    spec: Obj = {
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteOnce"],
        "persistentVolumeReclaimPolicy": reclaim_policy,
        "storageClassName": storage_class_name,
        "csi": {"driver": driver, "volumeHandle": handle or f"lvm:ssd:{name}", "fsType": "ext4"},
        "nodeAffinity": {
            "required": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": TOPOLOGY_KEY, "operator": "In", "values": [node_name]}]}
                ]
            }
        },
    }
    if bound_to is not None:
        meta = bound_to["metadata"]
        spec["claimRef"] = {
            "kind": "PersistentVolumeClaim",
            "apiVersion": "v1",
            "namespace": meta["namespace"],
            "name": meta["name"],
            "uid": meta["uid"],
        }
    return {"metadata": {"name": name, "finalizers": list(finalizers)}, "spec": spec}


def pending_claim(namespace: str, name: str, selected_node: str, provisioner: str = DRIVER_NAME) -> Obj:
    """A WaitForFirstConsumer claim the scheduler chose `selected_node` for, not provisioned yet."""
    found = claim(namespace, name)
    found["metadata"]["annotations"] = {
        "volume.kubernetes.io/selected-node": selected_node,
        "volume.kubernetes.io/storage-provisioner": provisioner,
    }
    return found


def capacity(name: str, node_name: str, *, driver: str = DRIVER_NAME, namespace: str = "localdisk") -> Obj:
    """A CSIStorageCapacity as the external-provisioner publishes it for one node and class."""
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"csi.storage.k8s.io/drivername": driver}},
        "nodeTopology": {"matchLabels": {TOPOLOGY_KEY: node_name}},
        "storageClassName": "localdisk-lvm",
        "capacity": "1Gi",
    }


def snapshot_content(name: str, node_name: str, *, driver: str = DRIVER_NAME) -> Obj:
    """A VolumeSnapshotContent made with distributed snapshotting: labelled with the node that holds its data."""
    return {
        "metadata": {
            "name": name,
            "labels": {"snapshot.storage.kubernetes.io/managed-by": node_name},
            "finalizers": ["snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection"],
        },
        "spec": {
            "driver": driver,
            "deletionPolicy": "Delete",
            "source": {"volumeHandle": f"thin:ssd:{name}"},
            "volumeSnapshotRef": {"namespace": "apps", "name": f"snap-{name}"},
        },
    }
