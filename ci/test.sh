#!/usr/bin/env bash
# Install uv when it is missing (the README's one prerequisite), then run the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
fi
uv --version
# the README's test command: every CPU session (lint, kernels-alone, bench-cpu, test-cpu)
uv run --locked nox
