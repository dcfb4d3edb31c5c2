#!/usr/bin/env bash
# The GPU check of issue #18 in one command, for a machine with one CUDA GPU and this repository's
# virtual environment (or the same torch/torchvision installed): bench/gpu.py at full sizes, under a
# hard 8-minute limit, writing bench/results/gpu.json (or $OUT/gpu.json when OUT is set, as on the
# lent device machine). Nothing is downloaded: the backbone is random-init, the data synthetic.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUTFILE="${OUT:+$OUT/gpu.json}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA device here; run 'python bench/gpu.py --tiny' for the CPU check" >&2
    exit 2
fi
exec timeout 480 "$PY" bench/gpu.py --out "${OUTFILE:-bench/results/gpu.json}" "$@"
