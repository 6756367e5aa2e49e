"""CSI Identity service: who we are, what we offer, whether we are ready."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from localdisk._proto.csi.v1 import (
    GetPluginCapabilitiesRequest,
    GetPluginCapabilitiesResponse,
    GetPluginInfoRequest,
    GetPluginInfoResponse,
    IdentityBase,
    PluginCapability,
    PluginCapabilityService,
    PluginCapabilityServiceType,
    PluginCapabilityVolumeExpansion,
    PluginCapabilityVolumeExpansionType,
    ProbeRequest,
    ProbeResponse,
)
from localdisk.csi import DRIVER_NAME
from localdisk.csi.status import rpc


def driver_version() -> str:
    try:
        return version("localdisk")
    except PackageNotFoundError:
        return "0.0.0+unknown"


class IdentityService(IdentityBase):
    def __init__(self, ready: bool | Callable[[], bool] = True, *, controller: bool = True) -> None:
        self.ready = ready
        """Probe's answer; a callable is asked on every Probe (the split roles: their watches of the API server)."""
        self.controller = controller
        """False on `serve --role node`: the Controller service is the controller Deployment's."""

    @rpc
    async def get_plugin_info(self, message: GetPluginInfoRequest) -> GetPluginInfoResponse:
        return GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=driver_version())

    @rpc
    async def get_plugin_capabilities(self, message: GetPluginCapabilitiesRequest) -> GetPluginCapabilitiesResponse:
        service = PluginCapabilityServiceType
        controller = [PluginCapability(service=PluginCapabilityService(type=service.CONTROLLER_SERVICE))]
        return GetPluginCapabilitiesResponse(
            capabilities=[
                *(controller if self.controller else []),
                PluginCapability(service=PluginCapabilityService(type=service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
                PluginCapability(
                    volume_expansion=PluginCapabilityVolumeExpansion(type=PluginCapabilityVolumeExpansionType.ONLINE)
                ),
            ]
        )

    @rpc
    async def probe(self, message: ProbeRequest) -> ProbeResponse:
        return ProbeResponse(ready=self.ready() if callable(self.ready) else self.ready)
