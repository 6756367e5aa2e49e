"""csi-sanity against `localdisk serve` on real LVM, in the sandbox: one server per backend.

A server holding both an lvm and a thin pool advertises snapshots for all its volumes, and csi-sanity's snapshot
specs then fail on the linear ones (linear LVs have no snapshots here); so each backend gets a server of its own,
as docs/deploy.md says. `nox -s sanity` runs this module in a sandbox guest with the host's runs.
"""

from __future__ import annotations

import pytest

from localdisk.backends.lvmcmd import Lvm
from localdisk.sizes import MiB
from tests import sanity
from tests.lvm.conftest import LINEAR_VG, THIN_POOL, THIN_VG

pytestmark = [pytest.mark.uml, pytest.mark.sanity, pytest.mark.anyio, pytest.mark.timeout(1500)]


async def _left_over(lvm: Lvm, vg: str) -> list[str]:
    report = await lvm.report(vg)
    return sorted(lv.name for lv in report.lvs.values() if not lv.hidden and lv.name != THIN_POOL)


@pytest.mark.parametrize(
    ("backend", "pool"),
    [
        ("lvm", f'volume_group = "{LINEAR_VG}"'),
        ("thin", f'volume_group = "{THIN_VG}"\nthin_pool = "{THIN_POOL}"'),
    ],
)
async def test_sanity_lvm(backend: str, pool: str, lvm: Lvm, clean_linear: None, clean_thin: None) -> None:
    vg = LINEAR_VG if backend == "lvm" else THIN_VG
    assert await _left_over(lvm, vg) == [], "the VG must start empty"
    result = sanity.run_sanity(
        backend,
        f"[pools.{backend}.sanity]\ndefault = true\n{pool}\n",
        parameters={"backend": backend},
        volume_size=64 * MiB,
        expand_size=96 * MiB,
    )
    assert result.passed > 0, f"csi-sanity ran no spec: {result}"
    assert result.failed == 0, "\n".join(sanity.summary_lines([result]))
    assert await _left_over(lvm, vg) == [], "csi-sanity deletes what it creates: nothing may be left in the VG"
