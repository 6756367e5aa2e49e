"""The assembled `localdisk controller`: connects through a kubeconfig, leads, cleans up, serves health and metrics."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import aiohttp
import anyio
import pytest
from typer.testing import CliRunner

import localdisk.csi
import localdisk.k8s
from localdisk.cli import app
from localdisk.k8s.controller import ControllerSettings, main
from tests.k8s import objects
from tests.k8s.fake_api import FakeKubernetes
from tests.k8s.test_nodeloss_grace import Recorder

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def scrape_until(http: aiohttp.ClientSession, url: str, lines: list[str], seconds: float) -> str:
    """The metrics page once it holds every one of `lines`, read again until then; an error naming what is missing
    after `seconds`."""
    text = ""
    with anyio.move_on_after(seconds):
        while True:
            async with http.get(url) as response:
                text = await response.text()
            if all(line in text for line in lines):
                return text
            await anyio.sleep(0.05)
    missing = [line for line in lines if line not in text]
    raise AssertionError(f"still no {missing} after {seconds}s in:\n{text}")


async def test_controller_end_to_end_and_sigterm(fake: FakeKubernetes, kubeconfig: str) -> None:
    await fake.put("storageclasses", objects.storage_class("localdisk-lvm"))
    pvc = await fake.put("persistentvolumeclaims", objects.claim("apps", "data-db-0", volume="pv-1"))
    await fake.put("persistentvolumes", objects.volume("pv-1", "gone", bound_to=pvc))
    extension = Recorder({"gone": ["lv-1"]})
    port = free_port()
    settings = ControllerSettings(
        namespace="localdisk",
        identity="replica-1",
        http_host="127.0.0.1",
        http_port=port,
        kubeconfig=kubeconfig,
        node_loss_grace_period=0,
    )
    async with aiohttp.ClientSession() as http:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(main, settings, lambda api: [extension])
                while not extension.calls:  # the last step of the release
                    await anyio.sleep(0.05)
                async with http.get(f"http://127.0.0.1:{port}/healthz") as health:
                    assert health.status == 200
                # The counter goes up after the release's last write (the finalizer), not with the PV's deletion.
                wanted = ["localdisk_controller_leader 1.0", "localdisk_node_loss_released_volumes_total 1.0"]
                await scrape_until(http, f"http://127.0.0.1:{port}/metrics", wanted, seconds=30)
                os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends: main() must stop cleanly
    assert ("gone", False) in extension.calls, "the node-loss extension made by the factory was run"
    lease = fake.get("leases", "localdisk-controller", "localdisk")
    assert lease is not None and lease["spec"]["holderIdentity"] == "", "released on the way out"


def test_cli_controller_command_is_there() -> None:
    result = CliRunner().invoke(app, ["controller", "--help"])
    assert result.exit_code == 0
    assert "--resync-period" in result.output and "--lease-name" in result.output


def test_cli_controller_without_a_cluster_fails_with_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "no-such-kubeconfig"
    result = CliRunner().invoke(app, ["controller", "--kubeconfig", str(missing), "--http-port", "0"])
    assert result.exit_code == 1
    assert "cannot reach Kubernetes" in result.output


def test_names_match_the_csi_layer() -> None:
    assert localdisk.k8s.DRIVER_NAME == localdisk.csi.DRIVER_NAME
    assert localdisk.k8s.TOPOLOGY_KEY == localdisk.csi.TOPOLOGY_KEY


async def test_healthz_fails_while_the_api_server_keeps_failing_and_recovers_without_a_restart(
    fake: FakeKubernetes, kubeconfig: str
) -> None:
    port = free_port()
    settings = ControllerSettings(
        namespace="localdisk",
        identity="replica-1",
        http_host="127.0.0.1",
        http_port=port,
        kubeconfig=kubeconfig,
        unhealthy_after=0.5,
    )
    fake.fail("GET", "/api/v1/nodes", 500, times=1000)
    url = f"http://127.0.0.1:{port}/healthz"

    async def status(http: aiohttp.ClientSession) -> int:
        try:
            async with http.get(url) as response:
                return response.status
        except aiohttp.ClientConnectionError:
            return 0  # not listening yet

    async with aiohttp.ClientSession() as http:
        with anyio.fail_after(60):
            async with anyio.create_task_group() as group:
                group.start_soon(main, settings)
                while await status(http) != 503:
                    await anyio.sleep(0.05)
                fake.faults.clear()  # the API server is back: the watch's next try succeeds
                while await status(http) != 200:
                    await anyio.sleep(0.05)
                group.cancel_scope.cancel()
