"""Hostile request fields, and a `CommandRunner` observer that checks no hostile string reaches a command line.

The strategies generate what a careless or malicious CO, user or PVC could put in a CSI request: names that look
like options or shell, NUL and control characters, huge and Unicode strings, sizes that are zero, negative, enormous
or unaligned, parameters with unknown keys, capabilities mixed or missing, paths that are relative, climb with `..`
or lead out of the kubelet root through symlinks, and volume IDs of other backends, pools or nodes.

`ArgvWatch` sees every argv the backends and the mounter run. After a test it checks that no argv element holds a
hostile string (anything distinctive the test sent), that every element starting with `-` is an option localdisk
itself uses, and that every element derived from a request path is absolute (so it cannot read as an option) and
comes after `--` where the tool takes one.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import strategies as st

from localdisk._proto.csi.v1 import (
    CapacityRange,
    VolumeCapability,
    VolumeCapabilityAccessMode,
    VolumeCapabilityAccessModeMode,
    VolumeCapabilityBlockVolume,
    VolumeCapabilityMountVolume,
)
from localdisk.sizes import GiB, MiB, TiB
from tests.reliability.tally import TALLY

# Strings that cannot appear in any command localdisk builds on its own, so finding one in an argv is a leak.
NASTY = [
    "--force",
    "-rf",
    "--help",
    "-o loop",
    "--yes",
    "$(reboot)",
    "`id`",
    "a;b|c&d",
    "../../etc/passwd",
    "\x00",
    "nul\x00inside",
    "\n--newline",
    "x" * 10_000,
    "\u202eevil",
    "ünïcødé 🙂",
    "名前",
    "ld-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    "lp-zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    " leading space",
    "%s%n%x",
    "'quoted' \"twice\"",
]
NAMES = st.one_of(st.sampled_from(NASTY), st.just(""), st.text(max_size=200), st.text(min_size=120, max_size=140))
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SIZES = st.one_of(
    st.sampled_from([0, -1, 1, 511, 4095, MiB - 1, MiB + 1, 3 * MiB + 12345, 10 * GiB, 64 * TiB, 2**63 - 1, -(2**63)]),
    st.integers(min_value=0, max_value=64 * MiB),
    INT64,
)
RANGES = st.one_of(st.none(), st.builds(CapacityRange, required_bytes=SIZES, limit_bytes=SIZES))
FS_TYPES = st.one_of(st.sampled_from(["ext4", "xfs", "btrfs", "", "vfat", "ext4 -F", "-F", "../ext4"]), NAMES)
MOUNT_FLAGS = st.one_of(
    st.sampled_from(
        ["noatime", "ro", "nodev", "bind", "remount", "rw,exec", "-o", "--bind", "loop=/x", "x-mount.mkdir"]
    ),
    st.sampled_from(NASTY),
)
MODES = st.sampled_from(list(VolumeCapabilityAccessModeMode))
CAPABILITIES = st.builds(
    VolumeCapability,
    block=st.one_of(st.none(), st.just(VolumeCapabilityBlockVolume())),
    mount=st.one_of(
        st.none(),
        st.builds(VolumeCapabilityMountVolume, fs_type=FS_TYPES, mount_flags=st.lists(MOUNT_FLAGS, max_size=3)),
    ),
    access_mode=st.one_of(st.none(), st.builds(VolumeCapabilityAccessMode, mode=MODES)),
)


def parameters(backend: str) -> st.SearchStrategy[dict[str, str]]:
    return st.one_of(
        st.just({"backend": backend}),
        st.fixed_dictionaries(
            {"backend": st.sampled_from([backend, "lvm", "thin", "fake", "", backend.upper(), "--force"])},
            optional={"pool": NAMES, "csi.storage.k8s.io/pvc/name": NAMES},
        ),
        st.dictionaries(NAMES, NAMES, max_size=3),
        st.just({"backend": backend, "fs_type": "ext4"}),  # an unknown key
    )


def volume_ids(backend: str, pool: str, real: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """IDs of other backends, pools and nodes, malformed ones, and mangled variants of real ones."""
    mangled = [v.upper() for v in real] + [v.replace(f":{pool}:", ":other:") for v in real]
    mangled += [f"lvm:{pool}:{v.rsplit(':', 1)[-1]}" for v in real] + [f"{v}/.." for v in real]
    return st.one_of(
        st.sampled_from(
            [
                "",
                ":::",
                f"{backend}:{pool}:",
                f"{backend}:{pool}:--force",
                f"{backend}:{pool}:../../dev/sda",
                f"{backend}:{pool}:00000000-0000-0000-0000-000000000000",
                f"{backend}:other-pool:00000000-0000-0000-0000-000000000000",
                "lvm:vg0:ldv-0123456789abcdef0123456789abcdef",
                "thin:pool:lds-0123456789abcdef0123456789abcdef",
                "fake:default:v1",
                f"{backend}:{pool}:" + "a" * 200,
                *mangled,
            ]
        ),
        st.builds(lambda s: f"{backend}:{pool}:{s}", NAMES),
        NAMES,
    )


def path_strategy(root: str, inside_link: str, outside_link: str) -> st.SearchStrategy[str]:
    """Paths in, around and out of the kubelet root `root`; the links are symlinks under it (in, out)."""
    odd = ["..", ".", "", "-o", "--bind", "ünï 🙂", "a\x00b", "x" * 300, "y" * 255]
    pieces = st.sampled_from(["pods", "p1", "mount", "empty-dir", "empty-file", "file", "real", *odd])
    relative = st.lists(pieces, max_size=5).map("/".join)
    return st.one_of(
        relative,
        relative.map(lambda r: f"{root}/{r}"),
        relative.map(lambda r: f"{inside_link}/{r}"),
        relative.map(lambda r: f"{outside_link}/{r}"),
        st.sampled_from(
            [
                root,
                root + "/",
                root + "-sibling/pods/x",
                "/",
                "/etc",
                "/dev/sda",
                "-o",
                "--bind",
                "relative/path",
                f"{root}/pods/../../etc",
                f"{root}//pods/x",
                f"{root}/pods/" + "y" * 5000,
                f"{root}/pods/file/below-a-file",
                f"{root}/pods/" + "z" * 256,
                outside_link,
                inside_link,
                f"{inside_link}/new",
                f"{outside_link}/new",
            ]
        ),
        NAMES,
    )


# -- watching argv ------------------------------------------------------------------------------------------------
# Every option localdisk's partition backend and mounter pass (checked: grep the argv lists in src/localdisk).
KNOWN_OPTIONS = {
    "--no-canonicalize",
    "--",
    "--script",
    "--align",
    "--json",
    "--all",
    "--quiet",
    "--zeroout",
    "--update",
    "--delete",
    "--nr",
    "--no-reread",
    "--no-tell-kernel",
    "--wipe",
    "--wipe-partitions",
    "--append",
    "--part-label",
    "--getsize64",
    "--ends",  # not a process: blockdev.erase_signatures as its observers see it
    "--setro",
    "--setrw",
    "--bind",
    "--find",
    "--show",
    "--partscan",
    "--detach",
    "-N",
    "-p",
    "-t",
    "-o",
    "-q",
    "-E",
    "-K",
    "-d",
    "-l",
    # LVM (lvmcmd.py)
    "--reportformat",
    "--units",
    "--nosuffix",
    "--configreport",
    "--addtag",
    "--deltag",
    "--thinpool",
    "--devicesfile",
    "--type",
    "-y",
    "-W",
    "-Z",
    "-a",
    "-L",
    "-V",
    "-n",
    "-s",
    "-k",
}
KNOWN_OPTION_PREFIXES = ("--timeout=",)
NO_DASHES = {"btrfs", "blockdev"}  # tools that take no `--`: a path reaches them absolute, so never as an option
OWN_MOUNT_OPTIONS = {"ro", "nouuid"}  # added by the mounter itself
_BENIGN = set(string.ascii_letters + string.digits + "-_.:/=,+@")


def distinctive(text: str) -> bool:
    """Whether finding `text` inside an argv element means it came from the request (not a coincidence)."""
    if text in NASTY:
        return True
    return len(text) >= 8 and not text.isdigit() and not set(text) <= set(string.hexdigits + "-")


@dataclass
class ArgvWatch:
    """A `CommandRunner` observer that records every argv; `check` raises on anything a request smuggled in."""

    seen: list[list[str]] = field(default_factory=list)
    checked: int = 0

    def __call__(self, argv: Sequence[str], duration: float, ok: bool) -> None:
        self.seen.append(list(argv))

    def check(self, sent: Iterable[str], paths: Iterable[str] = (), flags: Iterable[str] = ()) -> None:
        """`sent`: strings from requests that must never reach a command. `paths`: request paths, which may
        reach one, absolute and after `--` (btrfs and blockdev take no `--`). `flags`: mount flags accepted by
        validation, which may reach mount(8) only as options in the value of `-o`."""
        hostile = {s for s in sent if s and distinctive(s)}
        paths = {p for p in paths if p}
        flags = {f for f in flags if f}
        for argv in self.seen:
            self.checked += 1
            self._check_one(argv, hostile, paths, flags)
        self.seen.clear()

    @staticmethod
    def _check_one(argv: list[str], hostile: set[str], paths: set[str], flags: set[str]) -> None:
        after_dashes = False
        for index, element in enumerate(argv[1:], start=1):
            where = f"argv {argv}: element {index} {element!r}"
            if element == "--":
                after_dashes = True
                continue
            if argv[0] == "mount" and argv[index - 1] == "-o":
                for option in element.split(","):
                    assert option in flags or option in OWN_MOUNT_OPTIONS, f"{where}: {option!r} was not asked for"
                    assert not option.startswith("-"), f"{where}: a mount option that reads as a command option"
                continue
            if any(p in element for p in paths):
                assert element.startswith("/"), f"{where} holds a request path but is not absolute"
                assert after_dashes or argv[0] in NO_DASHES, f"{where} holds a request path before `--`"
                continue
            leaked = [h for h in hostile if h in element]
            assert not leaked, f"{where} contains request input {leaked[0]!r}"
            assert set(element) <= _BENIGN, f"{where} has characters localdisk never puts in a command"
            if element.startswith("-"):
                assert element in KNOWN_OPTIONS or element.startswith(KNOWN_OPTION_PREFIXES), (
                    f"{where} reads as an option localdisk does not use"
                )


# -- answers ------------------------------------------------------------------------------------------------------
def proper(exc: GRPCError) -> None:
    """A refusal must be a status chosen on purpose, with a message: never UNKNOWN or INTERNAL. Every refusal is
    counted by status for the summary, so it says 0 UNKNOWN and 0 INTERNAL in so many words."""
    TALLY.refusals[exc.status.name] += 1
    assert exc.status not in (Status.UNKNOWN, Status.INTERNAL), (exc.status, exc.message)
    assert exc.message, f"{exc.status.name} without a message"
