"""Encryption at rest: one LUKS2 container per volume, opened as a dm-crypt mapping on the node.

Why a module of its own: the CSI Node service decides *when* a volume is formatted, opened, grown or closed (from a
request and the volume's recorded `encrypted` flag); this module knows *how*, through `cryptsetup`, and keeps the
rules that protect data and keys in one place:

* The passphrase reaches cryptsetup only through a pipe of its own (`--key-file=/proc/self/fd/N`, filled and
  closed for writing before cryptsetup starts; see `key_pipe` for why not stdin), never in argv (visible in
  /proc/*/cmdline) or the environment, and never in a log line or an error message: `Passphrase` hides itself
  from repr/str, and errors are built from cryptsetup's exit status, not from anything that echoes the input.
* Each volume gets its own random volume key (luksFormat draws it); the passphrase only wraps it in a keyslot, so a
  key rotation (`rotate`) re-wraps the key without touching the data: a keyslot for the new passphrase is added,
  then the previous passphrase's keyslot is destroyed, two steps of which each leaves a header that at least one of
  the two passphrases opens, whenever the process is killed (luksChangeKey may rewrite a keyslot in place).
* A mapping that is already open is handed out only to a caller whose passphrase opens the header (`unlock`).
* Formatting follows the node's formatting guard (`localdisk.mounts`): a device is formatted only when `blkid -p`
  finds no signature at all; a LUKS header is used only when it is ours (label `localdisk`), never a foreign one.
* Delete is a crypto-erase: `cryptsetup erase` destroys every keyslot, then the whole header area (the 16 MiB
  before the data segment) is zeroed, so the volume key is gone and the ciphertext that stays on the disk is noise.
  On a thin LV the header area is discarded instead of zeroed (`erase(discard=True)`): a snapshot or clone shares
  its header blocks with its origin, and writing zeros there would allocate 16 MiB of new pool blocks (copy on
  write) only to free them again; a discard unmaps them from this LV alone, and the origin keeps its own.
* Mappings are opened with `--disable-keyring`, as ceph-csi does: a LUKS2 volume key kept in the kernel keyring
  makes `cryptsetup resize` ask for the passphrase, which NodeExpandVolume does not carry.
"""

# Checking a /dev/mapper node costs less than a worker thread per call (as in localdisk.mounts).
# ruff: noqa: ASYNC240

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import hashlib
import os
import re
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio.to_thread

from localdisk.blockdev import open_exclusive
from localdisk.errors import BackendFailure, Busy, CommandFailed, FailedPrecondition, InvalidArgument
from localdisk.mounts import Mounter
from localdisk.runner import CommandRunner

LABEL = "localdisk"  # the LUKS2 label that marks a header as made by localdisk
SUBSYSTEM = "localdisk.csi.io"
HEADER_SECTORS = 32768  # 16 MiB of LUKS2 metadata and keyslots before the data segment (--offset, 512-byte sectors)
HEADER_BYTES = HEADER_SECTORS * 512
MAPPING_PREFIX = "localdisk-"
MAX_PASSPHRASE_BYTES = 512  # cryptsetup's default limit for an interactive passphrase is 512 characters
_BLKZEROOUT = 0x127F
_BLKDISCARD = 0x1277
_UNLOCKED = re.compile(r"^Key slot (\d+) unlocked\.", re.MULTILINE)
_CREATED = re.compile(r"^Key slot (\d+) created\.", re.MULTILINE)

# cryptsetup(8) exit codes
_WRONG_PASSPHRASE = 2
_BUSY = 5


class WrongPassphrase(FailedPrecondition):
    """The passphrase opens no keyslot of the header (cryptsetup exit code 2)."""


class Rotation(enum.Enum):
    """What a key rotation (`Crypt.rotate`) found and did."""

    CURRENT = "current"  # the new passphrase opened the header already, and the previous one does not: nothing done
    REWRAPPED = "rewrapped"  # the volume key is now wrapped by the new passphrase and no longer by the previous one
    FINISHED = "finished"  # a rotation cut off between its two steps: the previous passphrase's keyslot is gone now


class Passphrase:
    """A volume's passphrase: bytes that never show in a repr, an f-string or a traceback's locals."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise InvalidArgument("the passphrase is empty")
        if len(secret) > MAX_PASSPHRASE_BYTES:
            raise InvalidArgument(f"the passphrase is longer than {MAX_PASSPHRASE_BYTES} bytes")
        self._secret = secret

    def reveal(self) -> bytes:
        return self._secret

    def __repr__(self) -> str:
        return "Passphrase(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Passphrase) and other._secret == self._secret

    def __hash__(self) -> int:
        return hash(("Passphrase", len(self._secret)))


@dataclass(frozen=True)
class Pbkdf:
    """How the passphrase is stretched into the key that wraps the volume key. The default is cryptsetup's own
    (argon2id, benchmarked to about 2 s, at most 1 GiB); tests and slow machines may force cheaper settings."""

    kind: str = "argon2id"
    force_iterations: int | None = None
    memory_kib: int | None = None
    iter_time_ms: int | None = None

    def argv(self) -> list[str]:
        args = ["--pbkdf", self.kind]
        if self.force_iterations is not None:
            args += ["--pbkdf-force-iterations", str(self.force_iterations)]
        if self.memory_kib is not None and self.kind.startswith("argon2"):
            args += ["--pbkdf-memory", str(self.memory_kib)]
        if self.iter_time_ms is not None:
            args += ["--iter-time", str(self.iter_time_ms)]
        return args


def mapping_name(volume_id: str) -> str:
    """The dm-crypt mapping of a volume: `localdisk-<hash>`. A volume ID may hold any character; the name of a
    device-mapper device must be short and free of '/', so it is a SHA-256 prefix (128 bits) of the ID."""
    digest = hashlib.sha256(volume_id.encode("utf-8", "surrogatepass")).hexdigest()
    return MAPPING_PREFIX + digest[:32]


def _failed(action: str, device: str, exc: CommandFailed) -> BackendFailure:
    """An error for a failed cryptsetup call: its exit code and stderr (cryptsetup never echoes a passphrase)."""
    detail = exc.stderr.strip().splitlines()
    return BackendFailure(f"cryptsetup {action} of {device} failed (exit {exc.returncode}): {' '.join(detail[-2:])}")


class Crypt:
    """LUKS2 containers of volumes, through `cryptsetup`, with the node's formatting guard (`Mounter.probe`)."""

    def __init__(self, mounter: Mounter, pbkdf: Pbkdf | None = None, mapper_dir: str = "/dev/mapper") -> None:
        self.mounter = mounter
        self.runner = mounter.runner
        self.pbkdf = pbkdf or Pbkdf()
        self.mapper_dir = mapper_dir

    def mapped_path(self, volume_id: str) -> str:
        return f"{self.mapper_dir}/{mapping_name(volume_id)}"

    # -- the header -----------------------------------------------------------------------------------------------
    async def is_ours(self, device: str) -> bool:
        """Whether `device` holds a LUKS2 header that localdisk made (its label)."""
        return (await self._keyslots(device)) is not None

    async def _keyslots(self, device: str) -> int | None:
        """How many keyslots our LUKS2 header on `device` has; None when there is no readable header of ours."""
        result = await self.runner.run(["cryptsetup", "luksDump", "--", device], check=False)
        if result.returncode != 0:
            return None
        return parse_dump(result.text)

    async def ensure_format(self, device: str, passphrase: Passphrase) -> bool:
        """Make sure `device` holds our LUKS2 header; True if it was formatted now.

        A device with our header is kept as it is (the passphrase is checked by `open`); a device with nothing on
        it is formatted; anything else (a filesystem, a partition table, a foreign LUKS header) is refused."""
        found = await self.mounter.probe(device)
        if found.description is not None and "crypto_LUKS" in found.description:
            keyslots = await self._keyslots(device)
            if keyslots:
                return False
            if keyslots == 0:
                # Our header without any keyslot: a luksFormat cut off before it wrapped the volume key. Nothing can
                # ever have been opened or written through it, so it is made again.
                await anyio.to_thread.run_sync(_zero_head, device, HEADER_BYTES)
                return await self.ensure_format(device, passphrase)
            raise FailedPrecondition(
                f"device {device} holds a LUKS header that localdisk did not make; it is neither opened nor reformatted"
            )
        if not found.empty:
            raise FailedPrecondition(
                f"device {device} holds {found.description}, not a LUKS header; an encrypted volume is formatted only"
                " on a device without any signature, and localdisk never reformats one"
            )
        published = self.mounter.block_binds(device)
        if published:
            raise FailedPrecondition(
                f"device {device} is published as a raw block volume at {published[0].mount_point}; not formatted"
            )
        argv = [
            "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--label", LABEL, "--subsystem",
            SUBSYSTEM, "--offset", str(HEADER_SECTORS), *self.pbkdf.argv(),
        ]  # fmt: skip
        try:
            with key_pipe(passphrase) as key:
                await self.runner.run([*argv, f"--key-file={fd_file(key)}", "--", device], pass_fds=[key], timeout=600)
        except CommandFailed as exc:
            raise _failed("luksFormat", device, exc) from None
        if not await self.is_ours(device):
            raise BackendFailure(f"cryptsetup luksFormat of {device} finished, but no LUKS2 header of ours is there")
        return True

    # -- the mapping ----------------------------------------------------------------------------------------------
    def mapping_of(self, volume_id: str, device: str) -> str | None:
        """The open mapping of the volume, or None; `FailedPrecondition` if its name is taken by a mapping of
        another device."""
        path = self.mapped_path(volume_id)
        try:
            mapped = os.stat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISBLK(mapped.st_mode):
            raise FailedPrecondition(f"{path} exists and is not a block device")
        under = _lower_devices(mapped.st_rdev)
        if not under:
            return None  # a device-mapper device of ours without a table: an open cut off half-way (see `open`)
        try:
            rdev = os.stat(device).st_rdev
        except OSError:
            rdev = -1
        if under != [rdev]:
            raise FailedPrecondition(f"mapping {path} exists but is not a mapping of {device}; it is left as it is")
        return path

    async def unlock(
        self, volume_id: str, device: str, passphrase: Passphrase, previous: Passphrase | None = None
    ) -> tuple[str, Rotation | None]:
        """Open the volume's mapping with `passphrase`; returns /dev/mapper/<name> and what a rotation did (None: no
        previous passphrase was given, or the header needed none).

        A mapping that is already open is handed out only if `passphrase` opens the header (`WrongPassphrase`, a
        FailedPrecondition, otherwise), so a caller with a wrong secret never reaches an open volume. `previous`:
        the passphrase the header had before a rotation; when `passphrase` opens nothing but `previous` does, the
        volume key is re-wrapped to `passphrase` first (`rotate`), and a rotation cut off half-way (the header has
        more than one keyslot) is finished. Without `previous` a stage costs one passphrase check, as before.
        """
        existing = self.mapping_of(volume_id, device)
        previous = previous if previous is not None and previous != passphrase else None
        rotated: Rotation | None = None
        if previous is not None and (existing is not None or (await self._keyslots(device) or 0) > 1):
            rotated = await self.rotate(device, passphrase, previous)  # checks `passphrase` too
        elif existing is not None and await self.unlocking_slot(device, passphrase) is None:
            raise WrongPassphrase(
                f"the passphrase from the node-stage secret does not open the LUKS header on {device}; the volume is"
                " open on this node, and stays so for whoever staged it"
            )
        if existing is not None:
            return existing, rotated
        try:
            return await self.open(volume_id, device, passphrase), rotated
        except WrongPassphrase:
            if previous is None or rotated is not None:
                raise
        rotated = await self.rotate(device, passphrase, previous)
        return await self.open(volume_id, device, passphrase), rotated

    async def open(self, volume_id: str, device: str, passphrase: Passphrase) -> str:
        """Open the volume's mapping; returns /dev/mapper/<name>. A mapping that is open already is returned as it
        is, without a passphrase check (`unlock` makes one). A wrong passphrase is `WrongPassphrase`, and nothing is
        changed."""
        existing = self.mapping_of(volume_id, device)
        if existing is not None:
            return existing
        name = mapping_name(volume_id)
        if os.path.lexists(self.mapped_path(volume_id)):  # created, never loaded: the name is ours, remove it
            await self.runner.run(["dmsetup", "remove", "--", name], check=False)
        argv = ["cryptsetup", "open", "--type", "luks2", "--disable-keyring"]
        try:
            with key_pipe(passphrase) as key:
                argv += [f"--key-file={fd_file(key)}", "--", device, name]
                await self.runner.run(argv, pass_fds=[key], timeout=300)
        except CommandFailed as exc:
            if exc.returncode == _WRONG_PASSPHRASE:
                raise WrongPassphrase(
                    f"the passphrase from the node-stage secret does not open the LUKS header on {device}"
                ) from None
            if exc.returncode == _BUSY and self.mapping_of(volume_id, device) is not None:
                return self.mapped_path(volume_id)  # opened meanwhile
            if "Cannot initialize device-mapper" in exc.stderr:
                raise FailedPrecondition(
                    "this node cannot open encrypted volumes: the kernel has no device-mapper (load dm_mod and"
                    " dm_crypt on the host)"
                ) from None
            raise _failed("open", device, exc) from None
        path = self.mapped_path(volume_id)
        await self.runner.run(["udevadm", "settle", "--timeout=30"], check=False)
        if not os.path.exists(path):
            raise BackendFailure(f"cryptsetup opened {name}, but {path} did not appear")
        return path

    async def close(self, volume_id: str) -> None:
        """Close the volume's mapping; a mapping that is not open is success. `Busy` while it is in use."""
        name = mapping_name(volume_id)
        if not os.path.lexists(self.mapped_path(volume_id)):
            return
        try:
            await self.runner.run(["cryptsetup", "close", "--", name])
        except CommandFailed as exc:
            if not os.path.lexists(self.mapped_path(volume_id)):
                return
            if exc.returncode == _BUSY or "in use" in exc.stderr:
                raise Busy(f"mapping {name} is in use (mounted or published); unpublish the volume first") from None
            raise _failed("close", name, exc) from None

    async def resize(self, volume_id: str) -> int:
        """Grow the open mapping to its device's size; returns the mapping's new size in bytes."""
        name = mapping_name(volume_id)
        try:
            await self.runner.run(["cryptsetup", "resize", "--", name])
        except CommandFailed as exc:
            raise _failed("resize", name, exc) from None
        return await self.mounter.device_size(self.mapped_path(volume_id))

    # -- key rotation ---------------------------------------------------------------------------------------------
    async def unlocking_slot(self, device: str, passphrase: Passphrase) -> int | None:
        """The keyslot of the header on `device` that `passphrase` opens, or None if it opens none. Reads only."""
        argv = ["cryptsetup", "open", "--test-passphrase", "--verbose", "--type", "luks2"]
        with key_pipe(passphrase) as key:
            argv += [f"--key-file={fd_file(key)}", "--", device]
            result = await self.runner.run(argv, pass_fds=[key], timeout=300, check=False)
        if result.returncode == _WRONG_PASSPHRASE:
            return None
        unlocked = _UNLOCKED.search(result.text)
        if result.returncode != 0 or unlocked is None:
            raise _failed(
                "open --test-passphrase", device, CommandFailed(result.argv, result.returncode, result.error_text)
            )
        return int(unlocked.group(1))

    async def rotate(self, device: str, new: Passphrase, previous: Passphrase) -> Rotation:
        """Re-wrap the volume key of the header on `device` from `previous` to `new`, touching no data.

        Two steps, each of which leaves the header whole wherever a kill cuts it off: a keyslot for `new` is added
        (luksAddKey, authorised by `previous`; LUKS2 writes the new keyslot's area, then its metadata in two copies,
        so the header lists either the new keyslot or not), then the keyslot `previous` opens is destroyed
        (luksKillSlot of that slot number, authorised by `new`, never the slot `new` opens). In between, both open.
        Run again after a kill, it finds where it stopped: `new` opens and `previous` still opens another keyslot,
        so only the second step is left. `WrongPassphrase` when neither opens; then nothing is changed.
        """
        if not await self.is_ours(device):
            raise FailedPrecondition(f"device {device} holds no LUKS2 header of localdisk; no key is re-wrapped")
        new_slot = await self.unlocking_slot(device, new)
        outcome = Rotation.REWRAPPED
        if new_slot is None:
            old_slot = await self.unlocking_slot(device, previous)
            if old_slot is None:
                raise WrongPassphrase(
                    f"neither the passphrase nor the previous passphrase opens the LUKS header on {device}; nothing"
                    " is changed"
                )
            new_slot = await self._add_keyslot(device, previous, new)
        else:
            if (await self._keyslots(device) or 0) < 2:
                return Rotation.CURRENT
            old_slot = await self.unlocking_slot(device, previous)
            if old_slot is None or old_slot == new_slot:
                return Rotation.CURRENT
            outcome = Rotation.FINISHED
        if old_slot != new_slot:
            await self._kill_slot(device, old_slot, new)
        return outcome

    async def change_passphrase(self, device: str, old: Passphrase, new: Passphrase) -> Rotation:
        """A key rotation from `old` to `new` (`rotate`); kept for callers of the library."""
        return await self.rotate(device, new, old)

    async def _add_keyslot(self, device: str, existing: Passphrase, new: Passphrase) -> int:
        argv = ["cryptsetup", "luksAddKey", "--batch-mode", "--verbose", "--type", "luks2", *self.pbkdf.argv()]
        try:
            with key_pipe(existing) as old_key, key_pipe(new) as new_key:
                argv += [f"--key-file={fd_file(old_key)}", "--", device, fd_file(new_key)]
                result = await self.runner.run(argv, pass_fds=[old_key, new_key], timeout=600)
        except CommandFailed as exc:
            if exc.returncode == _WRONG_PASSPHRASE:
                raise WrongPassphrase(f"the previous passphrase no longer opens the LUKS header on {device}") from None
            raise _failed("luksAddKey", device, exc) from None
        created = _CREATED.search(result.text)
        if created is not None:
            return int(created.group(1))
        slot = await self.unlocking_slot(device, new)
        if slot is None:
            raise BackendFailure(f"cryptsetup luksAddKey on {device} finished, but the new passphrase opens nothing")
        return slot

    async def _kill_slot(self, device: str, slot: int, remaining: Passphrase) -> None:
        argv = ["cryptsetup", "luksKillSlot", "--batch-mode", "--type", "luks2"]
        try:
            with key_pipe(remaining) as key:
                argv += [f"--key-file={fd_file(key)}", "--", device, str(slot)]
                await self.runner.run(argv, pass_fds=[key], timeout=600)
        except CommandFailed as exc:
            raise _failed("luksKillSlot", device, exc) from None


async def erase(runner: CommandRunner, device: str, *, discard: bool = False) -> None:
    """Crypto-erase `device`: destroy every keyslot (`cryptsetup erase`), then clear the header area, so the volume
    key is gone and the data segment is unreadable. Refused (`Busy`) while the device is in use (an open mapping
    holds it); a device without a header is cleared there all the same (a half-done erase, or never formatted).

    The header area is zeroed, or with `discard` (thin LVs) discarded: a thin snapshot or clone shares those blocks
    with its origin, and a discard unmaps them from `device` alone without allocating new ones, where zeros would be
    written to 16 MiB of fresh pool blocks. What the discard leaves in the pool's freed blocks is no secret: the
    keyslots there were overwritten by `cryptsetup erase` first. If the device does not take discards, or a LUKS
    signature is still found afterwards (pool chunks larger than the header area), the area is zeroed instead."""
    os.close(open_exclusive(device))  # Busy while mounted, mapped or open exclusively: nothing is destroyed
    mounter = Mounter(runner)
    if "crypto_LUKS" in ((await mounter.probe(device)).description or ""):
        result = await runner.run(["cryptsetup", "erase", "--batch-mode", "--", device], check=False)
        if result.returncode not in (0, 1):  # 1: not a LUKS device any more (a half-done erase): zeroed below
            raise _failed("erase", device, CommandFailed(result.argv, result.returncode, result.error_text))
    started = time.monotonic()
    shown = ["BLKZEROOUT", "--luks-header", device]
    if discard and await anyio.to_thread.run_sync(_clear_head, device, HEADER_BYTES, _BLKDISCARD):
        shown = ["BLKDISCARD", "--luks-header", device]
        if "crypto_LUKS" in ((await mounter.probe(device)).description or ""):
            shown = ["BLKZEROOUT", "--luks-header", device]
            await anyio.to_thread.run_sync(_clear_head, device, HEADER_BYTES, _BLKZEROOUT)
    else:
        await anyio.to_thread.run_sync(_clear_head, device, HEADER_BYTES, _BLKZEROOUT)
    for observe in runner.observers:
        observe(shown, time.monotonic() - started, True)


def parse_dump(text: str) -> int | None:
    """From `cryptsetup luksDump` text: the number of keyslots of a LUKS2 header made by localdisk, or None when the
    header is not ours (another label or subsystem, or not LUKS2)."""
    fields: dict[str, str] = {}
    keyslots, section = 0, ""
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            section = line.strip().rstrip(":")
            continue
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if section == "Keyslots" and line.startswith("  ") and not line.startswith("\t") and key.strip().isdigit():
            keyslots += 1
        elif not line[:1].isspace():
            fields[key.strip()] = value.strip()
    ours = fields.get("Version") == "2" and fields.get("Label") == LABEL and fields.get("Subsystem") == SUBSYSTEM
    return keyslots if ours else None


@contextlib.contextmanager
def key_pipe(passphrase: Passphrase) -> Iterator[int]:
    """The read end of a pipe that holds the passphrase, closed for writing, for one cryptsetup run (`pass_fds`).

    Not stdin: `CommandRunner.run` writes `input` while the child runs, and a cryptsetup that exits before reading
    it (no device-mapper, not a LUKS device) breaks that write, losing its exit status and message. A passphrase
    (at most 512 bytes) fits a pipe's buffer, so the pipe is filled before the process starts."""
    read_end, write_end = os.pipe()
    try:
        try:
            os.write(write_end, passphrase.reveal())
        finally:
            os.close(write_end)
        yield read_end
    finally:
        os.close(read_end)


def fd_file(fd: int) -> str:
    """The path by which a child process opens the descriptor `fd` it inherited."""
    return f"/proc/self/fd/{fd}"


def _zero_head(device: str, length: int) -> None:
    _clear_head(device, length, _BLKZEROOUT)


def _clear_head(device: str, length: int, request: int) -> bool:
    """Zero (BLKZEROOUT) or discard (BLKDISCARD) the first `length` bytes of `device`; False if the device does not
    take that request (a discard where the device has none)."""
    fd = open_exclusive(device)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        length = min(length, size - size % 512)
        if length:
            fcntl.ioctl(fd, request, struct.pack("=QQ", 0, length))
        os.fsync(fd)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise Busy(f"{device} is in use; its LUKS header is not erased") from None
        if request == _BLKDISCARD and exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
            return False
        raise BackendFailure(f"clearing the LUKS header area of {device} failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    return True


def _lower_devices(rdev: int) -> list[int]:
    """The devices beneath a device-mapper device (sysfs `slaves`), as device numbers."""
    slaves = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/slaves")
    found = []
    try:
        entries = sorted(slaves.iterdir())
    except OSError:
        return []
    for entry in entries:
        try:
            major, minor = (entry / "dev").read_text().strip().split(":")
        except (OSError, ValueError):
            continue
        found.append(os.makedev(int(major), int(minor)))
    return found
