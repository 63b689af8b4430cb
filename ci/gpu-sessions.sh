#!/usr/bin/env bash
# Run GPU nox sessions on an offline GPU machine (docs/gpu-sessions.md) and collect what they record.
# Usage, from the repository root:  bash ci/gpu-sessions.sh OUTDIR SESSION [SESSION ...] [-- NOX_POSARGS]
# Needs the wheels from ../shared/offline-gpu/fetch-wheels.sh in .whl/ and TRITONBITS_GIT_SHA set (the tree
# copied there has no .git). New records under docs/gpu-runs/ are copied to OUTDIR with the console log.
set -uo pipefail
out=${1:?usage: gpu-sessions.sh OUTDIR SESSION [SESSION ...] [-- NOX_POSARGS]}
shift
: "${TRITONBITS_GIT_SHA:?set TRITONBITS_GIT_SHA to the commit this tree is}"
export TRITONBITS_GIT_SHA PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
marker=$(mktemp)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m nox --no-venv -s "$@" 2>&1 | tee "$out/nox.log"
status=${PIPESTATUS[0]}
find docs/gpu-runs -newer "$marker" -type f -exec cp {} "$out"/ \;
exit "$status"
