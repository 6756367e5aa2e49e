"""`localdisk lvm repair`: rebuild a degraded mirror's lost copies on a replacement PV, through the library."""

from __future__ import annotations

from typing import Annotated

import typer

from localdisk.commands.volumes import ConfigOption, run_with_manager

lvm_app = typer.Typer(help="LVM pool maintenance: mirrors that lost a disk.", no_args_is_help=True)


@lvm_app.command("repair")
def repair(
    ctx: typer.Context,
    volume_id: Annotated[str, typer.Argument(help="The degraded mirror's volume ID (lvm:<pool>:<lv>).")],
    devices: Annotated[
        list[str], typer.Argument(help="PVs of the pool's VG to rebuild on (vgextend a new disk first).")
    ],
    config: ConfigOption = None,
) -> None:
    """Rebuild the copies a mirror lost (lvconvert --repair) on DEVICES, or drop a cache whose SSD is gone
    (lvconvert --uncache); then drop the missing PV from the VG if no other volume still uses it."""
    from localdisk.availability import Available
    from localdisk.backends.lvm import LinearBackend
    from localdisk.errors import InvalidArgument
    from localdisk.manager import VolumeManager
    from localdisk.model import ObjectRef, Volume

    async def work(manager: VolumeManager) -> Volume:
        ref = ObjectRef.parse(volume_id)
        backend = manager.backend(ref.backend, ref.pool)
        inner = backend.inner if isinstance(backend, Available) else backend
        if not isinstance(inner, LinearBackend):
            raise InvalidArgument(f"volume {volume_id!r} is not in an lvm pool; only thick LVM volumes have mirrors")
        return await inner.repair_volume(ref.handle, list(devices or []))

    volume = run_with_manager(ctx, config, work)
    typer.echo(f"{volume.id}: {volume.degraded or volume.abnormal or 'healthy (resynchronising from the kept copy)'}")
