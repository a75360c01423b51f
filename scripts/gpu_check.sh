#!/usr/bin/env bash
# resnet-train on one GPU machine (e.g. one H200, 16 CPU cores), in under 8 minutes.
#
#   bash scripts/gpu_check.sh             # from anywhere; runs in the project's root
#   bash scripts/gpu_check.sh --dry-run   # (or GPU_CHECK_DRY=1) print the commands only
#
# Writes gpu_check.json (each part's rc, seconds and key figures), gpu_check.log, and each
# part's output (<part>.txt, <part>.json) into $OUT, else ./gpu_check_out. Every part has
# its own timeout, clipped to what is left of GPU_CHECK_BUDGET (default 440 s), so a part
# that fails or hangs does not hide the others; the most expensive part (compilation) runs
# last. Needs the project's dependencies and pytest, nothing else.
#
# Parts: env | tests: the suite's CUDA-relevant tests on the device | r50_eager, r50_compiled:
# ResNet-50 224 px batch 256, synthetic on-device input, bf16 + channels_last, our step vs a
# bare loop (images/s, peak memory) | r20_step: ResNet-20 CIFAR step (images/s, host reads
# and CUDA syncs per step) | cifar_epoch: resnet-train's CIFAR ResNet-20 epochs vs the usual
# script (steady-state images/s, peak memory from metrics.jsonl) | folder_loader: the
# folder pipeline with 16 workers on generated JPEGs, to the GPU (does decode keep up?).
set -u
cd "$(dirname "$0")/.."
DRY=${GPU_CHECK_DRY:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
O=${OUT:-gpu_check_out}
mkdir -p "$O" && O=$(cd "$O" && pwd)
PY=${PY:-python3}
BUDGET=${GPU_CHECK_BUDGET:-440}
WORKERS=${GPU_CHECK_WORKERS:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
START=$(date +%s)
LOG=$O/gpu_check.log
: >"$LOG"
: >"$O/parts.jsonl"
[ "$DRY" = 1 ] && : >"$O/commands.txt"
PARTS="env tests r50_eager r20_step folder_loader cifar_epoch r50_compiled folder_nvjpeg"
for p in $PARTS gpu_check; do rm -f "$O/$p.json" "$O/$p.txt"; done  # no stale figures
rm -f "$O/tests.xml"
log() { echo "== $*" | tee -a "$LOG"; }
record() {  # name rc seconds limit
  echo "{\"part\": \"$1\", \"rc\": $2, \"seconds\": $3, \"timeout_s\": $4}" >>"$O/parts.jsonl"
}

part() {  # part NAME TIMEOUT_S CMD...: run CMD under its timeout, output in $O/NAME.txt
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  (( limit > left )) && limit=$left
  local cmd
  cmd=$(printf '%q ' "$@")
  if [ "$DRY" = 1 ]; then
    log "$name (timeout ${limit}s): $cmd"
    echo "$cmd" >>"$O/commands.txt"
    record "$name" null 0 "$limit"
    return
  fi
  if (( limit < 20 )); then
    log "$name: skipped, the time budget is spent"
    record "$name" 125 0 0
    return
  fi
  log "$name (timeout ${limit}s): $cmd"
  local s rc
  s=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$O/$name.txt" 2>&1
  rc=$?
  tail -n 40 "$O/$name.txt" >>"$LOG"
  log "$name: rc $rc in $(( $(date +%s) - s )) s"
  record "$name" "$rc" "$(( $(date +%s) - s ))" "$limit"
}

B="$PY scripts/bench.py"
R50="--device cuda --arch resnet50 --image-size 224 --classes 1000 --batch 256 --amp bf16 --channels-last true"

[ "$DRY" = 1 ] || { nvidia-smi 2>&1 | head -n 15 >>"$LOG"; }
part env 60 $B env --require-cuda --json "$O/env.json"

# The tests whose code paths change on CUDA; run.device=auto makes them run there.
#   test_bf16_channels_last_path_trains: bf16 autocast + channels_last convs, train and eval
#   test_fp16_*: fp16 + GradScaler (state saved/restored, no host read per step)
#   test_no_host_sync_* / test_the_counter_sees_*: 0 host reads per step, and its control
#   test_*non_finite*: the on-device skip and the stop after train.max_bad_steps
#   test_*poisoned_step* / test_*micro_batch* / test_grad_norms_*: TrainStep itself on CUDA
#   test_prep_normalises* / test_pca_lighting* / test_prep_draws_*: DevicePrep on CUDA
#     (normalisation, PCA lighting and jitter drawn on a CUDA generator)
#   test_compile_trains_like_eager*: train.compile (with aot_eager; inductor: r50_compiled)
#   test_a_run_leaves_torch_global_flags*: cudnn.benchmark set during a run, put back after
#   test_pin_memory_*, test_amp_and_layout_resolution: pinned batches, CUDA's auto choices
#   test_momentum_resumed_into_another_memory_format_*: the fused SGD after a resume that
#     changes the layout (CUDA's fused kernel checks that the strides match)
#   test_device_decode_draws_the_cpu_paths_crops: nvjpeg's crops against the CPU path's
#     pixels (tests.xml holds the worst image's mean and the largest difference, in grey
#     levels, for each case)
TESTS=${GPU_CHECK_TESTS:-"bf16_channels_last or fp16 or host_sync or counter_sees or \
non_finite or poisoned_step or micro_batch or grad_norms_per_stage or compile_trains or \
global_flags or pin_memory or amp_and_layout or prep_normalises or pca_lighting_equals or \
prep_draws_per_global or momentum_resumed_into or draws_the_cpu_paths_crops"}
part tests 170 $PY -m pytest -q -p no:cacheprovider --junitxml="$O/tests.xml" \
  tests/test_training.py tests/test_engine.py tests/test_features.py tests/test_data.py \
  tests/test_optim.py tests/test_device_decode.py \
  -k "$TESTS"

part r50_eager 100 $B step $R50 --warmup 10 --steps 15 --rounds 3 --json "$O/r50_eager.json"
part r20_step 60 $B step --device cuda --arch resnet20 --batch 128 --warmup 20 --steps 50 \
  --rounds 3 --sync-steps 10 --json "$O/r20_step.json"
part folder_loader 120 $B data --device cuda --pipelines folder --workers "$WORKERS" \
  --images 4096 --batch 128 --epochs 2 --rounds 2 --min-seconds 0 --dir /tmp/gpu_check_data \
  --json "$O/folder_loader.json"
part cifar_epoch 110 $B epoch --device cuda --samples 50000 --val-samples 10000 --epochs 2 \
  --rounds 1 --dir /tmp/gpu_check_data --json "$O/cifar_epoch.json"
part r50_compiled 240 $B step $R50 --compile --warmup 10 --steps 15 --rounds 3 \
  --json "$O/r50_compiled.json"
# data.decode=device: the workers only read the files, nvjpeg decodes the batch (if time is left)
part folder_nvjpeg 60 $B data --device cuda --pipelines folder --workers "$WORKERS" \
  --images 4096 --batch 128 --epochs 2 --rounds 2 --min-seconds 0 --dir /tmp/gpu_check_data \
  --decode device --json "$O/folder_nvjpeg.json"

$PY scripts/bench.py summarize "$O" 2>&1 | tee -a "$LOG"
log "total $(( $(date +%s) - START )) s; results in $O/gpu_check.json"
