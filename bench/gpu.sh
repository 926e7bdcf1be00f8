#!/usr/bin/env bash
# The work only a GPU can do, sized for the lent device's minutes (15 in all, 10 a call).
#
# Here, once:  bash ../shared/gpu/wheels.sh soxr      (ibm-fms, soundfile, soxr as wheels)
# Then one device call (carry: [".whl"], timeout_s 540) runs the essentials in about 8 minutes:
#   bash bench/gpu.sh essentials
#     1. the CUDA tests: recipes in fp32 and bf16 on tiny, two input shapes each, no CUDA graph
#        skipped; the native Triton kernels against their references
#     2. 3.3-2b bf16 at batch 1, 10 s of audio, 64 tokens, 3 rounds: eager, compile-decoder,
#        cudagraph-decoder and transformers eager, random weights built on the GPU
# and, if time is left, a second call:
#   bash bench/gpu.sh extra      (3.3-8b bf16 vs transformers, then the kernel tables)
# or, for the quantized decoders (fetch torchao too: wheels.sh soxr torchao==0.18.0):
#   bash bench/gpu.sh quant      (3.3-8b at batch 1: bf16 vs int8, int4 and float8 weights)
# Each part prints its elapsed seconds, so the next run can be sized. Results are written under
# bench/results/ there and copied to $OUT (file names carry the card's name); commit them here.
# The image's torch/triton/transformers are used as they are (torch 2.11, triton 3.6 and
# transformers 5.17 when this was written); every result names the versions it ran with.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gsopt-gpu}
mkdir -p "$out" bench/results
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
start=$SECONDS
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
echo "gpu.sh: installed in $((SECONDS - start)) s on $card"

failed=0
part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, report its seconds, go on
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "+ [$name] $*"
  timeout "$limit" "$@" || { echo "gpu.sh: FAILED ($?): $name" >&2; failed=1; }
  echo "gpu.sh: [$name] took $((SECONDS - t0)) s (limit $limit s; $((SECONDS - start)) s so far)"
}

e2e() {  # e2e MODEL LIMIT_S: batch-1 latency, gsopt's recipes beside transformers eager
  local model=$1 name="$card-$1-bf16-10s-b1-n64"
  part "e2e $model" "$2" python3 -m gsopt bench --model "$model" --dtype bfloat16 \
    --audio-seconds 10 --batch-size 1 --max-new-tokens 64 --repeats "${REPEATS:-3}" \
    --recipes eager,compile-decoder,cudagraph-decoder --peers transformers-eager \
    --out "bench/results/$name.json"
  python3 -m gsopt report "bench/results/$name.json" --out "bench/results/$name" &&
    cp "bench/results/$name.json" "$out/" && cp "bench/results/$name/report.md" "$out/$name.md"
}

for stage in "$@"; do
  case $stage in
    essentials)
      part tests 200 python3 -m pytest -q -rs tests/test_recipes.py::test_gpu_recipes_equal_eager_on_gpu \
        tests/kernels/test_decode_attention.py --junitxml="$out/tests-$card.xml"
      e2e 3.3-2b 260
      ;;
    extra)
      e2e 3.3-8b 330
      part kernels 200 python3 bench/bench_kernels.py --out "bench/results/kernels-$card-bf16.md"
      cp bench/results/kernels-"$card"-* "$out/" 2>/dev/null
      ;;
    quant)
      name="$card-3.3-8b-bf16-10s-b1-n64-quant"
      part quant 480 python3 -m gsopt bench --model 3.3-8b --dtype bfloat16 --audio-seconds 10 \
        --batch-size 1 --max-new-tokens 64 --repeats "${REPEATS:-3}" --peers none \
        --recipes cudagraph-decoder,int8-decoder,int4-decoder,fp8-decoder \
        --out "bench/results/$name.json"
      python3 -m gsopt report "bench/results/$name.json" --out "bench/results/$name" &&
        cp "bench/results/$name.json" "$out/" && cp "bench/results/$name/report.md" "$out/$name.md"
      ;;
    *)
      echo "gpu.sh: unknown stage '$stage' (use essentials, extra or quant)" >&2
      exit 2
      ;;
  esac
done
echo "gpu.sh: done in $((SECONDS - start)) s"
exit $failed
