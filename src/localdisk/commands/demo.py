"""`localdisk demo`: the README's main job. See `localdisk.demo` for the story it tells."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from localdisk.commands.output import die

if TYPE_CHECKING:
    from localdisk.demo import StoryResult

LVM_VG = "ldemo"
LVM_THIN_POOL = "tpool"


def _say(text: str) -> None:
    typer.echo(text)


def demo(
    part: Annotated[str, typer.Option(help="all, partition or lvm.")] = "all",
    results: Annotated[str | None, typer.Option(hidden=True, help="Write results as JSON here (sandbox use).")] = None,
    workdir: Annotated[str | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run the whole localdisk story on loop-file-backed disks: no real disks, no cluster needed."""
    import anyio

    from localdisk import demo as story

    if part not in ("all", "partition", "lvm"):
        die("--part must be all, partition or lvm", 2)
    if os.geteuid() != 0:
        die("the demo needs root: it attaches loop devices and mounts filesystems", 2)
    missing = [tool for tool in ("losetup", "mkfs.ext4", "mkfs.xfs", "sfdisk", "parted") if not shutil.which(tool)]
    if missing:
        die(f"missing tools: {', '.join(missing)}; run scripts/bootstrap.sh or `localdisk doctor`", 2)

    base = Path(workdir) if workdir else story.make_workdir()
    base.mkdir(parents=True, exist_ok=True)
    collected: list[story.StoryResult] = []
    started = time.monotonic()
    try:
        if part in ("all", "partition"):
            (base / "partition").mkdir(exist_ok=True)
            collected += anyio.run(story.partition_part, base / "partition", _say)
        if part == "lvm":  # inside a guest with device-mapper (the sandbox), or a host that has it
            (base / "lvm").mkdir(exist_ok=True)
            collected += anyio.run(story.lvm_part, base / "lvm", _say, LVM_VG, LVM_THIN_POOL)
        elif part == "all":
            collected += _lvm_in_sandbox(base)
    finally:
        if results:
            story.save_results(Path(results), collected)
        if not workdir:
            story.remove_workdir(base)
    if results:
        return
    typer.echo("\n== summary")
    typer.echo(story.summary(collected))
    failed = [r for r in collected if r.error or not r.data_kept or r.capacity_after != r.capacity_before]
    typer.echo(
        f"\n{len(collected)} backend(s) in {time.monotonic() - started:.0f}s; "
        + ("all good" if not failed else f"{len(failed)} FAILED")
    )
    if failed or len(collected) < (3 if part == "all" else 1):
        raise typer.Exit(1)


def _lvm_in_sandbox(base: Path) -> list[StoryResult]:
    """Run the LVM part in the User-Mode Linux sandbox: real device-mapper whatever the host kernel lacks."""
    from localdisk import demo as story

    reason = "this host has no device-mapper" if not story.has_device_mapper() else "to keep the host's LVM untouched"
    _say(f"== lvm and thin backends: inside the User-Mode Linux sandbox ({reason}); booting it takes a few seconds")
    results_file = base / "lvm-results.json"
    command = [
        sys.executable,
        "-m",
        "localdisk.cli",
        "sandbox",
        "run",
        "--vg",
        f"{LVM_VG}:1200M",
        "--thin",
        f"{LVM_VG}/{LVM_THIN_POOL}:600M",
        "--",
        sys.executable,
        "-m",
        "localdisk.cli",
        "demo",
        "--part",
        "lvm",
        "--results",
        str(results_file),
        "--workdir",
        str(base / "guest"),
    ]
    done = subprocess.run(command, check=False)
    if done.returncode != 0 and not results_file.exists():
        _say(f"the sandbox run failed (exit {done.returncode}); `localdisk doctor` says what is missing")
        return []
    return story.load_results(results_file)
