"""Hostile input at the CSI layer: whatever the fields hold, the answer is a proper gRPC status.

Property-based (hypothesis) over the request fields of every controller and identity RPC, against the fake backend
through a real protobuf round trip. UNKNOWN or INTERNAL would mean an exception escaped our validation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from grpclib.exceptions import GRPCError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localdisk import VolumeManager, development_default
from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerExpandVolumeRequest,
    ControllerGetVolumeRequest,
    CreateSnapshotRequest,
    CreateVolumeRequest,
    DeleteSnapshotRequest,
    DeleteVolumeRequest,
    GetCapacityRequest,
    ListSnapshotsRequest,
    ListVolumesRequest,
    Topology,
    TopologyRequirement,
    ValidateVolumeCapabilitiesRequest,
    VolumeCapability,
    VolumeCapabilityAccessMode,
    VolumeCapabilityAccessModeMode,
    VolumeCapabilityBlockVolume,
    VolumeCapabilityMountVolume,
    VolumeContentSource,
    VolumeContentSourceSnapshotSource,
    VolumeContentSourceVolumeSource,
)
from tests.csi_helpers import Csi, csi_for
from tests.reliability.hostile import proper

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
NASTY = st.sampled_from(
    [
        "",
        "-",
        "--force",
        "-rf",
        "$(reboot)",
        "`id`",
        "a;b",
        "../../etc/passwd",
        "\x00",
        "x" * 10_000,
        "fake:default:",
        "fake:default:../x",
        "lvm:vg:lv",
        "partition:p:00000000-0000-0000-0000-000000000000",
        ":::",
        "\u202e",
        "🙂",
    ]
)
TEXT = st.one_of(NASTY, st.text(max_size=300))
IDS = st.one_of(NASTY, st.text(max_size=200), st.builds(lambda s: f"fake:default:{s}", st.text(max_size=40)))

capabilities = st.builds(
    VolumeCapability,
    block=st.one_of(st.none(), st.just(VolumeCapabilityBlockVolume())),
    mount=st.one_of(
        st.none(),
        st.builds(
            VolumeCapabilityMountVolume,
            fs_type=st.one_of(st.sampled_from(["ext4", "xfs", "btrfs", ""]), TEXT),
            mount_flags=st.lists(TEXT, max_size=3),
        ),
    ),
    access_mode=st.one_of(
        st.none(), st.builds(VolumeCapabilityAccessMode, mode=st.sampled_from(list(VolumeCapabilityAccessModeMode)))
    ),
)
ranges = st.one_of(st.none(), st.builds(CapacityRange, required_bytes=INT64, limit_bytes=INT64))
parameters = st.one_of(
    st.dictionaries(TEXT, TEXT, max_size=4),
    st.fixed_dictionaries({"backend": st.sampled_from(["fake", "lvm", "", "FAKE"])}, optional={"pool": TEXT}),
)
sources = st.one_of(
    st.none(),
    st.builds(VolumeContentSource, snapshot=st.builds(VolumeContentSourceSnapshotSource, snapshot_id=IDS)),
    st.builds(VolumeContentSource, volume=st.builds(VolumeContentSourceVolumeSource, volume_id=IDS)),
    st.just(VolumeContentSource()),
)
topologies = st.one_of(
    st.none(),
    st.builds(TopologyRequirement, requisite=st.lists(st.builds(Topology, segments=st.dictionaries(TEXT, TEXT)))),
)

Call = Callable[[Csi], Awaitable[Any]]
requests: st.SearchStrategy[Call] = st.one_of(
    st.builds(
        lambda r: lambda c: c.controller.create_volume(r),
        st.builds(
            CreateVolumeRequest,
            name=TEXT,
            capacity_range=ranges,
            volume_capabilities=st.lists(capabilities, max_size=3),
            parameters=parameters,
            volume_content_source=sources,
            accessibility_requirements=topologies,
        ),
    ),
    st.builds(lambda r: lambda c: c.controller.delete_volume(r), st.builds(DeleteVolumeRequest, volume_id=IDS)),
    st.builds(
        lambda r: lambda c: c.controller.controller_expand_volume(r),
        st.builds(
            ControllerExpandVolumeRequest,
            volume_id=IDS,
            capacity_range=ranges,
            volume_capability=st.one_of(st.none(), capabilities),
        ),
    ),
    st.builds(
        lambda r: lambda c: c.controller.validate_volume_capabilities(r),
        st.builds(
            ValidateVolumeCapabilitiesRequest,
            volume_id=IDS,
            volume_capabilities=st.lists(capabilities, max_size=2),
            parameters=parameters,
        ),
    ),
    st.builds(
        lambda r: lambda c: c.controller.list_volumes(r),
        st.builds(ListVolumesRequest, max_entries=INT32, starting_token=TEXT),
    ),
    st.builds(
        lambda r: lambda c: c.controller.get_capacity(r),
        st.builds(
            GetCapacityRequest,
            volume_capabilities=st.lists(capabilities, max_size=2),
            parameters=parameters,
            accessible_topology=st.one_of(st.none(), st.builds(Topology, segments=st.dictionaries(TEXT, TEXT))),
        ),
    ),
    st.builds(
        lambda r: lambda c: c.controller.controller_get_volume(r), st.builds(ControllerGetVolumeRequest, volume_id=IDS)
    ),
    st.builds(
        lambda r: lambda c: c.controller.create_snapshot(r),
        st.builds(CreateSnapshotRequest, source_volume_id=IDS, name=TEXT, parameters=parameters),
    ),
    st.builds(lambda r: lambda c: c.controller.delete_snapshot(r), st.builds(DeleteSnapshotRequest, snapshot_id=IDS)),
    st.builds(
        lambda r: lambda c: c.controller.list_snapshots(r),
        st.builds(ListSnapshotsRequest, max_entries=INT32, starting_token=TEXT, source_volume_id=IDS, snapshot_id=IDS),
    ),
)

TRIED = {"inputs": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(calls=st.lists(requests, min_size=1, max_size=4))
def test_every_answer_is_a_proper_status(calls: list[Call]) -> None:
    async def main() -> None:
        async with csi_for(VolumeManager.from_config(development_default())) as csi:
            for call in calls:
                TRIED["inputs"] += 1
                refusal: GRPCError | None = None
                try:
                    await call(csi)
                except GRPCError as exc:
                    refusal = exc
                if refusal is not None:
                    proper(refusal)  # never UNKNOWN or INTERNAL, always a message; counted for the summary

    anyio.run(main)
