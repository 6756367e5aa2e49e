"""CSI Node service: identity of this node and its topology."""

from __future__ import annotations

from localdisk._proto.csi.v1 import (
    NodeBase,
    NodeGetCapabilitiesRequest,
    NodeGetCapabilitiesResponse,
    NodeGetInfoRequest,
    NodeGetInfoResponse,
)
from localdisk.csi import convert
from localdisk.csi.status import rpc
from localdisk.manager import VolumeManager


class NodeService(NodeBase):
    def __init__(self, manager: VolumeManager, node_id: str) -> None:
        self.manager = manager
        self.node_id = node_id

    @rpc
    async def node_get_info(self, message: NodeGetInfoRequest) -> NodeGetInfoResponse:
        return NodeGetInfoResponse(
            node_id=self.node_id, max_volumes_per_node=0, accessible_topology=convert.topology(self.node_id)
        )

    @rpc
    async def node_get_capabilities(self, message: NodeGetCapabilitiesRequest) -> NodeGetCapabilitiesResponse:
        return NodeGetCapabilitiesResponse(capabilities=[])
