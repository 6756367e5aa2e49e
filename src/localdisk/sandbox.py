"""Real LVM where the host kernel has none: a User-Mode Linux guest over sparse image files.

The machines that build and test localdisk have no device-mapper, so LVM there can write metadata but never activate
a volume. User-Mode Linux runs a whole Linux kernel as an ordinary process: its root file system is the host's own
(hostfs), so the guest runs the host's Python, virtualenv and checkout unchanged, and what the guest writes under a
host path is on the host afterwards. `run_sandbox` boots one such guest with one sparse image file per requested
volume group as its disks, prepares it (proc/sys, the device-mapper modules of `GUEST_MODULES` that LVM and
encrypted volumes need, udev, a private LVM configuration so nothing is written to the host's /etc/lvm), creates
the requested volume groups and thin pools, runs one command, and brings its output and exit status back through
files in a private run directory. Everything it made (image files, the run directory, the UML processes) is removed
afterwards, also after a timeout or a failure.

Two processes are deliberately not started through `CommandRunner.run`, which buffers output until exit: the UML
kernel itself (it runs in a session of its own so a timeout can kill its whole process group) and, inside the guest,
the payload command (its output must stream into a host-visible file so a killed run still shows how far it got).
Both are argument lists, never a shell.

The host side needs the Debian packages user-mode-linux, lvm2, thin-provisioning-tools and udev; on a host whose CPU
has AMX it also needs gcc (see `XSTATE_SHIM_SOURCE`). It installs nothing: a missing package is an error naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

from localdisk.errors import BackendFailure, FailedPrecondition, InvalidArgument

UML_MODULES = Path("/usr/lib/uml/modules")
UDEVD_PATHS = (Path("/lib/systemd/systemd-udevd"), Path("/usr/lib/systemd/systemd-udevd"))
SANDBOX_ENV = "LOCALDISK_SANDBOX"
MAX_DISKS = 16  # UML's ubd driver has 16 devices, ubda to ubdp
PV_TAG = re.compile(r"[A-Za-z0-9_.-]{1,128}")
LVM_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,62}")
SIZE = re.compile(r"(\d+)([KMGT]?)(i?B)?", re.IGNORECASE)
GUEST_TMP = "/run/tmp"  # a tmpfs in the guest: unix sockets work there, and it vanishes with the guest
FINIT_MODULE = 313  # x86_64 syscall number; UML guests are x86_64 only
RB_POWER_OFF = 0x4321FEDC
# Layouts and caches: dm-raid with the md personalities it asks for (raid1, raid10: the guest has no modprobe;
# striping is device-mapper's own), dm-cache with its smq policy, dm-writecache.
LAYOUT_MODULES = ("dm-raid", "raid1", "raid10", "dm-cache", "dm-cache-smq", "dm-writecache")
# What every guest loads at boot, in this order: thin pools and snapshots for LVM, then the cipher modes LUKS2 volumes
# use (aes-xts-plain64 for data; ecb and cbc, and the AF_ALG socket, for cryptsetup's own keyslot work), then
# dm-crypt. The guest has no modprobe to load a cipher on demand, and dm-crypt's dependency encrypted-keys fails to
# initialise without cbc(aes). AES itself is built into Debian's UML kernel.
GUEST_MODULES = ("dm-thin-pool", "dm-snapshot", "cbc", "ecb", "xts", "algif_skcipher", "dm-crypt", *LAYOUT_MODULES)

# Debian's UML 6.1 saves a guest's FPU state in a 2,696-byte XSAVE buffer (x87 .. PKRU) and restores it with
# PTRACE_SETREGSET, but a host kernel on a CPU with AMX only accepts a full-size buffer (11,008 bytes) and fails every
# restore with EFAULT, so no guest process can run ("userspace - ptrace set fp regs failed, errno = 14"). Newer UML
# sizes the buffer from CPUID. This preload library pads the short buffer: the components UML's buffer holds come
# from UML, the rest (AMX tiles, which guest processes cannot enable) stay as the host process has them.
XSTATE_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <cpuid.h>
#include <elf.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define XFEATURES_OFFSET 512
static __thread unsigned char full[1 << 16] __attribute__((aligned(64)));

static long raw(long request, pid_t pid, void *addr, void *data) {
    return syscall(SYS_ptrace, request, pid, addr, data);
}

long ptrace(enum __ptrace_request request, ...) {
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (request == PTRACE_SETREGSET && (uintptr_t)addr == NT_X86_XSTATE) {
        struct iovec *given = data;
        struct iovec current = {full, sizeof full};
        if (given->iov_len >= XFEATURES_OFFSET + 8 && raw(PTRACE_GETREGSET, pid, addr, &current) == 0
            && current.iov_len > given->iov_len) {
            uint64_t theirs, mine, held = 0x3; /* x87 and SSE live in the legacy area */
            for (unsigned i = 2; i < 63; i++) {
                unsigned size, offset, c, d;
                __cpuid_count(0xd, i, size, offset, c, d);
                if (size && offset + size <= given->iov_len) held |= 1ULL << i;
            }
            memcpy(&theirs, full + XFEATURES_OFFSET, 8);
            memcpy(full, given->iov_base, given->iov_len);
            memcpy(&mine, full + XFEATURES_OFFSET, 8);
            mine = (mine & held) | (theirs & ~held);
            memcpy(full + XFEATURES_OFFSET, &mine, 8);
            return raw(PTRACE_SETREGSET, pid, addr, &current);
        }
        return raw(request, pid, addr, data);
    }
    if (request == PTRACE_PEEKTEXT || request == PTRACE_PEEKDATA || request == PTRACE_PEEKUSER) {
        long word;
        long r = raw(request, pid, addr, &word);
        return r < 0 ? r : word;
    }
    return raw(request, pid, addr, data);
}
"""

LVM_CONF = """\
# Written by localdisk's sandbox. Only the guest's ubd disks exist for LVM; no metadata backups (they would be
# written next to this file and thrown away with it) and no dmeventd monitoring: each costs a second per command
# under UML and neither changes what the tests observe.
devices {
    global_filter = [ "a|^/dev/ubd[a-z]+$|", "r|.*|" ]
    use_devicesfile = 0
}
backup {
    backup = 0
    archive = 0
}
activation {
    monitoring = 0
}
global {
    use_lvmlockd = 0
}
"""


@dataclass(frozen=True)
class VolumeGroupRequest:
    """A volume group of `size_bytes` on one fresh disk, or on several (`disks`: the size and PV tags of each).

    `--vg NAME:SIZE` is one disk; `--vg NAME:SIZExN` N disks of SIZE; `--vg NAME:512Mx2@hdd,128M@ssd+fast` disks of
    different sizes whose PVs carry tags (`pvchange --addtag`), as layouts and caches select PVs by tag.
    """

    name: str
    size_bytes: int
    disks: tuple[tuple[int, tuple[str, ...]], ...] = ()

    @property
    def pvs(self) -> tuple[tuple[int, tuple[str, ...]], ...]:
        return self.disks or ((self.size_bytes, ()),)

    @classmethod
    def parse(cls, text: str) -> VolumeGroupRequest:
        name, sep, sizes = text.partition(":")
        if not sep:
            raise InvalidArgument(
                f"--vg {text!r}: expected NAME:SIZE, e.g. ldtest:1G (or NAME:256Mx4, NAME:1G@hdd,256M@ssd)"
            )
        disks: list[tuple[int, tuple[str, ...]]] = []
        for part in sizes.split(","):
            size, _, tags = part.partition("@")
            size, times, count = size.partition("x")
            if times and (not count.isdigit() or not 1 <= int(count) <= MAX_DISKS):
                raise InvalidArgument(f"--vg {text!r}: {part!r} repeats a disk 1 to {MAX_DISKS} times (SIZExN)")
            tagged = tuple(tag for tag in tags.split("+") if tag) if tags else ()
            if any(not PV_TAG.fullmatch(tag) for tag in tagged):
                raise InvalidArgument(f"--vg {text!r}: PV tags use [A-Za-z0-9_+.-], joined by '+'")
            disks += [(parse_size(size), tagged)] * (int(count) if times else 1)
        single = len(disks) == 1 and not disks[0][1]
        return cls(_lvm_name(name, "volume group"), sum(s for s, _ in disks), () if single else tuple(disks))


@dataclass(frozen=True)
class ThinPoolRequest:
    """A thin pool of `size_bytes` data, with zeroing on, in a requested volume group; `metadata_bytes` of metadata
    when given (LVM's default is about 0.1% of the data, too small for thousands of volumes in a small pool)."""

    vg: str
    pool: str
    size_bytes: int
    metadata_bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> ThinPoolRequest:
        where, sep, sizes = text.partition(":")
        vg, slash, pool = where.partition("/")
        size, _, metadata = sizes.partition(":")
        if not sep or not slash:
            raise InvalidArgument(f"--thin {text!r}: expected VG/POOL:SIZE[:METADATA], e.g. ldtest/pool:512M")
        return cls(
            _lvm_name(vg, "volume group"),
            _lvm_name(pool, "thin pool"),
            parse_size(size),
            parse_size(metadata) if metadata else None,
        )


@dataclass(frozen=True)
class BlankDiskRequest:
    """A blank disk of `size_bytes` (no signature, no VG), with a `serial` the guest sees in /sys/block/*/serial."""

    size_bytes: int
    serial: str = ""

    @classmethod
    def parse(cls, text: str) -> BlankDiskRequest:
        size, _, serial = text.partition(":")
        if serial and not re.fullmatch(r"[A-Za-z0-9_.-]{1,20}", serial):
            raise InvalidArgument(f"--disk {text!r}: the serial is 1-20 of [A-Za-z0-9_.-]")
        return cls(parse_size(size), serial)


def _add_blank_disks(layout: _Layout, disks: Sequence[BlankDiskRequest]) -> None:
    """Attach `disks` after the VGs' disks, and name them to the guest in LOCALDISK_SANDBOX_DISKS
    (`/dev/ubdc:SIZE:SERIAL,...`)."""
    named = []
    for disk in disks:
        index = len(layout.disks)
        image = layout.root / f"blank{index}.img"
        with open(image, "wb") as out:
            out.truncate(disk.size_bytes)  # sparse, and blank: reads as zeros
        layout.disks.append(image)
        layout.serials[index] = disk.serial
        named.append(f"/dev/ubd{chr(ord('a') + index)}:{disk.size_bytes}:{disk.serial}")
    spec = json.loads(layout.spec.read_text())
    spec["env"]["LOCALDISK_SANDBOX_DISKS"] = ",".join(named)
    layout.spec.write_text(json.dumps(spec, indent=2))


@dataclass(frozen=True)
class SandboxResult:
    returncode: int
    boot_seconds: float  # from launching UML to the guest ready to run the command (modules, udev, VGs)
    command_seconds: float
    total_seconds: float


@dataclass
class _Layout:
    """The files of one run, all inside one private directory on the host (which the guest sees too)."""

    root: Path
    disks: list[Path] = field(default_factory=list)
    serials: dict[int, str] = field(default_factory=dict)  # disk index -> the serial UML gives it (--disk)

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def init(self) -> Path:
        return self.root / "init"

    @property
    def output(self) -> Path:
        return self.root / "output.log"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def ready(self) -> Path:
        return self.root / "ready"

    @property
    def guest_log(self) -> Path:
        return self.root / "guest.log"

    @property
    def console(self) -> Path:
        return self.root / "console.log"

    @property
    def lvm_dir(self) -> Path:
        return self.root / "lvm"


def parse_size(text: str) -> int:
    """`512M`, `1G`, `1GiB`, `1048576` to bytes (binary units)."""
    match = SIZE.fullmatch(text.strip())
    if not match:
        raise InvalidArgument(f"size {text!r}: expected a number with an optional K, M, G or T suffix")
    number, unit = int(match.group(1)), match.group(2).upper()
    size: int = number * 1024 ** " KMGT".index(unit or " ")
    if size <= 0:
        raise InvalidArgument(f"size {text!r} must be positive")
    return size


def _lvm_name(name: str, what: str) -> str:
    if not LVM_NAME.fullmatch(name):
        raise InvalidArgument(f"{what} name {name!r}: use up to 63 of [A-Za-z0-9+_.-], not starting with '-'")
    return name


# -- host side ---------------------------------------------------------------------------------------------------
def _uml_version() -> str:
    versions = sorted(p.name for p in UML_MODULES.iterdir()) if UML_MODULES.is_dir() else []
    if len(versions) != 1:
        raise FailedPrecondition(
            f"expected exactly one kernel module tree under {UML_MODULES}, found {versions or 'none'};"
            " (re)install the Debian package user-mode-linux"
        )
    return versions[0]


def check_requirements(need_thin: bool = True, path: str | None = None) -> dict[str, str]:
    """Where each tool the sandbox needs is; `FailedPrecondition` naming the package to install if one is missing."""
    tools = {
        "linux.uml": "user-mode-linux",
        "lvm": "lvm2",
        "udevadm": "udev",
    }
    if need_thin:
        tools["thin_check"] = "thin-provisioning-tools"
    search = path if path is not None else os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool, package in tools.items():
        where = shutil.which(tool, path=search)
        if where is None:
            missing.append(f"{tool} (package {package})")
        else:
            found[tool] = where
    udevd = next((p for p in UDEVD_PATHS if p.exists()), None)
    if udevd is None:
        missing.append("systemd-udevd (package udev)")
    else:
        found["systemd-udevd"] = str(udevd)
    if missing:
        packages = sorted({m.split("package ")[1].rstrip(")") for m in missing})
        raise FailedPrecondition(
            f"the LVM sandbox needs {', '.join(missing)}; install with: apt-get install {' '.join(packages)}"
        )
    found["modules"] = str(UML_MODULES / _uml_version())
    return found


def _host_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


async def _xstate_shim() -> Path | None:
    """The compiled preload library (cached per source), or None where it is not needed and gcc is absent."""
    from localdisk.runner import CommandRunner

    gcc = shutil.which("gcc")
    if gcc is None:
        if _host_has_amx():
            raise FailedPrecondition(
                "this CPU has AMX, and Debian's UML 6.1 needs a small preload library to run guest processes on it;"
                " building it needs gcc: apt-get install gcc"
            )
        return None
    import hashlib

    digest = hashlib.sha256(XSTATE_SHIM_SOURCE.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localdisk"
    library = cache / f"uml-xstate-{digest}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as build:
        source = Path(build) / "shim.c"
        source.write_text(XSTATE_SHIM_SOURCE)
        built = Path(build) / "shim.so"
        await CommandRunner().run([gcc, "-O2", "-shared", "-fPIC", "-o", str(built), str(source)], timeout=60)
        os.replace(built, library)  # atomic: concurrent runs may build it at the same time
    return library


def _guest_env(
    host_env: Mapping[str, str], layout: _Layout, vgs: Sequence[VolumeGroupRequest], thin: Sequence[ThinPoolRequest]
) -> dict[str, str]:
    env = {k: v for k, v in host_env.items() if k not in {"LD_PRELOAD", "TMPDIR", "LVM_SYSTEM_DIR"}}
    path = env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":")
    path += [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin") if d not in path]
    env.update(
        {
            "PATH": ":".join(path),
            SANDBOX_ENV: "1",
            "LVM_SYSTEM_DIR": str(layout.lvm_dir),
            "LVM_SUPPRESS_FD_WARNINGS": "1",
            "TMPDIR": GUEST_TMP,
            "LOCALDISK_SANDBOX_VGS": ",".join(f"{vg.name}:{vg.size_bytes}" for vg in vgs),
            "LOCALDISK_SANDBOX_THIN": ",".join(f"{t.vg}/{t.pool}:{t.size_bytes}" for t in thin),
        }
    )
    env.setdefault("HOME", "/root")
    return env


def _prepare(
    layout: _Layout,
    command: Sequence[str],
    vgs: Sequence[VolumeGroupRequest],
    thin: Sequence[ThinPoolRequest],
    modules: str,
) -> None:
    placed: list[dict[str, Any]] = []
    for vg in vgs:
        devices, tags = [], []
        for size, pv_tags in vg.pvs:
            index = len(layout.disks)
            if index >= MAX_DISKS:
                raise InvalidArgument(
                    f"the sandbox has room for {MAX_DISKS} disks (UML's ubda to ubdp); asked for more"
                )
            disk = layout.root / f"disk{index}.img"
            with open(disk, "wb") as image:
                image.truncate(size)  # sparse: costs no space until the guest writes
            layout.disks.append(disk)
            devices.append(f"/dev/ubd{chr(ord('a') + index)}")
            tags.append(list(pv_tags))
        placed.append({"name": vg.name, "device": devices[0], "devices": devices, "tags": tags})
    layout.lvm_dir.mkdir()
    profile = Path("/etc/lvm/profile/lvmdbusd.profile")  # what localdisk's lvm shell runs with
    if profile.is_file():
        (layout.lvm_dir / "profile").mkdir()
        shutil.copy(profile, layout.lvm_dir / "profile")
    (layout.lvm_dir / "lvm.conf").write_text(LVM_CONF)
    spec = {
        "command": list(command),
        "cwd": os.getcwd(),
        "env": _guest_env(os.environ, layout, vgs, thin),
        "vgs": placed,
        "thin": [
            {"vg": t.vg, "pool": t.pool, "size_bytes": t.size_bytes, "metadata_bytes": t.metadata_bytes} for t in thin
        ],
        "modules": modules,
        "root": str(layout.root),
    }
    layout.spec.write_text(json.dumps(spec, indent=2))
    source_root = Path(__file__).resolve().parents[1]
    layout.init.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(source_root)!r})\n"
        "from localdisk.sandbox import guest_main\n"
        f"guest_main({str(layout.spec)!r})\n"
    )
    layout.init.chmod(0o755)


def _uml_argv(layout: _Layout, uml: str, memory: str) -> list[str]:
    argv = [uml, f"mem={memory}", "root=/dev/root", "rootfstype=hostfs", "rw", f"uml_dir={layout.root}"]
    argv += [
        f"ubd{i}={disk}" + (f",,{layout.serials[i]}" if layout.serials.get(i) else "")
        for i, disk in enumerate(layout.disks)
    ]
    argv += [f"init={layout.init}", "con=null", "con0=fd:0,fd:1"]
    return argv


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


async def run_sandbox(
    command: Sequence[str],
    *,
    vgs: Sequence[VolumeGroupRequest] = (),
    thin: Sequence[ThinPoolRequest] = (),
    timeout: float = 1800.0,
    memory: str = "1G",
    echo: IO[bytes] | None = None,
    disks: Sequence[BlankDiskRequest] = (),
) -> SandboxResult:
    """Boot a guest with the requested volume groups and thin pools, run `command` in it, and clean everything up.

    The command runs in the current directory with the current environment, plus `LOCALDISK_SANDBOX=1`, a private
    `LVM_SYSTEM_DIR`, `TMPDIR` on a guest tmpfs, and `LOCALDISK_SANDBOX_VGS` / `LOCALDISK_SANDBOX_THIN` naming what
    was created. Its combined output is copied to `echo` while it runs. With `LOCALDISK_SANDBOX_KEEP=1` in the
    environment the run directory (console log, guest log, images) is kept for a post-mortem.
    """
    import anyio

    if not command:
        raise InvalidArgument("give the command to run in the sandbox, after --")
    names = [vg.name for vg in vgs]
    if len(set(names)) != len(names):
        raise InvalidArgument(f"volume group names must be unique: {names}")
    if len(vgs) > 16:
        raise InvalidArgument("the sandbox gives at most 16 disks")
    if len(vgs) + len(disks) > 16:
        raise InvalidArgument("the sandbox gives at most 16 disks (--vg and --disk together)")
    for pool in thin:
        if pool.vg not in names:
            raise InvalidArgument(f"thin pool {pool.vg}/{pool.pool}: add --vg {pool.vg}:SIZE for its volume group")
    tools = check_requirements(need_thin=bool(thin))
    shim = await _xstate_shim()
    started = time.monotonic()
    layout = _Layout(Path(tempfile.mkdtemp(prefix="localdisk-sandbox-")))
    process: Any = None
    try:
        _prepare(layout, command, vgs, thin, tools["modules"])
        _add_blank_disks(layout, disks)
        env = dict(os.environ)
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        with open(layout.console, "wb") as console:  # noqa: ASYNC230 - creating an empty file
            process = await anyio.open_process(
                _uml_argv(layout, tools["linux.uml"], memory),
                stdin=subprocess.DEVNULL,  # UML would take over a terminal given as its console's input
                stdout=console,
                stderr=console,
                env=env,
                start_new_session=True,
            )
        follower = _Follower(layout, echo)
        stopped: list[int] = []
        try:
            with anyio.fail_after(timeout):
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(follower.follow)
                    tasks.start_soon(_stop_on_signal, tasks.cancel_scope, stopped)
                    await process.wait()
                    tasks.cancel_scope.cancel()
        except TimeoutError:
            raise BackendFailure(
                f"the sandbox did not finish within {timeout:.0f}s and was killed; last output:\n"
                + _tail(layout.output, 2000)
            ) from None
        if stopped:
            raise BackendFailure(f"the sandbox was stopped by {signal.Signals(stopped[0]).name}; the guest was killed")
        follower.copy_new()
        ready_at = follower.ready_at
        ended = time.monotonic()
        try:
            status = json.loads(layout.status.read_text())
        except (OSError, ValueError):
            raise BackendFailure(
                "the sandbox guest stopped without running the command to its end.\n"
                f"guest log:\n{_tail(layout.guest_log)}\nconsole (last lines):\n{_tail(layout.console, 2500)}"
            ) from None
        boot = (ready_at or ended) - started
        return SandboxResult(int(status["returncode"]), boot, float(status["command_seconds"]), ended - started)
    finally:
        if os.environ.get("LOCALDISK_SANDBOX_KEEP"):
            print(f"sandbox: kept {layout.root}", file=sys.stderr)
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            with anyio.CancelScope(shield=True):
                await process.wait()
        if process is not None:
            _reap_group(process.pid)
        if not os.environ.get("LOCALDISK_SANDBOX_KEEP"):
            shutil.rmtree(layout.root, ignore_errors=True)


async def _stop_on_signal(scope: CancelScope, stopped: list[int]) -> None:
    """SIGTERM or SIGHUP (a CI job cancelled, a parent killed) ends the run like a timeout: the guest is killed and
    the run directory removed. Without this Python would die at once and leave the UML processes running."""
    import anyio

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            stopped.append(signum)
            scope.cancel()
            return


def _reap_group(pgid: int) -> None:
    """UML's helper processes share its process group; make sure none outlives the run."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Follower:
    """Copies the guest command's output to the host as it grows, and notes when the guest became ready."""

    def __init__(self, layout: _Layout, echo: IO[bytes] | None) -> None:
        self.layout = layout
        self.echo = echo
        self.offset = 0
        self.ready_at: float | None = None

    def copy_new(self) -> None:
        try:
            with open(self.layout.output, "rb") as source:
                source.seek(self.offset)
                data = source.read()
        except OSError:
            return
        self.offset += len(data)
        if data and self.echo is not None:
            self.echo.write(data)
            self.echo.flush()

    async def follow(self) -> None:
        import anyio

        while True:
            if self.ready_at is None and self.layout.ready.exists():
                self.ready_at = time.monotonic()
            self.copy_new()
            await anyio.sleep(0.2)


# -- guest side (PID 1 inside UML) ---------------------------------------------------------------------------------
def guest_main(spec_path: str) -> None:
    """Prepare the guest, run the command, write its status where the host finds it, and power off. Never returns."""
    import traceback

    spec: dict[str, Any] = {}
    try:
        spec = json.loads(Path(spec_path).read_text())
        root = Path(spec["root"])
        os.environ.clear()
        os.environ.update(spec["env"])
        started = _uptime()
        import anyio

        anyio.run(_prepare_guest, spec)
        (root / "ready").write_text(f"{_uptime() - started:.3f}\n")
        began = time.monotonic()
        returncode = _run_payload(spec, root / "output.log")
        status = {"returncode": returncode, "command_seconds": round(time.monotonic() - began, 3)}
        with open(root / "status.json", "w") as out:
            json.dump(status, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:  # PID 1 must not die: report whatever happened and power off
        try:
            with open(Path(spec.get("root", "/tmp")) / "guest.log", "a") as log:
                log.write(traceback.format_exc())
        except OSError:
            pass
    finally:
        os.sync()
        _power_off()


def _uptime() -> float:
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def _power_off() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_POWER_OFF)
    os._exit(1)  # not reached unless the reboot call failed; UML then panics and exits anyway


def _load_modules(modules: str, names: Sequence[str]) -> None:
    """modprobe without kmod (hosts often lack it): load a module and its dependencies from modules.dep."""
    import ctypes
    import errno

    root = Path(modules)
    deps: dict[str, list[str]] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        deps[Path(module).name.removesuffix(".ko")] = [module, *reversed(needs.split())]
    libc = ctypes.CDLL(None, use_errno=True)
    loaded: set[str] = set()
    for name in names:
        entry = deps.get(name) or deps.get(name.replace("-", "_"))
        if entry is None:
            raise FailedPrecondition(f"kernel module {name} is not in {root}")
        for relative in [*entry[1:], entry[0]]:
            if relative in loaded:
                continue
            fd = os.open(root / relative, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.syscall(FINIT_MODULE, fd, b"", 0) != 0 and ctypes.get_errno() != errno.EEXIST:
                    raise BackendFailure(f"loading {relative}: {os.strerror(ctypes.get_errno())}")
            finally:
                os.close(fd)
            loaded.add(relative)


def _enable_io_controller(root: Path) -> None:
    if "io" in (root / "cgroup.controllers").read_text().split():
        (root / "cgroup.subtree_control").write_text("+io")


async def _prepare_guest(spec: dict[str, Any]) -> None:
    from localdisk.backends.lvmcmd import Lvm
    from localdisk.runner import CommandRunner

    log = open(Path(spec["root"]) / "guest.log", "a")  # noqa: SIM115, ASYNC230 - PID 1 has nothing to wait for

    def step(what: str) -> None:
        log.write(f"{_uptime():8.2f} {what}\n")
        log.flush()

    try:
        step("python up")
        runner = CommandRunner(default_timeout=120)
        for fstype, target in (("proc", "/proc"), ("sysfs", "/sys"), ("tmpfs", "/run")):
            await runner.run(["mount", "-t", fstype, fstype, target])
        os.makedirs(GUEST_TMP, mode=0o1777, exist_ok=True)
        # cgroup v2 with the io controller for the I/O limit tests (tests/lvm/test_qos_lvm.py); a kernel without it
        # only loses those tests, which then skip.
        cgroup2 = await runner.run(["mount", "-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"], check=False)
        if cgroup2.returncode == 0:
            _enable_io_controller(Path("/sys/fs/cgroup"))
        step("mounted")
        _load_modules(spec["modules"], GUEST_MODULES)
        step("modules loaded")
        udevd = next(str(p) for p in UDEVD_PATHS if p.exists())
        await runner.run([udevd, "--daemon"])
        step("udevd started")
        await runner.run(["udevadm", "trigger", "--action=add", "--subsystem-match=block", "--subsystem-match=misc"])
        step("udev triggered")
        await runner.run(["udevadm", "settle", "--timeout=60"])
        step("udev settled")
        lvm = Lvm(runner)
        for vg in spec["vgs"]:
            await lvm.create_vg(vg["name"], vg["devices"])
            for device, tags in zip(vg["devices"], vg["tags"], strict=True):
                if tags:
                    await lvm.tag_pv(device, tags)
            step(f"vg {vg['name']} created")
        for pool in spec["thin"]:
            await lvm.create_thin_pool(
                pool["vg"], pool["pool"], pool["size_bytes"], zero=True, metadata=pool["metadata_bytes"]
            )
            step(f"thin pool {pool['vg']}/{pool['pool']} created")
    finally:
        log.close()


def _run_payload(spec: dict[str, Any], output: Path) -> int:
    with open(output, "ab", buffering=0) as out:
        try:
            child = subprocess.Popen(
                spec["command"], cwd=spec["cwd"], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        except OSError as exc:
            out.write(f"sandbox: cannot run {spec['command'][0]!r}: {exc.strerror}\n".encode())
            return 127
        returncode = child.wait()
        os.fsync(out.fileno())
    return returncode if returncode >= 0 else 128 - returncode


# -- CLI -----------------------------------------------------------------------------------------------------------
if TYPE_CHECKING:
    import typer
    from anyio import CancelScope


def __getattr__(name: str) -> typer.Typer:
    """`sandbox_app`, built on first use: the guest imports this module as PID 1 and must not pay for typer."""
    if name == "sandbox_app":
        app = _build_app()
        globals()["sandbox_app"] = app
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_app() -> typer.Typer:
    import typer

    globals()["typer"] = typer  # typer resolves the string annotations below in this module's namespace
    app = typer.Typer(help="Real LVM under User-Mode Linux, on sparse image files (tests and demos).")

    @app.command("run")
    def run_command(
        command: Annotated[list[str], typer.Argument(help="The command to run in the guest (after --).")],
        vg: Annotated[list[str] | None, typer.Option("--vg", help="NAME:SIZE: a volume group on a fresh disk.")] = None,
        thin: Annotated[
            list[str] | None,
            typer.Option("--thin", help="VG/POOL:SIZE[:METADATA]: a thin pool (zeroing on) in one of the VGs."),
        ] = None,
        timeout: Annotated[float, typer.Option(help="Seconds before the guest is killed.")] = 1800.0,
        memory: Annotated[str, typer.Option(help="Guest memory (UML mem=).")] = "1G",
        disk: Annotated[
            list[str] | None,
            typer.Option("--disk", help="SIZE[:SERIAL]: a blank disk (no VG), after the VGs' disks; repeatable."),
        ] = None,
    ) -> None:
        """Boot a guest, create the volume groups and thin pools, run COMMAND there, and exit with its status.

        Example: localdisk sandbox run --vg ldtest:1G --thin ldtest/pool:512M -- lvs -a
        """
        import anyio

        from localdisk.errors import LocalDiskError

        try:
            vgs = [VolumeGroupRequest.parse(v) for v in vg or []]
            pools = [ThinPoolRequest.parse(t) for t in thin or []]
            blank = [BlankDiskRequest.parse(d) for d in disk or []]
            result = anyio.run(
                lambda: run_sandbox(
                    command, vgs=vgs, thin=pools, timeout=timeout, memory=memory, echo=sys.stdout.buffer, disks=blank
                )
            )
        except LocalDiskError as exc:
            typer.echo(f"sandbox: error: {exc.message}", err=True)
            raise typer.Exit(2) from None
        typer.echo(
            f"sandbox: booted in {result.boot_seconds:.1f}s, command exited {result.returncode} after"
            f" {result.command_seconds:.1f}s, {result.total_seconds:.1f}s in all",
            err=True,
        )
        raise typer.Exit(result.returncode)

    return app
