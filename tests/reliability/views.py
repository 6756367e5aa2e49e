"""What the backends' own tools say exists, read without localdisk's code: the ground truth for the end checks.

The crash and concurrency tests compare what the client was told with these views, so a bug in the backend's
own listing cannot hide a leaked or lost volume.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import tomllib
from pathlib import Path

MiB = 1024 * 1024


def _run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, env={"LC_ALL": "C", "PATH": _PATH}).stdout


_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class PartitionView:
    """Every partition of the pool's disks, by GPT name, from `sfdisk --json`; and the kernel's view from sysfs."""

    def __init__(self, disks: list[str]) -> None:
        self.disks = disks
        self._problems: list[str] = []

    @staticmethod
    def volume_name(csi_name: str) -> str:
        # Spelled out again here rather than imported: the test states what the on-disk name must be.
        digest = hashlib.sha256(csi_name.encode("utf-8", "surrogatepass")).digest()
        return "ld-" + base64.b32encode(digest).decode("ascii").lower()[:32]

    @staticmethod
    def snapshot_name(csi_name: str) -> str:
        raise AssertionError("the partition backend has no snapshots")

    def tables(self) -> dict[str, dict[str, object]]:
        return {disk: json.loads(_run(["sfdisk", "--json", "--", disk]))["partitiontable"] for disk in self.disks}

    def objects(self) -> dict[str, tuple[str, int]]:
        found: dict[str, tuple[str, int]] = {}
        self._problems = []
        for disk, table in self.tables().items():
            sector = int(str(table.get("sectorsize", 512)))
            partitions = table.get("partitions", [])
            assert isinstance(partitions, list)
            for part in partitions:
                name = str(part.get("name", ""))
                entry = (str(part["uuid"]).lower(), int(part["size"]) * sector)
                if name in found:
                    self._problems.append(f"two partitions named {name!r}: {found[name]} and {entry} on {disk}")
                found[name] = entry
                self._problems += self._kernel_problem(disk, str(part["node"]), int(part["start"]), int(part["size"]))
        return found

    @staticmethod
    def _kernel_problem(disk: str, node: str, start: int, size: int) -> list[str]:
        """The kernel must map each table entry at the same place and size (sysfs counts 512-byte units)."""
        number = node.rsplit("p", 1)[-1]
        base = Path("/sys/class/block") / Path(disk).name
        for child in base.glob(f"{Path(disk).name}*"):
            try:
                if (child / "partition").read_text().strip() != number:
                    continue
                kernel = (int((child / "start").read_text()), int((child / "size").read_text()))
            except OSError:
                continue
            # sfdisk counts sectors of the disk's logical size; loop devices here use 512 bytes.
            if kernel != (start, size):
                return [f"{node}: the kernel maps {kernel} (start, size), the table says {(start, size)}"]
            return []
        return [f"{node}: in the table but unknown to the kernel"]

    def problems(self) -> list[str]:
        return list(self._problems)


class LvmView:
    """Every LV carrying localdisk's owner tag in the pool's VG, by LV name, from `lvs` (run inside the guest)."""

    OWNER_TAG = "localdisk.csi.io/owned"
    PENDING_TAG = "localdisk.csi.io/pending"

    def __init__(self, volume_group: str, thin_pool: str | None = None) -> None:
        self.volume_group = volume_group
        self.thin_pool = thin_pool
        self._problems: list[str] = []

    @classmethod
    def from_config(cls, path: Path, backend: str) -> LvmView:
        pools = tomllib.loads(path.read_text())["pools"][backend]
        (pool,) = pools.values()
        return cls(pool["volume_group"], pool.get("thin_pool"))

    @staticmethod
    def _lv_name(prefix: str, csi_name: str) -> str:
        return prefix + hashlib.sha256(csi_name.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def volume_name(self, csi_name: str) -> str:
        return self._lv_name("ldv-", csi_name)

    def snapshot_name(self, csi_name: str) -> str:
        return self._lv_name("lds-", csi_name)

    def objects(self) -> dict[str, tuple[str, int]]:
        argv = ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "lv_name,lv_size,lv_tags,pool_lv"]
        report = json.loads(_run([*argv, "--", self.volume_group]))["report"][0]["lv"]
        found: dict[str, tuple[str, int]] = {}
        self._problems = []
        for lv in report:
            tags = lv["lv_tags"].split(",")
            if self.OWNER_TAG not in tags:
                continue
            if self.PENDING_TAG in tags:
                self._problems.append(f"LV {lv['lv_name']} is still pending")
            if self.thin_pool and lv["pool_lv"] != self.thin_pool:
                self._problems.append(f"LV {lv['lv_name']} is not in thin pool {self.thin_pool}")
            found[lv["lv_name"]] = (lv["lv_name"], int(lv["lv_size"]))
        return found

    def problems(self) -> list[str]:
        return list(self._problems)
