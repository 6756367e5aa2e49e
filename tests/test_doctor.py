"""`localdisk doctor`'s device-mapper check: decided by asking the driver (DM_VERSION), not by the control node.

The decision is tested with the open and the ioctl faked, one errno at a time; the host test holds the answer on this
host against what `dmsetup version` says.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from localdisk.cli import app
from localdisk.commands.doctor import (
    DM_CONTROL,
    DM_IOCTL_HEAD,
    DM_IOCTL_SIZE,
    DM_VERSION,
    NO_DEVICE_MAPPER,
    Check,
    _device_mapper,
    dm_version,
)

LVM = {"lvm", "thin", "partition"}


def failing(code: int) -> Callable[..., int]:
    def fail(*args: object) -> int:
        raise OSError(code, os.strerror(code))

    return fail


def open_devnull(path: str, flags: int) -> int:
    assert path == DM_CONTROL and flags & os.O_RDWR
    return os.open(os.devnull, os.O_RDONLY)  # a real descriptor for dm_version to close


def kernel_answering(version: tuple[int, int, int]) -> Callable[[int, int, bytearray], object]:
    def ioctl(fd: int, request: int, buffer: bytearray) -> int:
        assert request == DM_VERSION == 0xC138FD00  # _IOWR(0xfd, 0, 312 bytes)
        assert len(buffer) == DM_IOCTL_SIZE == 312
        assert DM_IOCTL_HEAD.unpack_from(buffer) == (4, 0, 0, 312, 312), "asks as interface 4.0.0, whole struct"
        DM_IOCTL_HEAD.pack_into(buffer, 0, *version, 312, 312)
        return 0

    return ioctl


ANSWERING = kernel_answering((4, 48, 0))


def check_with(
    open_file: Callable[[str, int], int],
    ioctl: Callable[[int, int, bytearray], object],
    proc_misc: str = "",
    backends: set[str] = LVM,
) -> Check:
    return _device_mapper(backends, lambda: dm_version(open_file=open_file, ioctl=ioctl), proc_misc=lambda: proc_misc)


def test_a_driver_that_answers_is_ok_with_its_version() -> None:
    check = check_with(open_devnull, kernel_answering((4, 48, 0)))
    assert (check.ok, check.detail, check.fix) == (True, "kernel driver 4.48.0", "")


def test_a_control_node_without_a_driver_is_no_device_mapper() -> None:
    """This host's case: the node exists (dmsetup makes it) but opening it is ENODEV."""
    check = check_with(failing(errno.ENODEV), ANSWERING)
    assert not check.ok and check.required
    assert check.detail == NO_DEVICE_MAPPER
    assert "partition backend" in check.fix and "localdisk sandbox" in check.fix
    assert not check_with(failing(errno.ENODEV), ANSWERING, backends={"partition"}).required, (
        "partitions need no device-mapper"
    )


def test_no_control_node() -> None:
    check = check_with(failing(errno.ENOENT), ANSWERING, proc_misc=" 1 psaux\n")
    assert not check.ok and check.detail.startswith(NO_DEVICE_MAPPER) and "localdisk sandbox" in check.fix
    registered = check_with(failing(errno.ENOENT), ANSWERING, proc_misc=" 236 device-mapper\n")
    assert not registered.ok and "dmsetup mknodes" in registered.fix, "the driver is there, only the node is missing"


@pytest.mark.parametrize("where", ["open", "ioctl"])
def test_no_permission_says_run_as_root(where: str) -> None:
    denied = failing(errno.EACCES)  # open: the node's mode; ioctl: the driver wants CAP_SYS_ADMIN
    check = check_with(denied, denied) if where == "open" else check_with(open_devnull, denied)
    assert not check.ok and "permission denied" in check.detail and "as root" in check.fix


def test_a_driver_that_refuses_the_ioctl_is_not_ok() -> None:
    check = check_with(open_devnull, failing(errno.EINVAL))
    assert not check.ok and "does not answer DM_VERSION" in check.detail


@pytest.mark.skipif(not Path(DM_CONTROL).exists(), reason=f"no {DM_CONTROL} on this host")
@pytest.mark.skipif(shutil.which("dmsetup") is None, reason="needs dmsetup (lvm2) as the witness")
def test_on_this_host_doctor_agrees_with_dmsetup() -> None:
    witness = subprocess.run(["dmsetup", "version"], capture_output=True, text=True, timeout=30, check=False)
    result = CliRunner().invoke(app, ["doctor", "--json"])
    [check] = [c for c in json.loads(result.stdout) if c["name"] == "device-mapper"]
    assert check["ok"] is (witness.returncode == 0), (check, witness.stdout, witness.stderr)
    if check["ok"]:
        assert check["detail"].startswith("kernel driver 4.")
    elif "No such device" in witness.stderr:  # a kernel without device-mapper, as on this project's build host
        assert check["detail"] == NO_DEVICE_MAPPER
        assert result.exit_code == 1, "required, since doctor without a config assumes every backend"
