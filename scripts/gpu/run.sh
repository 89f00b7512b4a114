#!/usr/bin/env bash
# Runs sluice on a GPU machine that has PyTorch + CUDA but no SGLang, Redis or network.
# Needs the carried folder .sgl/ (see scripts/gpu/README.md): sglang_site312.tar.xz (SGLang
# 0.5.17 trimmed for H100/H200), *.deb (redis-server), whl/*.whl (sluice's own dependencies).
# Usage: bash scripts/gpu/run.sh STAGE...
#   stages: tests trainer weight-sync lora text demo demo-det pipeline pipeline-quick
# Results go to $OUT (default /tmp/sluice-gpu-out).
set -uo pipefail
OUT=${OUT:-/tmp/sluice-gpu-out}; mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p /tmp/site /tmp/redis /tmp/bin
[ -d /tmp/site/sglang ] || tar -xJf .sgl/sglang_site312.tar.xz -C /tmp/site
[ -d /tmp/site/redis ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --target /tmp/site .sgl/whl/*.whl
[ -x /tmp/redis/usr/bin/redis-server ] || for f in .sgl/*.deb; do dpkg -x "$f" /tmp/redis; done
cat > /tmp/bin/redis-server <<'SH'
#!/bin/sh
LD_LIBRARY_PATH=/tmp/redis/usr/lib/x86_64-linux-gnu exec /tmp/redis/usr/bin/redis-server "$@"
SH
chmod +x /tmp/bin/redis-server
SGL_DEFAULT="--attention-backend triton --sampling-backend pytorch --disable-piecewise-cuda-graph --grammar-backend none --dtype bfloat16"
export PATH=/tmp/bin:$PATH PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
log "unpacked; $(nvidia-smi -L | head -1); python $(python3 -V)"
python3 -c "import sglang, torch, redis, aiohttp; print('sglang', sglang.__version__, 'torch', torch.__version__)"
rc=0
for stage in "$@"; do
  log "stage $stage"
  case "$stage" in
    tests)
      SLUICE_GPU_REPORT=$OUT/gpu-tests.json python3 -m pytest tests/gpu -m gpu -p no:cacheprovider \
        -o addopts="" -q -rA 2>&1 | tee "$OUT/gpu-tests.log" | tail -40 || rc=1 ;;
    weight-sync)
      python3 -m sluice bench weight-sync --engine sglang --sizes ${SLUICE_WSYNC_SIZES:-tiny 100M 0.5B} --trials 3 \
        --inflight 8 --json "$OUT/weight-sync-sglang.json" --plot "$OUT/weight-sync-sglang.png" 2>&1 | tail -25 || rc=1 ;;
    trainer)
      # sluice's train step vs a plain PyTorch step on the GPU shapes; publish/checkpoint costs.
      mkdir -p "$OUT/trainer"
      python3 -m sluice bench trainer --shapes 167M 0.5B --samples 128 --output-tokens 256 \
        --steps 5 --json "$OUT/trainer/trainer-fixed256.json" --profile /tmp/sluice-prof \
        2>&1 | grep -v "Writing model" | tail -14 || rc=1
      python3 -m sluice bench trainer --shapes 167M --lengths long-tail --output-tokens 512 \
        --no-io --steps 5 --json "$OUT/trainer/trainer-longtail512.json" 2>&1 | tail -8 || rc=1
      cp /tmp/sluice-prof/profile-*.txt "$OUT/trainer/" 2>/dev/null || true ;;
    lora)
      # The adapter path beside full weights on SGLang (0.5B shape, rank 16): bytes and latency.
      python3 -m sluice bench weight-sync --engine sglang --sizes ${SLUICE_LORA_SIZES:-0.5B} \
        --paths abort_all lora --lora-ranks ${SLUICE_LORA_RANKS:-16} --trials 3 --inflight 8 \
        --json "$OUT/weight-sync-lora-sglang.json" 2>&1 | tail -25 || rc=1 ;;
    text)
      # The text path (dataset -> chat template -> tokens -> SGLang -> decoded text -> reward)
      # on a larger random-init Qwen2 shape with a character-level tokenizer (head size 64).
      mkdir -p "$OUT/text"; rm -rf /tmp/sluice-text /tmp/text-gpu
      python3 -m sluice model init /tmp/text-gpu --tokenizer chars --arch qwen2 --layers 8 \
        --hidden 512 --heads 8 > /dev/null || rc=1
      timeout "${SLUICE_TEXT_TIMEOUT:-240}" python3 -m sluice demo --config examples/text-task.yaml \
        --engine sglang --no-live --run-dir /tmp/sluice-text --set model.path=/tmp/text-gpu \
        --set trainer.device=cuda --set inference.mem_fraction=0.3 \
        --set "inference.extra_args=[$(echo ${SLUICE_SGLANG_ARGS:-$SGL_DEFAULT} | tr ' ' ',')]" \
        ${SLUICE_TEXT_ARGS:-} > /tmp/sluice-text.log 2>&1 || rc=1
      tail -12 /tmp/sluice-text.log
      { tail -60 /tmp/sluice-text.log; for f in server worker trainer; do
          echo "=== $f"; tail -30 "/tmp/sluice-text/logs/$f.log"; done; } > "$OUT/text/logs.txt" 2>&1
      cp /tmp/sluice-text/report/summary.json /tmp/sluice-text/metrics.jsonl "$OUT/text/" \
        2>/dev/null || true ;;
    demo|demo-det)
      # The demo's task and trainer on the GPU; one head of 64 so that SGLang's attention
      # kernels get a head size they support (the CPU demo uses 4 heads of 16).
      extra=""; [ "$stage" = demo-det ] && extra="--set inference.deterministic=true"
      mkdir -p "$OUT/$stage"; rm -rf "/tmp/sluice-$stage"
      timeout "${SLUICE_DEMO_TIMEOUT:-300}" python3 -m sluice demo --engine sglang --no-live \
        --run-dir "/tmp/sluice-$stage" --set model.heads=1 --set inference.mem_fraction=0.3 \
        --set "inference.extra_args=[$(echo ${SLUICE_SGLANG_ARGS:-$SGL_DEFAULT} | tr ' ' ',')]" \
        $extra ${SLUICE_DEMO_ARGS:-} > "/tmp/sluice-$stage.log" 2>&1 || rc=1
      tail -15 "/tmp/sluice-$stage.log"
      { tail -60 "/tmp/sluice-$stage.log"; for f in server worker trainer; do
          echo "=== $f"; tail -30 "/tmp/sluice-$stage/logs/$f.log"; done; } > "$OUT/$stage/logs.txt" 2>&1
      cp /tmp/sluice-$stage/report/summary.json /tmp/sluice-$stage/metrics.jsonl \
        "$OUT/$stage/" 2>/dev/null || true ;;
    pipeline|pipeline-quick)
      # One SGLang server for the whole bench, the trainer on the same GPU (bf16 autocast);
      # the ~100M Qwen2 shape on long-tail outputs. SLUICE_PIPELINE_ARGS adds/overrides flags.
      q=""; [ "$stage" = pipeline-quick ] && q="--quick"
      mkdir -p "$OUT/$stage"; rm -rf "/tmp/sluice-$stage"
      timeout "${SLUICE_PIPELINE_TIMEOUT:-500}" python3 -m sluice bench pipeline --engine sglang \
        --workload long-tail-gpu --sglang-args "${SLUICE_SGLANG_ARGS:-$SGL_DEFAULT}" $q \
        --workdir "/tmp/sluice-$stage" --keep --run-timeout 200 ${SLUICE_PIPELINE_ARGS:-} \
        --json "$OUT/$stage/pipeline-gpu.json" --plot "$OUT/$stage/pipeline-gpu.png" \
        > "/tmp/sluice-$stage.log" 2>&1 || rc=1
      tail -40 "/tmp/sluice-$stage.log"
      { cat "/tmp/sluice-$stage.log"; for f in /tmp/sluice-$stage/sglang.log \
          /tmp/sluice-$stage/*/*.log; do echo "=== $f"; tail -25 "$f"; done; } \
        > "$OUT/$stage/logs.txt" 2>&1 ;;
    *) echo "unknown stage $stage"; rc=2 ;;
  esac
done
log "done rc=$rc"
exit $rc
