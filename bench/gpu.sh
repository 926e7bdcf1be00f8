#!/usr/bin/env bash
# The work only a GPU can do, in stages that each fit one device call (10 minutes), so a lent
# GPU's 30 minutes go to measuring. Not yet run: no GPU has been lent to this project so far.
#
# Here, once:  bash ../shared/gpu/wheels.sh soxr      (ibm-fms, soundfile, soxr as wheels)
# Then device calls such as (carry: [".whl"]):
#   bash bench/gpu.sh tests kernels
#   bash bench/gpu.sh e2e-2b
#   REPEATS=5 bash bench/gpu.sh e2e-8b    (fewer timed rounds if 10 would pass the limit)
# Results are written under bench/results/ there and copied to $OUT; commit them here.
# The image's torch/triton/transformers are used as they are (torch 2.11, triton 3.6 and
# transformers 5.17 when this was written); every result names the versions it ran with.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gsopt-gpu}
mkdir -p "$out" bench/results
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || {
  echo "gpu.sh: install failed; run 'bash ../shared/gpu/wheels.sh soxr' here and carry .whl" >&2
  exit 2
}
# "NVIDIA H100 80GB HBM3" -> h100: the card's name goes into every result file's name.
card=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())') || {
  echo "gpu.sh: no CUDA device here" >&2
  exit 2
}

failed=0
run() {  # run a step, keep going if it fails, remember that it did
  echo "+ $*"
  "$@" || { echo "gpu.sh: FAILED: $*" >&2; failed=1; }
}

e2e() {  # bench/README.md's batch-1 latency run for one published size
  local model=$1 name="$card-$1-bf16-30s-b1"
  run python3 -m gsopt bench --model "$model" --dtype bfloat16 --audio-seconds 30 --batch 1 \
    --max-new-tokens 128 --recipes eager,static-kv,compile-decoder,cudagraph-decoder,best \
    --repeats "${REPEATS:-10}" --out "bench/results/$name.json"
  run python3 -m gsopt report "bench/results/$name.json" --out "bench/results/$name"
  cp "bench/results/$name.json" "bench/results/$name/report.md" "$out/" 2>/dev/null
  [ -f "$out/report.md" ] && mv "$out/report.md" "$out/$name.md"
}

for stage in "$@"; do
  case $stage in
    tests)  # every CUDA-only test: the kernels natively, the recipes' tokens on the GPU
      run python3 -m pytest -q -rs tests/kernels tests/test_recipes.py \
        --junitxml="$out/tests-$card.xml"
      ;;
    kernels)  # issue 5's tables: plain launches and captured-graph replays
      run python3 bench/bench_kernels.py --out "bench/results/kernels-$card-bf16.md"
      run python3 bench/bench_kernels.py --cuda-graph \
        --out "bench/results/kernels-$card-bf16-cudagraph.md"
      cp bench/results/kernels-"$card"-* "$out/" 2>/dev/null
      ;;
    e2e-2b) e2e 3.3-2b ;;
    e2e-8b) e2e 3.3-8b ;;
    *)
      echo "gpu.sh: unknown stage '$stage' (use tests, kernels, e2e-2b or e2e-8b)" >&2
      exit 2
      ;;
  esac
done
exit $failed
