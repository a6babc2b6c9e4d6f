#!/usr/bin/env bash
# CUDA checks for a machine with a GPU: the CUDA tests (Triton kernels compiled, packing on
# the device), then the deployment speed benchmark on CUDA in float32 (with the tile-size
# sweep of the Triton kernels), in bfloat16, and as CUDA-graph replays.
# Results go to $OUT (default gpu-results/): tests.log, bench.log and one folder per run.
#
#   bash scripts/gpu-check.sh            # from the repository root, with gblr importable
#   FULL=1 bash scripts/gpu-check.sh     # the whole fast test suite instead of its GPU part
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt" || exit 1
status=0
if [ -n "${FULL:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider -m "not slow" -rs > "$out/tests.log" 2>&1 || status=1
else
  python3 -m pytest -q -p no:cacheprovider -m "not slow" -rs tests/test_tiled.py \
    tests/test_deploy.py tests/test_family.py tests/test_projection.py \
    -k "cuda or triton or tiled or packed" > "$out/tests.log" 2>&1 || status=1
fi
tail -3 "$out/tests.log"
bench() {  # folder name, then options of gblr.bench.speed
  local name=$1; shift
  echo "== $name: $*" | tee -a "$out/bench.log"
  python3 -m gblr.bench.speed --device cuda --reps 10 --out "$out/$name" "$@" \
    >> "$out/bench.log" 2>&1 || { status=1; echo "   failed (see bench.log)"; }
}
bench speed --tile-sweep
bench speed-bf16 --dtype bfloat16 --tile-sweep
bench speed-graphs --graphs --no-minilm
exit $status
