#!/usr/bin/env bash
# The whole test gate: lint, types, host tests (loop devices need root), and the LVM suites under User-Mode Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
nox -s lint typecheck proto tests e2e "$@"
