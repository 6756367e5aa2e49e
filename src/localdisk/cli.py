"""The `localdisk` command. Heavy modules are imported inside commands so `--help` stays fast."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Annotated

import typer

app = typer.Typer(help="localdisk: a CSI driver for node-local disks.", no_args_is_help=True)


def _version(value: bool) -> None:
    if value:
        from localdisk.csi.identity import driver_version

        typer.echo(f"localdisk {driver_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """localdisk: dynamically provisioned, capacity-aware local volumes for Kubernetes."""


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
) -> None:
    """Run the CSI server (Identity, Controller and Node) on a unix socket."""
    import anyio

    from localdisk import config as node_config
    from localdisk.csi.server import serve as run_server
    from localdisk.errors import LocalDiskError
    from localdisk.manager import VolumeManager

    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("localdisk")
    try:
        if config:
            cfg = node_config.load(config)
        else:
            cfg = node_config.development_default()
            log.warning("no --config given: serving one in-memory 'fake' pool (development only, data is not kept)")
        manager = VolumeManager.from_config(cfg)
        anyio.run(run_server, manager, node_id or socket.gethostname(), endpoint)
    except LocalDiskError as exc:
        raise fail(exc.message) from None
    except KeyboardInterrupt:
        pass


from localdisk.sandbox import sandbox_app  # noqa: E402 - light: typer and the standard library only

app.add_typer(sandbox_app, name="sandbox")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
