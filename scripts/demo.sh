#!/usr/bin/env bash
# The main job: the localdisk demo on loop-file-backed disks (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/localdisk demo "$@"
