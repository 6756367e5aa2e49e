"""The `localdisk` command. Heavy modules are imported inside commands so `--help` stays fast."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Annotated, Any

import typer

from localdisk.commands.csi_client import csi_app
from localdisk.commands.demo import demo
from localdisk.commands.doctor import doctor
from localdisk.commands.volumes import capacity, snapshot_app, volume_app

if TYPE_CHECKING:
    from localdisk.metrics import Metrics

app = typer.Typer(help="localdisk: a CSI driver for node-local disks.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from localdisk.csi.identity import driver_version

        typer.echo(f"localdisk {driver_version()}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    """localdisk: dynamically provisioned, capacity-aware local volumes for Kubernetes."""
    ctx.meta["debug"] = debug
    if ctx.invoked_subcommand not in ("serve", "controller", "scheduler-extender"):
        from localdisk import logs

        logs.configure("debug" if debug else "warning")


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def serve(
    endpoint: Annotated[str, typer.Option(envvar="CSI_ENDPOINT", help="unix:///path/to/csi.sock")] = (
        "unix:///csi/csi.sock"
    ),
    node_id: Annotated[str, typer.Option(envvar="NODE_ID", help="This node's name (Kubernetes node name).")] = "",
    config: Annotated[str | None, typer.Option(envvar="LOCALDISK_CONFIG", help="Node config (TOML).")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(help="json (for log collectors) or text.")] = "json",
    metrics_address: Annotated[
        str | None, typer.Option(envvar="METRICS_ADDRESS", help="Serve Prometheus metrics on HOST:PORT.")
    ] = None,
    orphan_report: Annotated[
        bool | None,
        typer.Option(help="Report volumes with no PV as a metric and Node events (default: when in a cluster)."),
    ] = None,
    orphan_delete_after: Annotated[
        float | None,
        typer.Option(help="Delete an orphan this many seconds after it was reported (default: never delete)."),
    ] = None,
    node_labels: Annotated[
        str | None,
        typer.Option(
            envvar="NODE_LABELS",
            help="This node's labels as k=v,k=v, for pools that select nodes by label (default: read from the"
            " Node object in a cluster).",
        ),
    ] = None,
    role: Annotated[
        str,
        typer.Option(
            envvar="LOCALDISK_ROLE",
            help="all: Identity, Controller and Node in one process, without Kubernetes. node: Identity and Node"
            " plus the node agent (DaemonSet). controller: Identity and Controller over custom resources"
            " (Deployment).",
        ),
    ] = "all",
    kubeconfig: Annotated[
        str | None, typer.Option(help="Kubeconfig for --role node/controller outside a pod (default: in-cluster).")
    ] = None,
    kubelet_dir: Annotated[
        str | None,
        typer.Option(envvar="KUBELET_DIR", help="kubelet's root directory; overrides node.kubelet_dir of the config."),
    ] = None,
    adopt: Annotated[
        bool,
        typer.Option(
            envvar="LOCALDISK_ADOPT",
            help="--role node: at start, make a LocalVolume for every volume on this node's disks that none points"
            " to (moving from the per-node shape).",
        ),
    ] = False,
) -> None:
    """Run the CSI server on a unix socket, in one of three roles (--role)."""
    import anyio

    from localdisk import config as node_config
    from localdisk import logs
    from localdisk.csi.server import serve as run_server
    from localdisk.errors import LocalDiskError
    from localdisk.manager import VolumeManager
    from localdisk.metrics import Metrics
    from localdisk.runner import CommandRunner

    if role not in ("all", "node", "controller"):
        raise fail(f"--role must be all, node or controller, not {role!r}", 2)
    logs.configure(log_level, json_format=log_format == "json")
    log = logging.getLogger("localdisk")
    if role != "all":
        logging.getLogger("kubernetes_asyncio").setLevel(logging.INFO)  # its debug lines are whole response bodies
    try:
        if role == "controller":
            from localdisk.csi.roles import run_controller

            cfg = node_config.load(config) if config else node_config.NodeConfig()
            anyio.run(run_controller, kubeconfig, endpoint, cfg, Metrics(), metrics_address)
            return
        if config:
            cfg = node_config.load(config)
        else:
            cfg = node_config.development_default()
            log.warning("no --config given: serving one in-memory 'fake' pool (development only, data is not kept)")
        if kubelet_dir:
            cfg = cfg.with_kubelet_dir(kubelet_dir)
        node = node_id or socket.gethostname()
        every_pool = cfg
        if any(p.config.nodes or p.config.node_labels for p in cfg.pools):
            labels = _parse_labels(node_labels) if node_labels is not None else _labels_from_cluster(node, kubeconfig)
            cfg = cfg.for_node(node, labels)
            log.info("pools of node %s: %s", node, ", ".join(f"{p.backend}/{p.name}" for p in cfg.pools) or "none")
        metrics = Metrics()
        manager = VolumeManager.from_config(cfg, CommandRunner(observers=[metrics.observe_command]))
        if role == "node":
            from localdisk.csi.roles import run_node

            report = orphan_report is not False
            args = (
                kubeconfig,
                manager,
                node,
                endpoint,
                metrics,
                metrics_address,
                cfg,
                report,
                orphan_delete_after,
                adopt,
                every_pool if node_labels is None else None,  # labels given on the command line stay as given
            )
            anyio.run(run_node, *args)
            return
        background = _orphan_reporter(node, orphan_report, orphan_delete_after, metrics) + _pool_events(node)
        anyio.run(run_server, manager, node, endpoint, metrics, metrics_address, cfg, background)
    except LocalDiskError as exc:
        raise fail(exc.message) from None
    except KeyboardInterrupt:
        pass


@app.command()
def controller(
    namespace: Annotated[
        str, typer.Option(envvar="POD_NAMESPACE", help="Namespace of the leader-election Lease.")
    ] = "localdisk",
    identity: Annotated[
        str, typer.Option(envvar="POD_NAME", help="This replica's name in the Lease (default: host name).")
    ] = "",
    lease_name: Annotated[str, typer.Option(help="Name of the Lease the replicas compete for.")] = (
        "localdisk-controller"
    ),
    resync_period: Annotated[float, typer.Option(help="Seconds between full node-loss passes.", min=1)] = 300.0,
    node_loss_grace_period: Annotated[
        float,
        typer.Option(
            help="Seconds a deleted Node must stay gone before its claims are released (a Node that comes back"
            " cancels it); 0 releases at once.",
            min=0,
        ),
    ] = 600.0,
    node_loss_dry_run: Annotated[
        bool,
        typer.Option(
            "--node-loss-dry-run",
            help="Only report (Events, logs, localdisk_node_loss_dry_run_actions_total) what node loss would release.",
        ),
    ] = False,
    http_port: Annotated[int, typer.Option(help="Port for /healthz and /metrics; 0 turns them off.")] = 8080,
    kubeconfig: Annotated[
        str | None, typer.Option(help="Kubeconfig to use outside a pod (default: in-cluster, then $KUBECONFIG).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(help="json (for log collectors) or text.")] = "json",
) -> None:
    """Run the cluster-wide controller: releases the claims of deleted nodes after a grace period; one replica leads
    (Lease)."""
    import anyio

    from localdisk import logs
    from localdisk.errors import LocalDiskError
    from localdisk.k8s.cluster import LostNodeObjects
    from localdisk.k8s.controller import ControllerSettings, main
    from localdisk.k8s.leader import LeadershipLost

    logs.configure(log_level, json_format=log_format == "json")
    settings = ControllerSettings(
        namespace=namespace,
        identity=identity or socket.gethostname(),
        lease_name=lease_name,
        resync_period=resync_period,
        node_loss_grace_period=node_loss_grace_period,
        node_loss_dry_run=node_loss_dry_run,
        http_port=http_port,
        kubeconfig=kubeconfig,
    )
    try:
        anyio.run(main, settings, lambda api: [LostNodeObjects(api)])
    except LocalDiskError as exc:
        raise fail(exc.message) from None
    except LeadershipLost as exc:
        raise fail(f"{exc}; exiting so that a fresh start competes again") from None
    except KeyboardInterrupt:
        pass


@app.command("scheduler-extender")
def scheduler_extender(
    policy: Annotated[str, typer.Option(help="spread: most room left wins; pack: least room that fits wins.")] = (
        "spread"
    ),
    port: Annotated[int, typer.Option(help="Port for the extender verbs, /healthz and /readyz.")] = 8099,
    host: Annotated[str | None, typer.Option(help="Address to listen on (default: every interface).")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Refuse larger requests (413).", min=1024)] = 4 << 20,
    kubeconfig: Annotated[
        str | None, typer.Option(help="Kubeconfig to use outside a pod (default: in-cluster, then $KUBECONFIG).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(help="json (for log collectors) or text.")] = "json",
) -> None:
    """Serve kube-scheduler's extender verbs: score nodes by storage capacity left for the pod's claims."""
    import anyio

    from localdisk import logs
    from localdisk.errors import LocalDiskError
    from localdisk.k8s.extender import ExtenderSettings, Policy, main

    if policy not in {p.value for p in Policy}:
        raise fail(f"--policy must be spread or pack, not {policy!r}", 2)
    logs.configure(log_level, json_format=log_format == "json")
    logging.getLogger("kubernetes_asyncio").setLevel(logging.INFO)  # its debug lines are whole response bodies
    settings = ExtenderSettings(Policy(policy), host, port, max_body_bytes, kubeconfig)
    try:
        anyio.run(main, settings)
    except LocalDiskError as exc:
        raise fail(exc.message) from None
    except KeyboardInterrupt:
        pass


app.add_typer(volume_app, name="volume")
app.add_typer(snapshot_app, name="snapshot")
app.command("capacity")(capacity)
app.add_typer(csi_app, name="csi")
app.command("doctor")(doctor)
app.command("demo")(demo)


def _parse_labels(text: str) -> dict[str, str]:
    from localdisk.errors import ConfigError

    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--node-labels: {item[:64]!r} is not key=value")
        labels[key] = value
    return labels


def _labels_from_cluster(node: str, kubeconfig: str | None = None) -> dict[str, str]:
    """The node's labels from the API in a cluster (or the one `kubeconfig` names); outside one there are none
    (pools that select nodes by label then select none here, with a warning)."""
    from localdisk.k8s import in_cluster

    if not kubeconfig and not in_cluster():
        logging.getLogger("localdisk").warning(
            "some pools select nodes by label, but this is not a cluster and --node-labels is not given"
        )
        return {}
    import anyio

    from localdisk.k8s.client import node_labels

    return anyio.run(node_labels, node, kubeconfig)


def _pool_events(node: str) -> list[Any]:
    """In a cluster, pools going down and coming back become Events on this node's Node object."""
    from localdisk.k8s import in_cluster

    if not in_cluster():
        return []
    from localdisk.k8s.pools import report_pool_states
    from localdisk.manager import VolumeManager

    async def pool_events(manager: VolumeManager) -> None:
        await report_pool_states(manager, node)

    return [pool_events]


def _orphan_reporter(node: str, enabled: bool | None, delete_after: float | None, metrics: Metrics) -> list[Any]:
    """The orphan reporter as a background task of `serve`, when running in a cluster (or asked for)."""
    from localdisk.k8s import in_cluster

    if enabled is False or (enabled is None and not in_cluster()):
        return []
    from localdisk.k8s.orphans import OrphanSettings, report_orphans
    from localdisk.manager import VolumeManager

    settings = OrphanSettings(node, delete_after=delete_after)

    async def orphan_reporter(manager: VolumeManager) -> None:
        await report_orphans(manager, settings, registry=metrics.registry)

    return [orphan_reporter]


from localdisk.sandbox import sandbox_app  # noqa: E402 - light: typer and the standard library only

app.add_typer(sandbox_app, name="sandbox")

from localdisk.commands.lvmrepair import lvm_app  # noqa: E402 - light: typer; the LVM code loads when it runs

app.add_typer(lvm_app, name="lvm")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
