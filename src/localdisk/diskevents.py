"""Disk events: a disk that appears, goes or changes is discovered at once, not at the next `discover_seconds`.

Pools that find their disks by rules (`localdisk.discovery`) look again every `discover_seconds`, and pools that
are down are tried again every `pool_retry_seconds`. `follow_disk_events` runs beside the server and cuts both
waits short (`VolumeManager.disks_changed`) when the kernel reports a whole disk added, removed or changed (a
hot-plugged drive, a loop image attached or grown, a disk whose medium changed):

- where a udev daemon runs (its control socket exists), its events are followed (`udevadm monitor --udev`): they
  come after udev's rules ran, so the /dev/disk/by-id links that rules may name exist already;
- elsewhere (a container without udevd, say), the kernel's own uevents are (`udevadm monitor --kernel`);
- `disk_events = "off"` in `[node]` keeps to the intervals alone.

Events are hints, never trusted for what they say: a discovery pass reads sysfs and the disks themselves as always.
Partitions and device-mapper devices (our own LVs, crypt mappings) are ignored, and a burst of events is one
discovery after `settle` seconds of quiet (at most one every `gap` seconds), so our own table writes cannot make
discovery run hot. If the monitor exits, it is started again with a growing back-off (up to a minute).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from localdisk.config import DiskEvents as Source

log = logging.getLogger(__name__)

UDEV_CONTROL = Path("/run/udev/control")  # the udev daemon's socket: it runs where this exists
ACTIONS = frozenset({"add", "remove", "change"})
IGNORED = ("dm-", "ram", "zram", "md")  # device-mapper (our LVs, crypt), RAM disks, md arrays: not disks we take
MAX_LINE = 64 * 1024  # udevadm's property lines are short; a longer one means the stream is not what we expect
MAX_NAMES = 32  # disk names kept for the log line of one discovery


class DiskWatcher(Protocol):
    """What disk events are told to (`VolumeManager.disks_changed`)."""

    def disks_changed(self, why: str) -> None: ...


@dataclass(frozen=True)
class DiskEvent:
    action: str  # add, remove, change
    name: str  # the kernel's name of the disk: sdb, nvme0n1, loop3


class EventParser:
    """Turns the lines of `udevadm monitor --property` into the events that concern whole disks.

    Each event is a header line (`KERNEL[...] change /devices/... (block)`), KEY=VALUE lines and a blank line."""

    def __init__(self) -> None:
        self._properties: dict[str, str] = {}

    def feed(self, line: str) -> DiskEvent | None:
        """One line of output; the event it completes, if that event concerns a disk."""
        line = line.rstrip("\r\n")
        if line:
            key, sep, value = line.partition("=")
            if sep and key.isupper():
                self._properties[key] = value
            return None
        properties, self._properties = self._properties, {}
        return disk_event(properties)


def disk_event(properties: dict[str, str]) -> DiskEvent | None:
    """The event of a uevent's properties, or None if it is not a whole disk's add, remove or change."""
    action = properties.get("ACTION", "")
    name = os.path.basename(properties.get("DEVNAME", "") or properties.get("DEVPATH", ""))
    if properties.get("SUBSYSTEM") != "block" or properties.get("DEVTYPE") != "disk" or action not in ACTIONS:
        return None
    if not name or name.startswith(IGNORED):
        return None
    return DiskEvent(action, name)


def monitor_argv(source: Source, *, udevadm: str = "udevadm", udev_control: Path = UDEV_CONTROL) -> list[str] | None:
    """The `udevadm monitor` command line for `source` ("auto": udev's events if its daemon runs, else the
    kernel's), or None when events are off or udevadm is not installed."""
    if source == "off":
        return None
    executable = shutil.which(udevadm)
    if executable is None:
        return None
    if source == "auto":
        source = "udev" if udev_control.exists() else "kernel"
    return [executable, "monitor", f"--{source}", "--property", "--subsystem-match=block"]


async def follow_disk_events(
    watcher: DiskWatcher,
    source: Source = "auto",
    *,
    udevadm: str = "udevadm",
    udev_control: Path = UDEV_CONTROL,
    settle: float = 0.5,
    gap: float = 2.0,
) -> None:
    """Until cancelled: tell `watcher` when disks change (see the module's text). Returns at once when events are
    off or udevadm is missing (discovery then keeps to its intervals)."""
    argv = monitor_argv(source, udevadm=udevadm, udev_control=udev_control)
    if argv is None:
        log.info("not following disk events (%s): discovery runs every discover_seconds", source)
        return
    names: list[str] = []
    changed = anyio.Event()

    async def tell() -> None:
        nonlocal changed
        while True:
            await changed.wait()
            await anyio.sleep(settle)  # the rest of a burst (a disk and its partitions) arrives meanwhile
            seen, changed = list(names), anyio.Event()
            names.clear()
            watcher.disks_changed("disk event (" + ", ".join(seen) + ")")
            await anyio.sleep(gap)

    def heard(event: DiskEvent) -> None:
        label = f"{event.action} {event.name}"
        if label not in names and len(names) < MAX_NAMES:
            names.append(label)
        changed.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(tell)
        backoff = 1.0
        while True:
            started = anyio.current_time()
            ended = await _monitor(argv, heard)
            backoff = 1.0 if anyio.current_time() - started > 60 else min(backoff * 2, 60.0)
            log.warning("%s ended (%s); following disk events again in %.0f s", " ".join(argv[:3]), ended, backoff)
            await anyio.sleep(backoff)


async def _monitor(argv: list[str], heard: Callable[[DiskEvent], None]) -> str:
    """Run one `udevadm monitor` and hand its disk events to `heard` until it ends; why it ended."""
    parser = EventParser()
    try:
        process = await anyio.open_process(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError as exc:
        return f"could not start: {exc.strerror or exc}"
    try:
        assert process.stdout is not None
        stream = BufferedByteReceiveStream(process.stdout)
        log.info("following disk events: %s", " ".join(argv[1:]))
        while True:
            try:
                line = await stream.receive_until(b"\n", MAX_LINE)
            except anyio.EndOfStream:
                return f"exit status {await process.wait()}"
            except (anyio.DelimiterNotFound, anyio.IncompleteRead):
                return "a line it printed was not one of its events"
            event = parser.feed(line.decode("utf-8", "replace"))
            if event is not None:
                heard(event)
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            await process.aclose()
