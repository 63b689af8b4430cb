#!/usr/bin/env bash
# Install uv when it is missing (the README's one prerequisite), then run the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.local/bin:$PATH"
uv=(uv)
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
    command -v uv >/dev/null 2>&1 || uv=(python3 -m uv)  # installed where no PATH entry points
fi
"${uv[@]}" --version
# the README's test command (`uv run nox`): every CPU session — lint, kernels-alone, bench-cpu, test-cpu
"${uv[@]}" run --locked nox
