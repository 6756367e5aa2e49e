"""SIGKILL through group-committed partition creates: many creates at once on a real `localdisk serve`.

The crash loop of `test_crash.py` sends one request at a time, so its creates never share a table write. Here each
round sends a burst of creates at once (they queue behind one disk's lock and are carried out together: one
`sfdisk --append` of all their pending partitions, their wipes, one write naming them ready) and a timer kills the
server's whole process group at a random moment of the burst. Every create is then retried by name until answered,
as a provisioner does, and the disks must hold exactly one partition per answered name, of exactly its size, ready,
where the kernel maps it, and nothing else: no pending partition left, none lost, none twice. Each round ends by
deleting its volumes (retried the same way), so the disks are empty again.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from grpclib.exceptions import GRPCError, StreamTerminatedError

from localdisk._proto.csi.v1 import (
    CapacityRange,
    ControllerStub,
    CreateVolumeRequest,
    CreateVolumeResponse,
    DeleteVolumeRequest,
)
from localdisk.sizes import MiB
from tests.loopdisks import loop_disks, needs_loop_devices
from tests.reliability.crashloop import CAPABILITY, RETRY, Server, Supervisor
from tests.reliability.views import PartitionView

KILLS = int(os.environ.get("LOCALDISK_GROUP_CRASH_KILLS", "5"))  # `nox -s group-crash`: 50
BURST = 12
SIZES = (MiB, 2 * MiB, 3 * MiB)


ANSWER_DEADLINE = 120.0  # seconds of kills, restarts and retryable answers before a call counts as unanswered


def request(name: str, size: int) -> CreateVolumeRequest:
    return CreateVolumeRequest(
        name=name,
        capacity_range=CapacityRange(required_bytes=size),
        volume_capabilities=[CAPABILITY],
        parameters={"backend": "partition"},
    )


async def until_answered(supervisor: Supervisor, send: object) -> object:
    """Send until a final answer; a kill (lost connection) or a retryable status is sent again."""
    assert callable(send)
    deadline = time.monotonic() + ANSWER_DEADLINE
    while time.monotonic() < deadline:
        await supervisor.ensure()
        assert supervisor.channel is not None
        try:
            return await send(ControllerStub(supervisor.channel, timeout=60))
        except GRPCError as exc:
            if supervisor.server.alive() and exc.status not in RETRY:
                raise
        except (OSError, StreamTerminatedError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer within {ANSWER_DEADLINE:.0f}s")


@needs_loop_devices
@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.anyio
async def test_group_committed_creates_survive_sigkill(tmp_path: Path) -> None:
    seed = int(os.environ.get("LOCALDISK_CRASH_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    again = f"(LOCALDISK_CRASH_SEED={seed} reproduces the run)"
    async with loop_disks(2, 40 * MiB) as disks:
        config = tmp_path / "node.toml"
        config.write_text(
            f'[node]\nkubelet_dir = "{tmp_path}/kubelet"\n\n'
            f"[pools.partition.crash]\ndisks = {disks!r}\ndefault = true\n".replace("'", '"')
        )
        supervisor = Supervisor(Server(config, tmp_path), seed, startup_kill_probability=0.2)
        view = PartitionView(disks)
        kills = rounds = 0
        burst_seconds = 0.3  # running mean of an unkilled burst, to aim the kills inside one
        began = time.monotonic()
        try:
            while kills < KILLS and time.monotonic() - began < 1500:
                rounds += 1
                sizes = {f"group-{rounds}-{i} ü": rng.choice(SIZES) for i in range(BURST)}

                generation = await supervisor.ensure()
                assert supervisor.channel is not None
                stub = ControllerStub(supervisor.channel, timeout=60)
                delay = rng.uniform(0, 1.2 * burst_seconds)
                timer = asyncio.get_running_loop().call_later(delay, supervisor.kill, generation)
                started = time.monotonic()
                creates = [stub.create_volume(request(name, size)) for name, size in sizes.items()]
                first = await asyncio.gather(*creates, return_exceptions=True)
                timer.cancel()
                if generation in supervisor.killed:
                    kills += 1
                else:
                    burst_seconds = 0.8 * burst_seconds + 0.2 * (time.monotonic() - started)
                answers: dict[str, str] = {}
                for name, answer in zip(sizes, first, strict=True):
                    if not isinstance(answer, CreateVolumeResponse):
                        again_request = request(name, sizes[name])
                        retried = await until_answered(supervisor, lambda c, r=again_request: c.create_volume(r))
                        assert isinstance(retried, CreateVolumeResponse)
                        answer = retried
                    assert answer.volume is not None and answer.volume.capacity_bytes == sizes[name], (name, answer)
                    answers[name] = answer.volume.volume_id
                assert len(set(answers.values())) == BURST, f"an ID answered twice {again}: {answers}"

                on_disk = view.objects()
                expected = {view.volume_name(n): (answers[n].split(":", 2)[2], sizes[n]) for n in sizes}
                assert on_disk == expected, f"round {rounds} {again}: disks {on_disk}, answered {expected}"
                assert not view.problems(), f"round {rounds} {again}: {view.problems()}"

                for volume_id in answers.values():
                    delete = DeleteVolumeRequest(volume_id=volume_id)
                    await until_answered(supervisor, lambda c, r=delete: c.delete_volume(r))
                assert view.objects() == {}, f"round {rounds} {again}: left after the deletes: {view.objects()}"
        finally:
            supervisor.close()
        print(f"group crash: {kills} kills in {rounds} rounds of {BURST} creates, {supervisor.restarts} starts {again}")
        assert kills >= KILLS, f"only {kills} kills in {rounds} rounds {again}"
