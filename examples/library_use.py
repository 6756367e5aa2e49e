"""Using localdisk as a library, the way another Python controller would: no CSI server, no gRPC.

    python examples/library_use.py                      # the in-memory fake pool
    python examples/library_use.py --config node.toml --backend thin

It creates a volume, grows it, snapshots it where the backend can, prints capacity before and after, and removes
everything it made, also when a step fails.
"""

from __future__ import annotations

import argparse

import anyio

import localdisk
from localdisk.sizes import MiB, human


async def run(config: localdisk.NodeConfig, backend: str, pool: str | None) -> list[str]:
    lines: list[str] = []
    async with localdisk.VolumeManager.from_config(config).session() as volumes:
        before = await volumes.capacity(backend, pool)
        lines.append(f"capacity before: {human(before.available_bytes)} free")
        volume = await volumes.create_volume(
            localdisk.CreateRequest(name="example-volume", backend=backend, pool=pool, required_bytes=64 * MiB)
        )
        try:
            lines.append(f"created {volume.id} ({human(volume.size_bytes)})")
            grown = await volumes.expand_volume(volume.id, 128 * MiB)
            lines.append(f"expanded to {human(grown.size_bytes)}")
            try:
                snapshot = await volumes.create_snapshot(volume.id, "example-snapshot")
            except localdisk.Unsupported as exc:
                lines.append(f"no snapshot: {exc.message}")
            else:
                lines.append(f"snapshot {snapshot.id} ({human(snapshot.size_bytes)})")
                await volumes.delete_snapshot(snapshot.id)
            during = await volumes.capacity(backend, pool)
            lines.append(f"capacity with the volume: {human(during.available_bytes)} free")
        finally:
            await volumes.delete_volume(volume.id)
        after = await volumes.capacity(backend, pool)
        lines.append(f"deleted; capacity after: {human(after.available_bytes)} free")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--config", help="node config (TOML); default: one in-memory fake pool")
    parser.add_argument("--backend", default="fake")
    parser.add_argument("--pool", default=None)
    args = parser.parse_args()
    config = localdisk.load_config(args.config) if args.config else localdisk.development_default()
    for line in anyio.run(run, config, args.backend, args.pool):
        print(line)


if __name__ == "__main__":
    main()
