#!/usr/bin/env bash
# CUDA checks for a machine with a GPU: the whole test suite (CUDA tests included) and the
# GPU variants of the layer and deployment benchmarks. Results go to $OUT (default gpu-results/).
#
#   bash scripts/gpu-check.sh            # from the repository root, with gblr importable
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$out/device.txt" || exit 1
status=0
python3 -m pytest -q -p no:cacheprovider -m "not slow" -rs 2>&1 | tail -40 | tee "$out/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
python3 -m gblr.bench.layers --device cuda --out "$out/layers" 2>&1 | tail -25 || status=1
python3 -m gblr.bench.speed --device cuda --out "$out/speed" 2>&1 | tail -40 || status=1
exit $status
