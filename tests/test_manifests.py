"""The deployment manifests: valid against the Kubernetes schemas, and consistent with what the code accepts.

Schemas: kubernetes-validate ships the OpenAPI-derived JSON schemas of each Kubernetes release (strict mode: unknown
fields are errors). The VolumeSnapshotClass is a CRD, validated against the CRD's own openAPIV3Schema, vendored in
tests/data/schemas from external-snapshotter. Cross-references: the driver name, socket paths, kubelet directory,
the ConfigMap (parsed by `localdisk.config.parse`), StorageClass parameters, RBAC names, the CLI options the
manifests pass, and the host tools the container image installs.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml

from localdisk import config, registry
from localdisk.cli import app
from localdisk.csi import DRIVER_NAME
from localdisk.csi.validate import KNOWN_PARAMETERS, PASSTHROUGH_PREFIXES
from tests.k8s.controlplane import kube_bin_dir

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "examples" / "deploy"
CONTAINERFILE = ROOT / "examples" / "Containerfile"
SNAPSHOT_CLASS_CRD = Path(__file__).parent / "data" / "schemas" / "snapshot.storage.k8s.io_volumesnapshotclasses.yaml"
OLDEST_SUPPORTED = "1.34"  # the sidecars' floor: external-provisioner 6 and external-resizer 2 need Kubernetes 1.34
NEWEST = kubernetes_validate.latest_version()
CRD_KINDS = {"VolumeSnapshotClass"}

Obj = dict[str, Any]


def load(name: str) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def manifest_files() -> list[str]:
    return sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def all_objects() -> Iterator[tuple[str, Obj]]:
    for name in manifest_files():
        for obj in load(name):
            yield name, obj


def one(kind: str, name: str | None = None) -> Obj:
    found = [o for _, o in all_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ids(pairs: list[tuple[str, Obj]]) -> list[str]:
    return [f"{f}:{o['kind']}/{o['metadata']['name']}" for f, o in pairs]


BUILTIN_OBJECTS = [(f, o) for f, o in all_objects() if o["kind"] not in CRD_KINDS]


# -- schemas ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [OLDEST_SUPPORTED, NEWEST])
@pytest.mark.parametrize(("filename", "obj"), BUILTIN_OBJECTS, ids=ids(BUILTIN_OBJECTS))
def test_object_is_valid_for_kubernetes(filename: str, obj: Obj, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        pytest.fail(f"{filename}: {what} is invalid for Kubernetes {version}: {where}: {exc.message}")


def strict(schema: Any) -> Any:
    """A CRD's structural schema as the API server prunes it: fields it does not declare are not kept."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def test_volume_snapshot_class_matches_the_crd() -> None:
    crd = next(d for d in yaml.safe_load_all(SNAPSHOT_CLASS_CRD.read_text()) if d)
    obj = one("VolumeSnapshotClass")
    group, version = obj["apiVersion"].split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == obj["kind"]
    served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
    assert version in served, f"{obj['apiVersion']} is not served by the CRD"
    schema = strict(served[version]["schema"]["openAPIV3Schema"])
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    bad = dict(obj, unknownField=1)
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(bad)), "the strict schema rejects unknown fields"


# -- layout ----------------------------------------------------------------------------------------------------------
def test_kustomization_lists_every_file_once_namespace_first() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert sorted(resources) == manifest_files()
    assert len(set(resources)) == len(resources)
    assert resources[0] == "namespace.yaml"
    for name in manifest_files():
        kinds = {o["kind"] for o in load(name)}
        assert len(kinds) == 1, f"{name} mixes kinds {kinds}: one file per object kind"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_builds_the_same_objects() -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(DEPLOY)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    objects = [d for d in yaml.safe_load_all(built) if d]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in objects) == sorted(
        (o["kind"], o["metadata"]["name"]) for _, o in all_objects()
    )
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "localdisk"


def test_namespaced_objects_are_in_the_localdisk_namespace() -> None:
    namespace = one("Namespace")["metadata"]["name"]
    cluster_scoped = {
        "Namespace",
        "CSIDriver",
        "ClusterRole",
        "ClusterRoleBinding",
        "StorageClass",
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        *CRD_KINDS,
    }
    for filename, obj in all_objects():
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"].get("namespace") == namespace, f"{filename}: {obj['metadata']['name']}"


# -- cross-references with the code ---------------------------------------------------------------------------------
def node_config_text() -> str:
    text: str = one("ConfigMap", "localdisk-config")["data"]["config.toml"]
    return text


def node_config_data() -> dict[str, Any]:
    return tomllib.loads(node_config_text())


def backend_available(backend: str) -> bool:
    module = registry.BUILTIN[backend].partition(":")[0]
    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize("backend", ["lvm", "thin", "partition"])
def test_configmap_pools_parse(backend: str) -> None:
    data = node_config_data()
    assert backend in data["pools"], f"the ConfigMap has no [pools.{backend}.*] table"
    if not backend_available(backend):
        pytest.skip(
            f"backend {backend!r} ({registry.BUILTIN[backend]}) is not in this build yet: cannot parse its pools"
        )
    parsed = config.parse({"node": data["node"], "pools": {backend: data["pools"][backend]}}, "configmap.yaml")
    assert {p.backend for p in parsed.pools} == {backend}
    assert parsed.default_pool(backend) is not None


def test_configmap_node_settings_parse() -> None:
    data = node_config_data()
    settings = config.parse({"node": data["node"]}, "configmap.yaml").node
    assert settings.kubelet_dir == "/var/lib/kubelet"


def test_storage_classes_use_known_parameters_and_configured_pools() -> None:
    data = node_config_data()
    classes = [o for _, o in all_objects() if o["kind"] == "StorageClass"]
    assert {c["parameters"]["backend"] for c in classes} == {"lvm", "thin", "partition"}
    for sc in classes:
        name = sc["metadata"]["name"]
        assert sc["provisioner"] == DRIVER_NAME
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer", name
        assert sc["allowVolumeExpansion"] is True, name
        unknown = [k for k in sc["parameters"] if k not in KNOWN_PARAMETERS and not k.startswith(PASSTHROUGH_PREFIXES)]
        assert not unknown, f"{name}: parameters the driver refuses: {unknown}"
        backend = sc["parameters"]["backend"]
        assert backend in registry.BUILTIN
        pools = data["pools"][backend]
        pool = sc["parameters"].get("pool")
        if pool is None:
            defaults = [p for p in pools.values() if p.get("default")]
            # One default per node: one pool, or each default for a node group (for_node checks the overlaps).
            assert (
                len(defaults) == 1 or len(pools) == 1 or all(p.get("node_labels") or p.get("nodes") for p in defaults)
            ), name
        else:
            assert pool in pools, f"{name}: pool {pool!r} is not in the ConfigMap"


def test_csidriver_and_snapshot_class() -> None:
    driver = one("CSIDriver")
    assert driver["metadata"]["name"] == DRIVER_NAME
    spec = driver["spec"]
    assert spec["attachRequired"] is False
    assert spec["storageCapacity"] is True
    assert spec["podInfoOnMount"] is True
    assert spec["fsGroupPolicy"] == "File"
    assert one("VolumeSnapshotClass")["driver"] == DRIVER_NAME


def containers(workload: Obj) -> dict[str, Obj]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def flags(container: Obj) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container.get("args", []) if a.startswith("--"))


def mounts(container: Obj) -> dict[str, Obj]:
    return {m["name"]: m for m in container.get("volumeMounts", [])}


def volumes(workload: Obj) -> dict[str, Obj]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}


def cli_accepts(command: str, args: list[str]) -> None:
    """Parse `args` with the real `localdisk <command>` options (raises on an unknown option or a bad value)."""
    commands: dict[str, Any] = getattr(typer.main.get_command(app), "commands")  # noqa: B009 - typer's own click
    commands[command].make_context(command, list(args))


def test_daemonset_wiring() -> None:
    ds = one("DaemonSet", "localdisk-node")
    pod = ds["spec"]["template"]["spec"]
    all_containers = containers(ds)
    plugin = all_containers["localdisk"]
    assert plugin["args"][0] == "serve"
    cli_accepts("serve", plugin["args"][1:])
    opts = flags(plugin)
    assert opts["role"] == "node"
    assert opts["node-id"] == "$(NODE_NAME)"
    node_name = next(e for e in plugin["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert plugin["securityContext"]["privileged"] is True

    # the socket: one path for the server and every sidecar, and its host path for kubelet
    socket = opts["endpoint"].removeprefix("unix://")
    socket_dir = str(Path(socket).parent)
    assert mounts(plugin)["socket-dir"]["mountPath"] == socket_dir
    host_socket_dir = volumes(ds)["socket-dir"]["hostPath"]["path"]
    kubelet_dir = next(e["value"] for e in plugin["env"] if e["name"] == "KUBELET_DIR")
    assert kubelet_dir == node_config_data()["node"]["kubelet_dir"], "the ConfigMap's default agrees"
    assert host_socket_dir == f"{kubelet_dir}/plugins/{DRIVER_NAME}"
    sidecars = {n: c for n, c in all_containers.items() if n != "localdisk"}
    assert set(sidecars) == {"node-driver-registrar", "liveness-probe"}, "the other sidecars run centrally"
    for name, sidecar in sidecars.items():
        assert flags(sidecar)["csi-address"] == socket, name
        assert mounts(sidecar)["socket-dir"]["mountPath"] == socket_dir, name
        assert re.fullmatch(r"registry\.k8s\.io/sig-storage/[a-z-]+:v\d+\.\d+\.\d+", sidecar["image"]), name
    registrar = flags(sidecars["node-driver-registrar"])
    assert registrar["kubelet-registration-path"] == "$(KUBELET_REGISTRATION_PATH)"
    registration = next(
        e["value"] for e in sidecars["node-driver-registrar"]["env"] if e["name"] == "KUBELET_REGISTRATION_PATH"
    )
    assert registration == f"{host_socket_dir}/{Path(socket).name}"
    assert volumes(ds)["registration-dir"]["hostPath"]["path"] == f"{kubelet_dir}/plugins_registry"

    # the kubelet directory, where staging and publish targets are mounted
    kubelet = mounts(plugin)["kubelet-dir"]
    assert kubelet["mountPath"] == kubelet_dir == volumes(ds)["kubelet-dir"]["hostPath"]["path"]
    assert kubelet["mountPropagation"] == "Bidirectional"

    # the node config
    config_mount = mounts(plugin)["config"]
    assert str(Path(opts["config"]).parent) == config_mount["mountPath"]
    assert volumes(ds)["config"]["configMap"]["name"] == "localdisk-config"
    assert Path(opts["config"]).name in one("ConfigMap", "localdisk-config")["data"]

    # liveness: the plugin's probe port is the livenessprobe sidecar's endpoint
    port = next(p for p in plugin["ports"] if p["name"] == plugin["livenessProbe"]["httpGet"]["port"])
    assert flags(sidecars["liveness-probe"])["http-endpoint"] == f":{port['containerPort']}"
    assert pod["serviceAccountName"] == "localdisk-node"


def test_controller_deployment_wiring() -> None:
    deployment = one("Deployment", "localdisk-controller")
    controller = containers(deployment)["controller"]
    assert controller["args"][0] == "controller"
    cli_accepts("controller", controller["args"][1:])
    opts = flags(controller)
    assert deployment["spec"]["replicas"] >= 2, "leader election is there so that a second replica can wait"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in controller["env"]}
    assert env == {"POD_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    probe_port = controller["livenessProbe"]["httpGet"]["port"]
    assert next(p for p in controller["ports"] if p["name"] == probe_port)["containerPort"] == int(opts["http-port"])
    lease_rules = [
        r for r in one("Role", "localdisk-controller")["rules"] if "leases" in r["resources"] and "update" in r["verbs"]
    ]
    assert lease_rules, "the Lease lives in the controller's namespace"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "localdisk-controller"

    # the CSI controller behind the sidecars in central mode, each leader-elected, on one socket
    all_containers = containers(deployment)
    plugin = all_containers["csi-plugin"]
    assert plugin["args"][0] == "serve"
    cli_accepts("serve", plugin["args"][1:])
    assert flags(plugin)["role"] == "controller"
    socket = flags(plugin)["endpoint"].removeprefix("unix://")
    sidecars = {n: c for n, c in all_containers.items() if n not in ("csi-plugin", "controller")}
    assert set(sidecars) == {"csi-provisioner", "csi-resizer", "csi-snapshotter", "liveness-probe"}
    for name, sidecar in sidecars.items():
        assert flags(sidecar)["csi-address"] == socket, name
        assert mounts(sidecar)["socket-dir"]["mountPath"] == str(Path(socket).parent), name
        assert "node-deployment" not in flags(sidecar), f"{name} runs in central mode"
        if name != "liveness-probe":
            assert flags(sidecar)["leader-election"] == "true", name
    provisioner = flags(sidecars["csi-provisioner"])
    assert provisioner["enable-capacity"] == "true" and provisioner["strict-topology"] == "true"
    assert {e["name"] for e in sidecars["csi-provisioner"]["env"]} >= {"NAMESPACE", "POD_NAME"}
    assert flags(sidecars["csi-resizer"])["handle-volume-inuse-error"] == "false", "no rights on pods needed"


def test_bindings_point_at_existing_roles_and_accounts() -> None:
    accounts = {
        (o["metadata"]["namespace"], o["metadata"]["name"]) for _, o in all_objects() if o["kind"] == "ServiceAccount"
    }
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        for _, binding in all_objects():
            if binding["kind"] != binding_kind:
                continue
            one(role_kind, binding["roleRef"]["name"])
            for subject in binding["subjects"]:
                assert (subject["namespace"], subject["name"]) in accounts


def test_no_wildcards_in_rbac() -> None:
    for _, obj in all_objects():
        for rule in obj.get("rules", []):
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), f"{obj['metadata']['name']}: wildcard {key}"


def test_containerfile_installs_the_tools_and_runs_localdisk() -> None:
    text = CONTAINERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["localdisk"\]$', text, re.MULTILINE)
    runtime = text.split("FROM ")[-1]
    installed = set(
        re.findall(r"[a-z0-9][a-z0-9.+-]+", runtime.split("install -y --no-install-recommends", 1)[1].split("&&")[0])
    )
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    listed = re.search(r"DEBIAN_PACKAGES=\(\s*(.*?)\s*\)", bootstrap, re.DOTALL)
    assert listed is not None
    development_only = {"python3-venv", "python3-pip", "user-mode-linux"}
    needed = set(listed.group(1).split()) - development_only
    assert needed <= installed, f"the image lacks host tools the project installs: {sorted(needed - installed)}"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists(), f"Containerfile copies {path}, which is not in the repository"


def test_the_kubelet_directory_is_one_setting(tmp_path: Path) -> None:
    """Changing KUBELET_DIR of the node plugin moves every host path, mount and registration path under it."""
    kubectl = shutil.which("kubectl") or str(kube_bin_dir() / "kubectl")
    if not Path(kubectl).is_file():
        pytest.skip("kubectl not found (bash ../shared/k8s/unpack.sh)")
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    daemonset = copy / "daemonset.yaml"
    text = daemonset.read_text()
    assert text.count("value: /var/lib/kubelet\n") == 1
    daemonset.write_text(text.replace("value: /var/lib/kubelet\n", "value: /var/lib/k0s/kubelet\n"))
    built = subprocess.run([kubectl, "kustomize", str(copy)], check=True, capture_output=True, text=True).stdout
    ds = next(d for d in yaml.safe_load_all(built) if d and d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert paths["kubelet-dir"] == "/var/lib/k0s/kubelet"
    assert paths["socket-dir"] == f"/var/lib/k0s/kubelet/plugins/{DRIVER_NAME}"
    assert paths["registration-dir"] == "/var/lib/k0s/kubelet/plugins_registry"
    by_name = {c["name"]: c for c in pod["containers"]}
    assert {m["name"]: m["mountPath"] for m in by_name["localdisk"]["volumeMounts"]}["kubelet-dir"] == paths[
        "kubelet-dir"
    ]
    registrar_env = {e["name"]: e["value"] for e in by_name["node-driver-registrar"]["env"]}
    assert registrar_env["KUBELET_REGISTRATION_PATH"] == f"{paths['socket-dir']}/csi.sock"
    assert "/var/lib/kubelet" not in yaml.safe_dump(ds).replace("kubelet_dir", "")
