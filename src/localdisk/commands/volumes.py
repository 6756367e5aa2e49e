"""`localdisk volume|snapshot|capacity`: drive volumes straight through the library, no server needed.

Useful on a node to see what localdisk holds and to clean up by hand; every command opens the configured pools,
does one thing and closes them. Tests inject a `VolumeManager` through the Click context object.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
import typer

from localdisk.commands.output import emit_json, friendly_errors, plain, table
from localdisk.sizes import human, parse_size

if TYPE_CHECKING:
    from localdisk.crypt import Passphrase
    from localdisk.manager import VolumeManager
    from localdisk.model import Capacity

T = TypeVar("T")

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", envvar="LOCALDISK_CONFIG", help="Node config (TOML); default: an in-memory pool."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

volume_app = typer.Typer(
    help="Create, list, show, expand and delete volumes through the library.", no_args_is_help=True
)
snapshot_app = typer.Typer(help="Create, list and delete snapshots (thin pools).", no_args_is_help=True)


def _debug(ctx: typer.Context) -> bool:
    return bool(ctx.find_root().meta.get("debug"))


def run_with_manager(ctx: typer.Context, config: str | None, work: Callable[[VolumeManager], Awaitable[T]]) -> T:
    """Open the pools, run `work`, close them; domain errors become one line and an exit code."""

    from localdisk.config import development_default, load
    from localdisk.manager import VolumeManager

    async def main() -> T:
        if isinstance(ctx.obj, VolumeManager):
            return await work(ctx.obj)
        manager = VolumeManager.from_config(load(config) if config else development_default())
        async with manager.session():
            return await work(manager)

    with friendly_errors(_debug(ctx)):
        return anyio.run(main)
    raise AssertionError("unreachable")  # pragma: no cover


@volume_app.command("create")
def volume_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Volume name (the idempotency key, as a CSI name).")],
    size: Annotated[str, typer.Option("--size", "-s", help="e.g. 1Gi, 512Mi, 10G.")] = "1Gi",
    backend: Annotated[str, typer.Option("--backend", "-b")] = "fake",
    pool: Annotated[str | None, typer.Option("--pool", "-p")] = None,
    from_snapshot: Annotated[str | None, typer.Option(help="Create from this snapshot id.")] = None,
    clone_of: Annotated[str | None, typer.Option(help="Clone this volume id.")] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a volume (or return the existing one of that name)."""
    from localdisk.manager import CreateRequest
    from localdisk.model import ContentSource, SourceKind

    with friendly_errors(_debug(ctx)):
        required = parse_size(size)
    source = (
        ContentSource(SourceKind.SNAPSHOT, from_snapshot)
        if from_snapshot
        else ContentSource(SourceKind.VOLUME, clone_of)
        if clone_of
        else None
    )
    request = CreateRequest(name=name, backend=backend, pool=pool, required_bytes=required, source=source)
    volume = run_with_manager(ctx, config, lambda m: m.create_volume(request))
    if as_json:
        emit_json(volume)
    else:
        typer.echo(f"created {volume.id} ({human(volume.size_bytes)})")


@volume_app.command("list")
def volume_list(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List localdisk's volumes on this node (only ours: foreign LVs and partitions are never shown)."""
    volumes = run_with_manager(ctx, config, lambda m: m.list_volumes())
    if as_json:
        emit_json(volumes)
        return
    rows = [(v.id, v.name, human(v.size_bytes), v.device_path or "-", v.abnormal or "ok") for v in volumes]
    typer.echo(table(("ID", "NAME", "SIZE", "DEVICE", "CONDITION"), rows) if rows else "no volumes")


@volume_app.command("show")
def volume_show(ctx: typer.Context, volume_id: str, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Show one volume."""
    volume = run_with_manager(ctx, config, lambda m: m.get_volume(volume_id))
    limits, applied = _io_limits(ctx, config, volume.id)
    if as_json:
        emit_json({**plain(volume), "io_limits": limits, "io_applied": applied})
        return
    rows = [
        ("id", volume.id),
        ("name", volume.name),
        ("size", f"{human(volume.size_bytes)} ({volume.size_bytes} bytes)"),
        ("device", volume.device_path or "-"),
        ("source", f"{volume.source.kind.value} {volume.source.id}" if volume.source else "-"),
        ("condition", volume.abnormal or "ok"),
        ("io limits", ", ".join(f"{k}={v}" for k, v in limits.items()) or "none"),
        *(
            (f"io.max in pod {a['pod']}", " ".join(f"{k}={v}" for k, v in a["io_max"].items()) or "none")
            for a in applied
        ),
    ]
    typer.echo(table(("FIELD", "VALUE"), rows))


def _io_limits(ctx: typer.Context, config: str | None, volume_id: str) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The volume's I/O limits as this node records them, and what io.max holds in each pod that has it published."""
    from localdisk import qos
    from localdisk.config import development_default, load

    with friendly_errors(_debug(ctx)):
        io = qos.for_node((load(config) if config else development_default()).node)
        record = io.record(volume_id)
        applied = [
            {"pod": a.pod_uid, "device": f"{a.device[0]}:{a.device[1]}", "io_max": a.io_max} for a in io.applied(record)
        ]
        return record.limits.to_json(), applied
    raise AssertionError("unreachable")  # pragma: no cover


@volume_app.command("expand")
def volume_expand(
    ctx: typer.Context,
    volume_id: str,
    size: Annotated[str, typer.Argument(help="New size, e.g. 2Gi.")],
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Grow a volume (the filesystem is grown by the node service, or by hand)."""
    with friendly_errors(_debug(ctx)):
        required = parse_size(size)
    volume = run_with_manager(ctx, config, lambda m: m.expand_volume(volume_id, required))
    if as_json:
        emit_json(volume)
    else:
        typer.echo(f"{volume.id} is {human(volume.size_bytes)}")


@volume_app.command("delete")
def volume_delete(ctx: typer.Context, volume_id: str, config: ConfigOption = None) -> None:
    """Delete a volume and wipe its data; deleting a missing volume succeeds."""
    run_with_manager(ctx, config, lambda m: m.delete_volume(volume_id))
    typer.echo(f"deleted {volume_id}")


@volume_app.command("rekey")
def volume_rekey(
    ctx: typer.Context,
    volume_id: str,
    old_passphrase_file: Annotated[
        str, typer.Option(help="File holding the passphrase the volume has now; '-' reads stdin.")
    ],
    new_passphrase_file: Annotated[str, typer.Option(help="File holding the new passphrase; '-' reads stdin.")],
    iter_time: Annotated[
        int | None, typer.Option(help="Milliseconds of passphrase stretching for the new keyslot (cryptsetup's).")
    ] = None,
    pbkdf_memory: Annotated[
        int | None, typer.Option(help="KiB of memory for argon2 stretching of the new keyslot (cryptsetup's).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Rotate an encrypted volume's passphrase: its volume key is re-wrapped, the data is not touched.

    Passphrases are read from files (or stdin: with '-' for both, the old one is its first line and the new one the
    second), never from the command line; one trailing newline is dropped. Crash-safe: a keyslot for the new one is
    added, then the old one's is destroyed; run it again after an interruption to finish. The volume may be staged.
    In Kubernetes, update the Secret instead (key `passphrase`, with the old one as `previousPassphrase`): volumes
    follow at their next stage. This command is for volumes served outside Kubernetes, or before a Secret is set.
    """
    from localdisk.crypt import Crypt, Pbkdf, Rotation
    from localdisk.errors import FailedPrecondition, InvalidArgument
    from localdisk.mounts import Mounter
    from localdisk.runner import CommandRunner

    with friendly_errors(_debug(ctx)):
        old, new = read_passphrases(old_passphrase_file, new_passphrase_file)
        if old == new:
            raise InvalidArgument("the old and the new passphrase are the same")
    pbkdf = Pbkdf(iter_time_ms=iter_time, memory_kib=pbkdf_memory)

    async def rekey(manager: VolumeManager) -> Rotation:
        volume = await manager.get_volume(volume_id)
        if not volume.encrypted:
            raise FailedPrecondition(f"volume {volume.id} is not encrypted")
        if not volume.device_path:
            raise FailedPrecondition(f"volume {volume.id} has no device on this node")
        return await Crypt(Mounter(CommandRunner(default_timeout=600)), pbkdf).rotate(volume.device_path, new, old)

    done = run_with_manager(ctx, config, rekey)
    typer.echo(
        {
            Rotation.REWRAPPED: f"{volume_id}: key re-wrapped; the old passphrase no longer opens it",
            Rotation.FINISHED: f"{volume_id}: finished an interrupted rotation; the old passphrase no longer opens it",
            Rotation.CURRENT: f"{volume_id}: already uses the new passphrase; nothing changed",
        }[done]
    )


def read_passphrases(old_file: str, new_file: str) -> tuple[Passphrase, Passphrase]:
    """The old and the new passphrase from their files; '-' is stdin (both '-': two lines of it)."""
    import sys

    from localdisk.crypt import Passphrase
    from localdisk.errors import InvalidArgument

    stdin_lines: list[bytes] = []
    if old_file == "-" or new_file == "-":
        data = sys.stdin.buffer.read(4 * 1024)
        stdin_lines = data.split(b"\n", 1) if old_file == new_file == "-" else [data]

    def read(path: str, which: str) -> Passphrase:
        if path == "-":
            value = stdin_lines.pop(0) if stdin_lines else b""
        else:
            try:
                with open(path, "rb") as f:
                    value = f.read(4 * 1024)
            except OSError as exc:
                raise InvalidArgument(f"cannot read the {which} passphrase file {path}: {exc.strerror}") from None
        value = value.removesuffix(b"\n").removesuffix(b"\r")
        try:
            return Passphrase(value)
        except InvalidArgument as exc:
            raise InvalidArgument(f"the {which} passphrase: {exc.message}") from None

    return read(old_file, "old"), read(new_file, "new")


@snapshot_app.command("create")
def snapshot_create(
    ctx: typer.Context, volume_id: str, name: str, config: ConfigOption = None, as_json: JsonOption = False
) -> None:
    """Snapshot a volume."""
    snapshot = run_with_manager(ctx, config, lambda m: m.create_snapshot(volume_id, name))
    if as_json:
        emit_json(snapshot)
    else:
        typer.echo(f"created {snapshot.id} of {snapshot.source_volume_id} ({human(snapshot.size_bytes)})")


@snapshot_app.command("list")
def snapshot_list(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List snapshots."""
    snapshots = run_with_manager(ctx, config, lambda m: m.list_snapshots())
    if as_json:
        emit_json(snapshots)
        return
    rows = [(s.id, s.name, s.source_volume_id, human(s.size_bytes), s.created_at.isoformat()) for s in snapshots]
    typer.echo(table(("ID", "NAME", "SOURCE", "SIZE", "CREATED"), rows) if rows else "no snapshots")


@snapshot_app.command("delete")
def snapshot_delete(ctx: typer.Context, snapshot_id: str, config: ConfigOption = None) -> None:
    """Delete a snapshot; a missing one is already deleted."""
    run_with_manager(ctx, config, lambda m: m.delete_snapshot(snapshot_id))
    typer.echo(f"deleted {snapshot_id}")


def capacity(ctx: typer.Context, config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """Capacity of every configured pool: total, free, and the largest volume that fits."""

    async def collect(manager: VolumeManager) -> list[tuple[str, str, Capacity, str | None]]:
        states = manager.pool_states()
        return [(b, p, await manager.capacity(b, p), states[(b, p)].reason) for b, p in manager.pools()]

    pools = run_with_manager(ctx, config, collect)
    if as_json:
        emit_json(
            [{"backend": b, "pool": p, "up": down is None, "reason": down, **plain(cap)} for b, p, cap, down in pools]
        )
        return
    rows = [
        (
            b,
            p,
            human(cap.total_bytes),
            human(cap.available_bytes),
            human(cap.maximum_volume_bytes),
            "up" if down is None else f"DOWN: {down}",
        )
        for b, p, cap, down in pools
    ]
    typer.echo(table(("BACKEND", "POOL", "TOTAL", "FREE", "LARGEST VOLUME", "STATE"), rows))
