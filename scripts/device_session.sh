#!/usr/bin/env bash
# For a session lent an H200 (device tool): train the default model in the background while the GPU
# check builds and tests; benchmarks only after training ends (so timings are not disturbed).
set -uo pipefail
cd "$(dirname "$0")/.."
# Carried (git-ignored) data: .data/fashion-mnist (the Debian dataset files); the golden fixtures
# travel with the working tree (tests/fixtures). Run as:
#   run(command="bash scripts/device_session.sh", carry=[".data"], timeout_s=...)
# TRAIN=0 skips training. Outputs in $OUT: gpu_check.log, summary.md, bench_generate.jsonl,
# train.log and default_model.tgz (fp16 safetensors folders + training logs).
export DETAILFLOW_FASHION_MNIST=$PWD/.data/fashion-mnist
export PYTHONPATH=$PWD:$PWD/python PYTHONUNBUFFERED=1
TRAIN=${TRAIN:-1}
if [ "$TRAIN" = 1 ]; then
  (
    set -e
    DEVICE=cuda PYTHON=python3 bash scripts/train_default_model.sh /tmp/run
    python3 -m detailflow_engine.convert "$(cat /tmp/run/ship_tokenizer.txt)" /tmp/model/tokenizer --kind tokenizer \
      "$(cat /tmp/run/ship_tokenizer_ema.txt)" --dtype fp16
    python3 -m detailflow_engine.convert /tmp/run/prior /tmp/model/prior --kind prior --dtype fp16
    cp /tmp/run/recipe.txt /tmp/run/timing.json /tmp/model/ 2>/dev/null || true
    tar -C /tmp --exclude='*.pt' --exclude='*.npz' -czf "$OUT/default_model.tgz" model run
    echo "TRAIN OK"
  ) > "$OUT/train.log" 2>&1 &
  TP=$!
fi
bash benchmarks/gpu_check.sh build test memcheck
if [ "$TRAIN" = 1 ]; then wait $TP; echo "train exit $?"; tail -3 "$OUT/train.log"; fi
bash benchmarks/gpu_check.sh bench
ls -la "$OUT"
