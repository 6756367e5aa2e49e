"""How the partition backend marks what is its own on a GPT disk: partition names, partition types, disk labels.

The disks' tables are the backend's only state, so everything it must recognise after a restart is written into
them. A volume is a partition named `ld-<key>` (`READY_PREFIX`), the key a hash of the CSI name (`volume_key`); a
partition still being made is named `lp-<key>` (`PENDING_PREFIX`) until it is wiped and renamed, so no lookup returns
it and a crash leaves something recognisably unfinished. An encrypted volume has the partition type "Linux LUKS"
(`LUKS_TYPE`). A disk localdisk labelled itself carries a disk GUID that names the pool it was labelled for
(`label_id`, `labelled_for`); a label write cut off half-way is recognised from what it leaves
(`unfinished_label`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import uuid
from pathlib import Path

from localdisk.backends.gpt import Partition, Table, has_protective_mbr, parse_header
from localdisk.sizes import MiB

GPT_NAME_LIMIT = 36  # UTF-16 code units in a GPT partition entry's name field
READY_PREFIX = "ld-"  # a volume handed out
PENDING_PREFIX = "lp-"  # created, not yet wiped and handed out (left by a crash, or by a cancelled create whose
# own clean-up did not finish: removed at start-up and by the background reclaim)
KEY_LENGTH = 32
LUKS_TYPE = "CA7D7CCB-63ED-4C53-861C-1742536059CC"  # GPT type "Linux LUKS": the volume is encrypted
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # GPT type "Linux filesystem", sfdisk's default
LABEL_MARK = "10CA1D15"  # the first 8 hex digits of the disk GUID of every GPT label localdisk writes
SYSFS_BLOCK = Path("/sys/class/block")
_OURS = re.compile(rf"^(?:{READY_PREFIX}|{PENDING_PREFIX})[a-z2-7]{{{KEY_LENGTH}}}$")
assert len(READY_PREFIX) + KEY_LENGTH <= GPT_NAME_LIMIT
assert len(READY_PREFIX) == len(PENDING_PREFIX)


def volume_key(name: str) -> str:
    """The GPT-name key of a CSI name: 32 base32 characters (160 bits) of its SHA-256.

    A CSI name may be 128 bytes of any UTF-8 and a GPT name holds 36 UTF-16 units, so the name itself cannot be
    stored; its hash can. 160 bits make an accidental collision negligible (for a million volumes on one node the
    birthday bound is about 1e12 / 2**161, i.e. 1e-36), and crafting one needs about 2**80 SHA-256 evaluations,
    far beyond anyone who can merely choose PVC names. Base32 keeps the name to [a-z2-7], safe in sfdisk's argv.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:KEY_LENGTH]


def is_ours(part: Partition) -> bool:
    return bool(_OURS.match(part.name))


def is_ready(part: Partition) -> bool:
    return is_ours(part) and part.name.startswith(READY_PREFIX)


def key_of(part: Partition) -> str:
    """The key in the name of a partition of ours, ready or pending (both prefixes have the same length)."""
    return part.name[len(READY_PREFIX) :]


def ready_name(part: Partition) -> str:
    """The name pending partition `part` takes once it is a volume."""
    return READY_PREFIX + key_of(part)


def pool_mark(pool: str) -> str:
    """The 28 bits of the pool name's hash a label written for `pool` carries (see `label_id`)."""
    return hashlib.sha256(pool.encode()).hexdigest()[:7].upper()


def label_id(pool: str) -> str:
    """A fresh disk GUID for a label localdisk writes for `pool`: `10CA1D15-PPPP-4PPP-xxxx-xxxxxxxxxxxx`, the mark,
    28 bits of the pool name's hash, and random bits (a valid version 4 UUID). Discovery takes a GPT disk only when
    its GUID says localdisk labelled it for this very pool; a foreign GPT disk carries a random GUID (a 1 in 2**60
    chance to look like ours)."""
    mark, rest = pool_mark(pool), uuid.uuid4().hex.upper()
    return f"{LABEL_MARK}-{mark[:4]}-4{mark[4:]}-{rest[16:20]}-{rest[20:]}"


def labelled_for(table: Table) -> str | None:
    """The pool mark of a label localdisk wrote (see `label_id`), or None for any other GPT."""
    return _mark_of(table.label_id)


def _mark_of(disk_guid: str) -> str | None:
    guid = disk_guid.upper().replace("-", "")
    return guid[8:12] + guid[13:16] if len(guid) == 32 and guid.startswith(LABEL_MARK) else None


def unfinished_label(device: str, pool: str) -> bool:
    """Whether `device` holds what a label write of `pool` cut off before its last write leaves (see the backend's
    `_label`): no protective MBR yet, and a GPT header, primary or backup, whose disk GUID marks `pool` and whose
    entry array is all zeros. Reads only. No foreign disk looks so: its GUID would have to carry the mark (1 in
    2**60)."""
    sector = int(_read_text(SYSFS_BLOCK / Path(device).name / "queue" / "logical_block_size") or 512)
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if has_protective_mbr(os.pread(fd, 512, 0)):
            return False
        last = os.lseek(fd, 0, os.SEEK_END) // sector - 1
        for lba in (1, last):
            header = parse_header(os.pread(fd, sector, lba * sector))
            if header is None or _mark_of(header.disk_guid) != pool_mark(pool):
                continue
            length = header.entries * header.entry_size
            if 0 < length <= 4 * MiB and not any(os.pread(fd, length, header.entries_lba * sector)):
                return True
        return False
    finally:
        os.close(fd)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
