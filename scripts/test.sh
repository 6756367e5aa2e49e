#!/usr/bin/env bash
# The whole test gate: lint, types, host tests (loop devices need root), and the LVM suites under User-Mode Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
# csi-sanity for `nox -s sanity`: the built binaries beside the project when they are there (see its README).
if [ -z "${CSI_SANITY:-}" ] && [ -f ../shared/k8s/unpack.sh ]; then
  CSI_SANITY="$(bash ../shared/k8s/unpack.sh | tail -n 1)/csi-sanity"
  export CSI_SANITY
fi
nox -s lint typecheck proto tests sanity e2e "$@"
