#!/usr/bin/env bash
# The whole test gate: lint, types, host tests (loop devices need root), and the LVM suites under User-Mode Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
# The Kubernetes binaries (API server, scheduler, sidecars) and csi-sanity for the control-plane tests and
# `nox -s sanity`: the built ones beside the project when they are there (see ../shared/k8s/README.md).
if [ -f ../shared/k8s/unpack.sh ]; then
  KUBE_BIN_DIR=${KUBE_BIN_DIR:-$(bash ../shared/k8s/unpack.sh | tail -n 1)}
  CSI_SANITY=${CSI_SANITY:-$KUBE_BIN_DIR/csi-sanity}
  export KUBE_BIN_DIR CSI_SANITY
fi
nox -s lint typecheck proto tests sanity e2e "$@"
