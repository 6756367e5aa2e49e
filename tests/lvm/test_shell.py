"""The persistent `lvm` shell executor: its framing (pure), the real shell on the host (no devices visible), and the
backends on the shell in the sandbox (marked uml)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import pytest

from localdisk.backends.lvmcmd import Lvm, classify, parse_report_json
from localdisk.backends.lvmshell import Frame, Framer, ShellBroken, ShellExecutor, shell_line
from localdisk.errors import CommandFailed, CommandTimeout, PoolGone
from localdisk.runner import CommandRunner

# What LVM 2.03.16 printed on the report pipe in the shell (recorded under UML, abridged to the fields we read).
CREATED = (
    b'  {\n      "log": [\n          {"log_seq_num":"3", "log_type":"status", "log_context":"shell",'
    b' "log_object_type":"cmd", "log_object_name":"lvcreate", "log_message":"success", "log_errno":"0",'
    b' "log_ret_code":"1"}\n      ]\n  }\n'
)
FAILED = CREATED.replace(b'"success"', b'"failure"').replace(b'"log_ret_code":"1"', b'"log_ret_code":"5"')
REPORT = (
    b'  {\n      "report": [\n          {\n              "vg": [\n                  {"vg_name":"ldtest",'
    b' "vg_size":"1069547520"}\n              ]\n              ,\n              "lv": [\n'
    b'                  {"lv_name":"a1", "lv_time":"1795771227", "lv_tags":"x.y/z=1"}\n              ]\n'
    b"          }\n      ]\n      ,\n"
    b'      "log": [\n          {"log_seq_num":"4", "log_type":"status", "log_context":"shell",'
    b' "log_object_type":"cmd", "log_object_name":"fullreport", "log_message":"success", "log_errno":"0",'
    b' "log_ret_code":"1"}\n      ]\n  }\n'
)
LASTLOG = (
    b'  {\n      "log": [\n          {"log_seq_num":"1", "log_type":"error", "log_context":"processing",'
    b' "log_message":"Logical Volume \\"a1\\" already exists in volume group \\"ldtest\\"", "log_ret_code":"0"},\n'
    b'          {"log_seq_num":"2", "log_type":"warn", "log_context":"processing", "log_message":"Sum of all thin'
    b' volume sizes exceeds the size of thin pool", "log_ret_code":"0"},\n'
    b'          {"log_seq_num":"3", "log_type":"status", "log_context":"shell", "log_message":"failure",'
    b' "log_ret_code":"5"}\n      ]\n  }\n'
)


# -- framing (pure) ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("document", [CREATED, FAILED, REPORT, LASTLOG])
@pytest.mark.parametrize("step", [1, 7, 64, 100_000])
def test_framer_cuts_one_frame_per_command_however_the_bytes_arrive(document: bytes, step: int) -> None:
    framer = Framer()
    for _ in range(2):  # one command at a time: the next document starts only after the next command is sent
        frames = [framer.feed(document[i : i + step]) for i in range(0, len(document), step)]
        assert [f.raw for f in frames if f is not None] == [document.strip()]
        assert frames[-1] is not None or frames[-2] is not None  # complete at its closing brace
        assert framer.buffer.strip() == b""


def test_frame_return_codes_follow_lvm_exit_statuses() -> None:
    created, failed, report = (Framer().feed(d) for d in (CREATED, FAILED, REPORT))
    assert created is not None and created.returncode == 0 and not created.has_report
    assert failed is not None and failed.returncode == 5
    assert report is not None and report.returncode == 0 and report.has_report
    assert parse_report_json(report.raw.decode())[0]["lv"][0]["lv_name"] == "a1"


def test_a_report_row_ending_in_a_brace_is_not_the_end_of_the_frame() -> None:
    framer = Framer()
    cut = REPORT.index(b"]\n          }\n      ]") + 1
    assert framer.feed(REPORT[:cut]) is None
    assert framer.feed(REPORT[cut:]) is not None


def test_lastlog_messages_read_like_lvm_stderr_and_classify() -> None:
    frame = Framer().feed(LASTLOG)
    assert frame is not None
    text = frame.messages()
    assert 'Logical Volume "a1" already exists in volume group "ldtest"' in text
    assert "WARNING: Sum of all thin volume sizes" in text
    assert type(classify(["lvm", "lvcreate"], 5, text)).__name__ == "AlreadyExists"


def test_a_log_without_a_shell_status_is_a_broken_shell() -> None:
    frame = Frame(b"{}", {"log": [{"log_type": "status", "log_context": "processing", "log_ret_code": "1"}]})
    with pytest.raises(ShellBroken):
        _ = frame.returncode


@pytest.mark.parametrize(
    ("args", "safe"),
    [
        (["lvcreate", "-L", "8388608b", "-n", "ldv-0a", "--addtag", "localdisk.csi.io/name.0=MZXW6", "--", "vg"], True),
        (["lvs", "--", "vg with space"], False),
        (["lvchange", "--addtag", "a#b", "--", "vg/lv"], False),  # '#' starts a comment in the shell
        (["lvchange", "--addtag", "'quoted'", "--", "vg/lv"], False),
        (["lvchange", "--addtag", "x!y", "--", "vg/lv"], False),
        (["lvs", ""], False),
        (["lvs", *(["-v"] * 70)], False),
        ([], False),
    ],
)
def test_only_lines_the_shell_splits_back_into_the_same_args_go_to_the_shell(args: list[str], safe: bool) -> None:
    line = shell_line(args)
    assert (line is not None) == safe
    if line is not None:
        assert line.split() == args and line.endswith("\n")


# -- the real shell on the host: LVM sees no devices at all -----------------------------------------------------
LVM_CONF = """\
global {
    locking_dir = "%(dir)s/lock"
}
devices {
    global_filter = [ "r|.*|" ]
    use_devicesfile = 0
}
backup {
    backup = 0
    archive = 0
}
"""
HOST_PROFILE = Path("/etc/lvm/profile/lvmdbusd.profile")


@pytest.fixture
async def host_shell(tmp_path: Path) -> AsyncIterator[ShellExecutor]:
    if shutil.which("lvm", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None:
        pytest.skip("lvm is not installed (Debian package lvm2)")
    if os.geteuid() != 0:
        pytest.skip("lvm refuses to run its commands without root")
    if not HOST_PROFILE.is_file():
        pytest.skip(f"{HOST_PROFILE} (shipped with lvm2) is missing")
    (tmp_path / "lvm.conf").write_text(LVM_CONF % {"dir": tmp_path})
    (tmp_path / "lock").mkdir()
    (tmp_path / "profile").mkdir()
    shutil.copy(HOST_PROFILE, tmp_path / "profile")
    env = {**os.environ, "LVM_SYSTEM_DIR": str(tmp_path), "LVM_SUPPRESS_FD_WARNINGS": "1"}
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    runner = CommandRunner(env=env)
    executor = ShellExecutor(runner, env=env, timeout=30)
    try:
        yield executor
    finally:
        await executor.aclose()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_host_shell_runs_commands_in_one_process(host_shell: ShellExecutor) -> None:
    first = await host_shell.run(["vgs", "--reportformat", "json", "-o", "vg_name"])
    pid = host_shell.pid
    second = await host_shell.run(["lvs", "--reportformat", "json", "-o", "lv_name,lv_size"])
    assert first.returncode == 0 and second.returncode == 0
    assert parse_report_json(first.text) == [{"vg": []}]
    assert parse_report_json(second.text) == [{"lv": []}]
    assert pid is not None and host_shell.pid == pid
    assert (host_shell.shell_commands, host_shell.fallback_commands, host_shell.restarts) == (2, 0, 0)


async def test_host_shell_failure_keeps_lvm_messages_for_the_classifiers(host_shell: ShellExecutor) -> None:
    lvm = Lvm(executor=host_shell)
    with pytest.raises(PoolGone, match="ldtest-none"):  # a pool's own VG gone: the pool goes down
        await lvm.report("ldtest-none")
    result = await host_shell.run(["lvchange", "--addtag", "x", "--", "ldtest-none/x"])
    assert result.returncode == 5 and 'Volume group "ldtest-none" not found' in result.error_text
    assert host_shell.fallback_commands == 0


async def test_host_shell_restarts_after_it_is_killed(host_shell: ShellExecutor) -> None:
    await host_shell.run(["vgs"])
    pid = host_shell.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    result = await host_shell.run(["vgs", "--reportformat", "json"])  # read-only: retried as a process
    assert result.returncode == 0 and parse_report_json(result.text) == [{"vg": []}]
    again = await host_shell.run(["vgs"])
    assert again.returncode == 0 and host_shell.pid not in (None, pid)
    assert host_shell.restarts == 1


@contextlib.contextmanager
def vg_locked(system_dir: Path, vg: str) -> Iterator[None]:
    """Hold LVM's file lock on `vg`, so a command that changes it waits (mid-command, as a slow LVM would)."""
    fd = os.open(system_dir / "lock" / f"V_{vg}", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


async def _run_blocked(executor: ShellExecutor, args: list[str], then: Callable[[], None]) -> BaseException | None:
    """Run `args` in a task, call `then` once the command sits in the shell, and return what run() raised."""
    raised: list[BaseException] = []

    async def run() -> None:
        try:
            await executor.run(args)
        except Exception as exc:
            raised.append(exc)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(run)
        await anyio.sleep(0.5)  # the shell reads the line and waits for the VG lock
        await anyio.wait_all_tasks_blocked()
        then()
    return raised[0] if raised else None


CHANGE = ["lvchange", "--addtag", "x", "--", "ldtest-none/x"]


async def test_host_shell_change_under_a_dying_shell_is_not_repeated(host_shell: ShellExecutor, tmp_path: Path) -> None:
    await host_shell.run(["vgs"])
    pid = host_shell.pid
    assert pid is not None
    with vg_locked(tmp_path, "ldtest-none"):
        raised = await _run_blocked(host_shell, CHANGE, lambda: os.kill(pid, signal.SIGKILL))
    assert isinstance(raised, CommandFailed) and "whether it took effect is unknown" in raised.message
    assert host_shell.fallback_commands == 0 and host_shell.restarts == 1
    assert (await host_shell.run(["vgs"])).returncode == 0


async def test_host_shell_timeout_and_cancellation_kill_the_shell(host_shell: ShellExecutor, tmp_path: Path) -> None:
    await host_shell.run(["vgs"])
    pid = host_shell.pid
    assert pid is not None
    host_shell.timeout = 1.0
    with vg_locked(tmp_path, "ldtest-none"), pytest.raises(CommandTimeout):
        await host_shell.run(CHANGE)
    assert host_shell.pid is None and not _alive(pid)
    host_shell.timeout = 30
    await host_shell.run(["vgs"])
    pid = host_shell.pid
    assert pid is not None
    with vg_locked(tmp_path, "ldtest-none"):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(host_shell.run, CHANGE)
            await anyio.sleep(0.5)
            await anyio.wait_all_tasks_blocked()
            assert host_shell.pid == pid  # still waiting in the shell
            tasks.cancel_scope.cancel()
    assert host_shell.pid is None and not _alive(pid)
    assert (await host_shell.run(["vgs"])).returncode == 0


async def test_host_shell_unsafe_arguments_and_missing_profile_fall_back_to_processes(
    host_shell: ShellExecutor, tmp_path: Path
) -> None:
    result = await host_shell.run(["lvs", "--", "no such vg"])
    assert result.returncode != 0 and host_shell.fallback_commands == 1 and host_shell.shell_commands == 0
    (tmp_path / "profile" / "lvmdbusd.profile").unlink()
    bare = ShellExecutor(host_shell.runner, env=host_shell.env)
    assert bare.disabled is not None
    assert (await bare.run(["vgs"])).returncode == 0 and bare.fallback_commands == 1 and bare.pid is None


# -- the backends on the shell, with real LVM in the sandbox (`nox -s e2e`) ----------------------------------------
LINEAR_VG, THIN_VG, THIN_POOL = "ldtest-lin", "ldtest-thin", "pool"


@pytest.fixture
async def sandbox_shell() -> AsyncIterator[ShellExecutor]:
    made = os.environ.get("LOCALDISK_SANDBOX_VGS", "")
    if os.environ.get("LOCALDISK_SANDBOX") != "1" or not Path("/dev/mapper/control").exists():
        pytest.skip("needs real LVM (device-mapper): runs inside the UML sandbox, `nox -s e2e`")
    if f"{LINEAR_VG}:" not in made or f"{THIN_VG}:" not in made:
        pytest.skip(f"the sandbox was started without VGs {LINEAR_VG} and {THIN_VG}")
    executor = ShellExecutor(CommandRunner())
    try:
        yield executor
    finally:
        lvm = Lvm(executor=executor)
        for vg in (LINEAR_VG, THIN_VG):
            report = await lvm.report(vg)
            for lv in sorted(report.lvs.values(), key=lambda lv: not lv.pool):
                if not lv.hidden and lv.name != THIN_POOL:
                    await lvm.remove(vg, lv.name)
        await executor.aclose()


def _commands(executor: ShellExecutor) -> int:
    return executor.shell_commands + executor.fallback_commands


@pytest.mark.uml
async def test_backends_on_the_shell_read_from_their_view(sandbox_shell: ShellExecutor) -> None:
    from localdisk.backends.lvm import LinearBackend, LinearPoolConfig, ThinBackend, ThinPoolConfig
    from localdisk.model import VolumeSpec
    from localdisk.sizes import MiB

    lvm = Lvm(executor=sandbox_shell)
    runner = sandbox_shell.runner
    thin = ThinBackend(
        "tp",
        ThinPoolConfig(volume_group=THIN_VG, thin_pool=THIN_POOL, overprovision_ratio=10.0, threshold_percent=90.0),
        lvm,
        runner,
        view_max_age=30.0,
    )
    linear = LinearBackend(
        "fast", LinearPoolConfig(volume_group=LINEAR_VG, spare_bytes=0), lvm, runner, view_max_age=30.0
    )
    await thin.open()
    await linear.open()
    before = await linear.capacity()
    async with anyio.create_task_group() as tasks:
        for i in range(8):
            tasks.start_soon(thin.create_volume, VolumeSpec(name=f"t{i}", size_bytes=8 * MiB))
        for i in range(6):
            tasks.start_soon(linear.create_volume, VolumeSpec(name=f"l{i}", size_bytes=4 * MiB))
    # one view read per burst of writers, not one per create (plus the ones at open and first use)
    assert thin.view.reads < 6 and linear.view.reads < 5
    spent = _commands(sandbox_shell)
    capacity = await linear.capacity()
    listed = await thin.list_volumes()
    assert _commands(sandbox_shell) == spent  # served from the view: no LVM command at all
    assert capacity.available_bytes == before.available_bytes - 6 * 4 * MiB
    assert sorted(v.name for v in listed) == [f"t{i}" for i in range(8)]
    fresh = await lvm.report(THIN_VG)  # what LVM itself says agrees with the view
    assert {lv.name for lv in fresh.lvs.values() if lv.pool == THIN_POOL} == {v.ref.handle for v in listed}
    assert all(lv.created_at is not None and lv.created_at.year >= 2024 for lv in fresh.lvs.values() if lv.pool)
    for volume in listed:
        await thin.delete_volume(volume.ref.handle)
    assert await thin.list_volumes() == []
    assert sandbox_shell.fallback_commands == 0 and sandbox_shell.restarts == 0
