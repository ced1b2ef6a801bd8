# Create .venv-bench for bench.peers: the project, plus LitData and Mosaic Streaming (the [bench] extra).
# A separate venv, because the peers pull torchvision and older numpy; torch stays the one pinned below:
# a constraints file holds it, so no peer can replace it with another build.
#     bash scripts/setup-bench.sh && .venv-bench/bin/python -m bench.peers
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
quiet() { grep -v "^WARNING: Location" || true; }
[ -x .venv-bench/bin/python ] || "$PY" -m venv .venv-bench
if ! .venv-bench/bin/python -c "import torch" 2>/dev/null; then
  .venv-bench/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
  .venv-bench/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | quiet
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
.venv-bench/bin/python -c "import torch; print(f'torch=={torch.__version__}')" > "$constraints"
.venv-bench/bin/python -m pip install -q -c "$constraints" -e ".[bench]" 2>&1 | quiet
.venv-bench/bin/python -c "import torch, litdata; from bench.peer_loaders import mds_api; mds_api(); print(\"torch\", torch.__version__, \"litdata\", litdata.__version__, \"and MDS ready\")"
