"""csi-sanity against `localdisk serve` on the host: the in-memory fake pool and a partition pool on loop disks.

The LVM pools run in the sandbox (`tests/lvm/test_sanity_lvm.py`); `nox -s sanity` runs both and prints the
summary. Run one here with `pytest -m sanity tests/test_sanity.py` (partitions need root and loop devices).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localdisk.sizes import GiB, MiB
from tests import sanity
from tests.loopdisks import loop_disks, needs_loop_devices

# Specs that need a block device: the fake pool keeps volumes in memory and gives none, so its Node service answers
# FAILED_PRECONDITION "no device on this node" to staging. Everything else, Node included, runs.
FAKE_NEEDS_DEVICE = [
    "NodePublishVolume with single node multi writer capability",
    "NodeUnpublishVolume should remove target path",
    "NodeGetVolumeStats should fail when volume does not exist on the specified path",
    "NodeExpandVolume should work if node-expand is called after node-publish",
    r"Node Service should work",
    r"Node Service should be idempotent",
]


def _check(result: sanity.SanityResult) -> None:
    assert result.passed > 0, f"csi-sanity ran no spec: {result}"
    assert result.failed == 0, "\n".join(sanity.summary_lines([result]))


@pytest.mark.sanity
@pytest.mark.timeout(900)
def test_sanity_fake() -> None:
    result = sanity.run_sanity(
        "fake",
        "[pools.fake.default]\ndefault = true\n",
        parameters={"backend": "fake"},
        volume_size=64 * MiB,
        skip=FAKE_NEEDS_DEVICE,
    )
    _check(result)


@pytest.mark.sanity
@pytest.mark.timeout(900)
@needs_loop_devices
@pytest.mark.parametrize("access_type", ["mount", "block"])
async def test_sanity_partition(access_type: str) -> None:
    async with loop_disks(2, 2 * GiB) as disks:
        pools = f'[pools.partition.sanity]\ndefault = true\nfs_type = "xfs"\ndisks = {json.dumps(disks)}\n'
        result = sanity.run_sanity(
            f"partition-{access_type}",
            pools,
            parameters={"backend": "partition"},
            volume_size=320 * MiB,
            expand_size=384 * MiB,
            access_type=access_type,
        )
    _check(result)


def test_parse_junit_counts_failures_skips_and_suite_nodes() -> None:  # a unit test: runs in `nox -s tests`
    report = """<testsuites><testsuite>
      <testcase name="[BeforeSuite]"></testcase>
      <testcase name="A works"></testcase>
      <testcase name="B fails"><failure message="boom">x</failure></testcase>
      <testcase name="C skipped"><skipped message="no cap"/></testcase>
      <testcase name="D errors"><error message="panic"/></testcase>
    </testsuite></testsuites>"""
    result = sanity.parse_junit("x", report)
    assert (result.passed, result.failed, result.skipped) == (1, 2, 1)
    assert result.failures == ["B fails", "D errors"]
    assert result.skipped_specs == ["C skipped"]


def test_missing_binary_skips_with_a_hint_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CSI_SANITY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no csi-sanity on it
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="CSI_SANITY"):
        sanity.sanity_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        sanity.sanity_binary()
    found = tmp_path / "csi-sanity"
    found.write_text("#!/bin/sh\n")
    found.chmod(0o755)
    assert sanity.sanity_binary() == str(found)
