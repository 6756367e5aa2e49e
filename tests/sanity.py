"""csi-sanity, the CSI conformance suite of kubernetes-csi/csi-test, against a real `localdisk serve`.

`run_sanity` starts the server on a config of its own (a kubelet root in a temporary directory), runs csi-sanity
over its socket with a JUnit report, stops the server with SIGTERM and reads the report. Every run also checks what
it leaves behind: no mount under the kubelet root and no volume in the pool once csi-sanity has cleaned up.

The binary comes from `$CSI_SANITY`, else `csi-sanity` on PATH. In CI (`CI=true`) a missing binary fails the test;
elsewhere the test skips and says what to install. Results are added to `RESULTS`, and when
`LOCALDISK_SANITY_RESULTS` names a directory, written there as JSON, so `nox -s sanity` can print one summary for
the host and the sandbox guest (`summary_lines`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

INSTALL_HINT = (
    "csi-sanity is not installed: set CSI_SANITY to its path or put it on PATH (`bash ../shared/k8s/unpack.sh`"
    " unpacks a built one; elsewhere `go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@latest`)"
)
SANITY_TIMEOUT = 1800.0  # seconds for one csi-sanity run; LVM under UML takes a few minutes
SERVER_START_TIMEOUT = 120.0


@dataclass
class SanityResult:
    name: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    skipped_specs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"csi-sanity [{self.name}]: {self.passed} passed, {self.failed} failed, {self.skipped} skipped"
            f" in {self.seconds:.0f}s"
        )


RESULTS: list[SanityResult] = []


def sanity_binary() -> str:
    """The csi-sanity to run; skips the test (fails it in CI) when there is none."""
    found = os.environ.get("CSI_SANITY") or shutil.which("csi-sanity")
    if found and os.access(found, os.X_OK):
        return found
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {INSTALL_HINT}")
    pytest.skip(INSTALL_HINT)


def parse_junit(name: str, text: str) -> SanityResult:
    """Count the specs of a ginkgo JUnit report: a testcase with <failure> or <error> failed, with <skipped> was
    skipped (ginkgo marks pending specs so too), else passed. Ginkgo's suite set-up nodes are not specs."""
    result = SanityResult(name)
    for case in ET.fromstring(text).iter("testcase"):
        title = case.get("name", "")
        if title.startswith(("[SynchronizedBeforeSuite]", "[SynchronizedAfterSuite]", "[BeforeSuite]", "[AfterSuite]")):
            if case.find("failure") is not None or case.find("error") is not None:
                result.failed += 1
                result.failures.append(title)
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            result.failed += 1
            result.failures.append(title)
        elif case.find("skipped") is not None:
            result.skipped += 1
            result.skipped_specs.append(title)
        else:
            result.passed += 1
    return result


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


@contextmanager
def running_server(workdir: Path, config: Path, extra: Sequence[str] = ()) -> Iterator[Path]:
    """`localdisk serve` on `config` (plus `extra` arguments), its socket in `workdir`; stopped with SIGTERM
    (SIGKILL after 60 s)."""
    sock = workdir / "csi.sock"
    log = (workdir / "serve.log").open("wb")
    argv = [
        str(Path(sys.executable).parent / "localdisk"),
        "serve",
        "--endpoint",
        f"unix://{sock}",
        "--node-id",
        "sanity-node",
    ]
    argv += ["--config", str(config), "--log-format", "text", "--no-orphan-report", *extra]
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not _listening(sock):
            if server.poll() is not None:
                raise AssertionError(f"localdisk serve exited with {server.returncode}: {_tail(workdir)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"localdisk serve did not listen within {SERVER_START_TIMEOUT:.0f}s")
            time.sleep(0.1)
        yield sock
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        log.close()


def _tail(workdir: Path, lines: int = 30) -> str:
    text = (workdir / "serve.log").read_text(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        points = [line.split(" ")[4] for line in f]
    return [p for p in points if p.startswith(prefix)]


def run_sanity(
    name: str,
    pools: str,
    *,
    parameters: dict[str, str],
    volume_size: int,
    expand_size: int | None = None,
    access_type: str = "mount",
    skip: Sequence[str] = (),
    default_fs: str = "ext4",
) -> SanityResult:
    """Run csi-sanity against a server of `pools` (TOML of `[pools.*]` tables); returns its counts.

    `skip` lists spec name patterns (ginkgo regular expressions) not run, each because localdisk or this pool
    lacks what the spec needs; they are counted as skipped like the specs csi-sanity skips itself."""
    binary = sanity_binary()
    workdir = Path(tempfile.mkdtemp(prefix=f"localdisk-sanity-{name}-"))
    kubelet = workdir / "kubelet"
    kubelet.mkdir()
    config = workdir / "config.toml"
    config.write_text(f'[node]\nkubelet_dir = "{kubelet}"\ndefault_fs = "{default_fs}"\n\n{pools}')
    params = workdir / "parameters.yaml"
    params.write_text(json.dumps(parameters))  # JSON is YAML
    junit = workdir / "junit.xml"
    argv = [binary, "--csi.endpoint", "", "--csi.mountdir", str(kubelet / "mnt")]
    argv += ["--csi.stagingdir", str(kubelet / "staging"), "--csi.testvolumeparameters", str(params)]
    argv += ["--csi.testvolumesize", str(volume_size), "--csi.testvolumeaccesstype", access_type]
    argv += ["--csi.junitfile", str(junit), "--ginkgo.no-color"]
    if expand_size is not None:
        argv += ["--csi.testvolumeexpandsize", str(expand_size)]
    if skip:
        argv += ["--ginkgo.skip", "|".join(f"({pattern})" for pattern in skip)]
    started = time.monotonic()
    try:
        with running_server(workdir, config) as sock:
            argv[2] = str(sock)
            run = subprocess.run(argv, capture_output=True, timeout=SANITY_TIMEOUT, cwd=workdir, check=False)
            (workdir / "sanity.log").write_bytes(run.stdout + run.stderr)
        if not junit.exists():
            raise AssertionError(f"csi-sanity wrote no report (exit {run.returncode}): {run.stderr[-2000:]!r}")
        result = parse_junit(name, junit.read_text())
        result.seconds = time.monotonic() - started
        leftovers = mounts_under(workdir)
        if leftovers:
            result.failed += 1
            result.failures.append(f"mounts left under the kubelet root: {leftovers}")
        RESULTS.append(result)
        _save(result)
        if result.failed == 0 and run.returncode != 0:
            raise AssertionError(f"csi-sanity exited {run.returncode} with no failed spec: {run.stderr[-2000:]!r}")
        return result
    finally:
        if not mounts_under(workdir) and result_ok(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"csi-sanity [{name}]: kept {workdir} (logs: serve.log, sanity.log)", file=sys.stderr)


def result_ok(workdir: Path) -> bool:
    junit = workdir / "junit.xml"
    return junit.exists() and parse_junit("", junit.read_text()).failed == 0


def _save(result: SanityResult) -> None:
    directory = os.environ.get("LOCALDISK_SANITY_RESULTS")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / f"{result.name}.json").write_text(json.dumps(asdict(result)))


def load_results(directory: Path) -> list[SanityResult]:
    return [SanityResult(**json.loads(p.read_text())) for p in sorted(directory.glob("*.json"))]


def summary_lines(results: Sequence[SanityResult]) -> list[str]:
    lines = [r.line() for r in results]
    for r in results:
        lines += [f"  FAILED [{r.name}] {title}" for title in r.failures]
    skipped = sorted({title for r in results for title in r.skipped_specs})
    if skipped:
        lines.append("skipped specs (a capability localdisk or that pool does not offer), by backend:")
        for title in skipped:
            where = ",".join(r.name for r in results if title in r.skipped_specs)
            lines.append(f"  [{where}] {title}")
    return lines
