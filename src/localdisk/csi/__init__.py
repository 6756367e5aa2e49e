"""The CSI adapter: gRPC servicers over the `VolumeManager`. Only this package speaks gRPC."""

DRIVER_NAME = "localdisk.csi.io"
TOPOLOGY_KEY = "topology.localdisk.io/node"
