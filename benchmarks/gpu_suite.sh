#!/usr/bin/env bash
# The GPU suite of issue 14: every GPU check and benchmark in one go, a short table last.
#
#   bash benchmarks/gpu_suite.sh                              # every section, GPU sizes (~12.8 min)
#   bash benchmarks/gpu_suite.sh predict train serve preprocess   # first device call (~7.8 min)
#   bash benchmarks/gpu_suite.sh tests quality                # second device call (~5 min)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh --smoke   # every section on CPU at tiny sizes (~10 min
#                                                             # on 2 cores): GPU-only parts say they skip
# Once, where the device call starts from (no device time): `bash ../shared/gpu/build-kit` (Ray, in .gpukit/) and
# `bash benchmarks/gpu_wheels.sh` (python-multipart, which the kit lacks, in .gpuextra/). Each device call, with
# carry [".gpukit", ".gpuextra"] and timeout_s 600:
#   bash .gpukit/install.sh && export PYTHONPATH=/tmp/site:$PWD && GPU_SUITE_BUDGET_S=570 \
#     bash benchmarks/gpu_suite.sh predict train serve preprocess
# (the suite installs .gpuextra's wheels into /tmp/site). The `env` step always runs first: nvidia-smi,
# torch/CUDA/torchvision versions, and whether `ray.init()` starts and sees the GPU (it says exactly what failed
# if not). Each step has its own timeout, cut to what is left of GPU_SUITE_BUDGET_S; a failed step does not stop
# the others. Logs: $OUT/gpu-suite when $OUT is set (the device machine), else runs/gpu-suite; there only
# results.tsv, table.txt and logs.tar.gz (every step's log, the quality curves and reports), refreshed after
# each step, so a call stopped at its limit still returns them. Big files (images, checkpoints, masks) go to
# $GPU_SUITE_WORK (default /tmp/gpu-suite-work with $OUT, else runs/gpu-suite/work).
#
# Estimated GPU time per section on one H100/H200 with 16 CPUs (from ../shared/REFERENCE.md section 6 and
# benchmarks/RESULTS.md: seed model fp32 forward ~240 img/s, bf16 est. 1,000-1,500 img/s; a predict job's fixed
# start ~12 s; bf16 training 145-177 img/s at batch 8-16; Ray start ~5-10 s):
#   env         0.3 min  versions, ray.init(), a num_gpus=1 task (in each call)
#   predict     4.1 min  10,000 1024x768 JPEGs (500 drawn, the rest copies): Task 1 decode gpu + cpu, Task 2
#                        decode gpu, each ~15 s start + 10-30 s streaming; forward-only fp32 and bf16 per task,
#                        and of the job's 2 actors before and after each job (~15 s each: their CUDA start)
#   train       2.2 min  bench_train (Ray Train x1 vs plain loop, bf16, 640 images at 512, 4 epochs, busy share);
#                        gpu_checks train (fp16 + GradScaler, checkpoint on CPU, NCCL, two workers gloo)
#   serve       1.0 min  two Serve deployments (batch 16, batch 1), concurrency 1 and 32
#   preprocess  0.4 min  256 JPEGs through the GPU and the CPU resize paths under Ray
#   tests       1.8 min  pytest tests/test_gpu.py (one predict job compiles its model)
#   quality     3.6 min  synth 1,100 Task 2 images, QUALITY_TRAIN_S (150 s) of training epochs, predict, evaluate
#   total      ~13.7 min with the second env step; the machine's start (2-4 min) comes on top, and it stays warm
#   only ~30 s after a call: make the second call at once. A longer quality run (the goal may need it):
#   QUALITY_TRAIN_S=300 for ~6 min.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SMOKE=${GPU_SUITE_SMOKE:-0}
SECTIONS=()
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    env|predict|train|serve|preprocess|tests|quality) SECTIONS+=("$arg") ;;
    *) echo "usage: $0 [--smoke] [predict] [train] [serve] [preprocess] [tests] [quality]" >&2; exit 2 ;;
  esac
done
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(predict train serve preprocess tests quality)
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG=${OUT:+$OUT/gpu-suite}
LOG=${LOG:-runs/gpu-suite}
WORK=${GPU_SUITE_WORK:-$([ -n "${OUT:-}" ] && echo /tmp/gpu-suite-work || echo "$LOG/work")}
LOGS=$WORK/logs
mkdir -p "$LOG" "$LOGS"
LOG=$(cd "$LOG" && pwd) WORK=$(cd "$WORK" && pwd) LOGS=$(cd "$LOGS" && pwd)
RESULTS=$LOG/results.tsv
printf 'step\tmetric\tvalue\tgoal\tmet\n' > "$RESULTS"
if ! "$PY" -c "import python_multipart" 2>/dev/null; then  # the kit lacks it (benchmarks/gpu_wheels.sh)
  if ls .gpuextra/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "${GPU_SUITE_SITE:-/tmp/site}" .gpuextra/*.whl \
      && echo "gpu_suite: installed $(ls .gpuextra) into ${GPU_SUITE_SITE:-/tmp/site}"
  else
    echo "gpu_suite: python_multipart is missing and there is no .gpuextra/ (bash benchmarks/gpu_wheels.sh): serve fails"
  fi
fi
if [ "$SMOKE" = 1 ]; then DEVICE=cpu; MODE="smoke (CPU, tiny sizes)"; else DEVICE=cuda; MODE="GPU sizes"; fi
echo "gpu_suite: ${SECTIONS[*]}; $MODE; python $PY; logs in $LOG, work in $WORK; $(date -u '+%Y-%m-%d %H:%M UTC')"

bundle() {  # what the device returns: the table, the rows, one archive of the logs
  "$PY" benchmarks/gpu_checks.py table "$RESULTS" > "$LOG/table.txt" 2>&1
  tar czf "$LOG/logs.tar.gz" -C "$WORK" logs 2>/dev/null
}

# step NAME LIMIT_S COMMAND...: run it with its own timeout, its output in $LOGS/NAME.log; its result lines
# and, when it fails, the end of its log on the console; a status row in the table.
step() {
  local name=$1 limit=$2 start rc status met=-
  shift 2
  start=$(date +%s)
  if [ -n "$DEADLINE" ]; then  # GPU_SUITE_BUDGET_S: end in time for the table, whatever the steps take
    local left=$(( DEADLINE - start ))
    if [ "$left" -lt 30 ]; then
      echo "SKIP $name: ${left} s left of GPU_SUITE_BUDGET_S=${GPU_SUITE_BUDGET_S}"
      printf '%s\tstep\tnot run: out of time (GPU_SUITE_BUDGET_S=%s)\t\tNO\n' "$name" "$GPU_SUITE_BUDGET_S" >> "$RESULTS"
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "== $name (limit ${limit} s): $*"
  echo "\$ $*" > "$LOGS/$name.log"
  timeout -k 20 "$limit" "$@" >> "$LOGS/$name.log" 2>&1
  rc=$?
  local took=$(( $(date +%s) - start ))
  grep -E '^\s*\[result\]|^(SKIP|FAILED)|[0-9]+ (passed|failed|skipped|errors?)\b' "$LOGS/$name.log" | tail -n 25
  case $rc in
    0) status="ok, ${took} s" ;;
    124|137) status="TIMEOUT after ${took} s (limit ${limit} s)"; met=NO ;;
    *) status="FAILED (exit ${rc}) after ${took} s"; met=NO ;;
  esac
  if [ $rc -ne 0 ]; then
    echo "-- $name: $status; the end of $LOGS/$name.log:"
    tail -n 30 "$LOGS/$name.log" | cut -c1-300
    # A step stopped at its limit may leave Ray's processes; on the device machine they are all ours.
    if [ $rc -ge 124 ] && [ -n "${OUT:-}" ]; then "$PY" -c "from ray.scripts.scripts import main; main()" stop --force \
        >> "$LOGS/$name.log" 2>&1; fi
  fi
  printf '%s\tstep\t%s\t\t%s\n' "$name" "$status" "$met" >> "$RESULTS"
  echo "   $name: $status"
  bundle
}

skip() {  # skip NAME WHY: a GPU-only part that smoke mode leaves out, said in the table too
  echo "SKIP $1: $2"
  printf '%s\tstep\tskipped: %s\t\t-\n' "$1" "$2" >> "$RESULTS"
}


section_env() {
  local expect=(); [ "$SMOKE" = 1 ] || expect=(--expect-gpu)
  step env 120 "$PY" benchmarks/gpu_checks.py env "${expect[@]}" --results "$RESULTS"
}

section_predict() {
  local common=(--local --data "$WORK/predict-data" --gpus-per-actor auto --precision bf16 --scale 1 --goal 0.9
                --results "$RESULTS")
  if [ "$SMOKE" = 1 ]; then
    common+=(--images 24 --distinct-images 8 --width 300 300 --aspect 0.75 0.75 --architecture unet
             --input-size 32 --num-filters 8 --depth 3 --batch-size 8 --threads 1 --cpus 4 --forward-images 64)
    echo "predict (smoke): decode gpu runs on CPU actors here (nvJPEG needs CUDA), i.e. its per-image fallback"
    step predict-t1 420 "$PY" benchmarks/bench_predict.py "${common[@]}" --task 1 --decode gpu cpu --sequential-images 4 \
      --step predict-t1
    step predict-t2 300 "$PY" benchmarks/bench_predict.py "${common[@]}" --task 2 --decode gpu --sequential-images 0 \
      --no-storage-check --step predict-t2
  else
    common+=(--images "${PREDICT_IMAGES:-10000}" --distinct-images 500 --width 1024 1024 --aspect 0.75 0.75
             --architecture multitask_unet --input-size 512 --num-filters 32 --batch-size 32 --threads 2
             --object-store-gb 4)
    step predict-t1 300 "$PY" benchmarks/bench_predict.py "${common[@]}" --task 1 --decode gpu cpu --sequential-images 100 \
      --step predict-t1
    step predict-t2 190 "$PY" benchmarks/bench_predict.py "${common[@]}" --task 2 --decode gpu --sequential-images 0 \
      --no-storage-check --step predict-t2
  fi
}

section_train() {
  if [ "$SMOKE" = 1 ]; then
    skip train-bf16 "no GPU: bf16/fp16 training needs use_gpu, so the smoke run trains fp32 on CPU"
    step train 420 "$PY" benchmarks/bench_train.py --images 48 --epochs 3 --size 32 --filters 8 --depth 3 \
      --results "$RESULTS"
    step train-checks 420 "$PY" benchmarks/gpu_checks.py train --work "$WORK/train-checks" --images 32 --results "$RESULTS"
  else
    step train 200 "$PY" benchmarks/bench_train.py --device cuda --architecture multitask_unet --task 2 --loss seed \
      --size 512 --filters 32 --precision bf16 --batch-size 16 --images 640 --epochs 4 --threads 8 \
      --results "$RESULTS"
    step train-checks 180 "$PY" benchmarks/gpu_checks.py train --work "$WORK/train-checks" --images 48 --results "$RESULTS"
  fi
}

section_serve() {
  if [ "$SMOKE" = 1 ]; then
    skip serve-gpu "no GPU: one CPU model replica, bf16 autocast on CPU, tiny U-Net"
    step serve 300 "$PY" benchmarks/bench_serve.py --input-size 32 --num-filters 8 --depth 3 --precision bf16 \
      --image-size 96x64 --concurrency 1,8 --requests 16 --max-batch-size 4 --gpus-per-replica 0 --results "$RESULTS"
  else
    step serve 150 "$PY" benchmarks/bench_serve.py --architecture multitask_unet --input-size 512 --num-filters 32 \
      --precision bf16 --gpus-per-replica "${SERVE_GPUS_PER_REPLICA:-0.25}" --replicas "${SERVE_REPLICAS:-4}" \
      --image-size "${SERVE_IMAGE:-1022x767}" --concurrency 1,32 --requests 320 --max-batch-size 16 \
      --results "$RESULTS"
  fi
}

section_preprocess() {
  if [ "$SMOKE" = 1 ]; then
    step preprocess 240 "$PY" benchmarks/bench_preprocess.py --local --compare-devices --images 12 --size 64 --num-cpus 4 \
      --results "$RESULTS"
  else
    step preprocess 120 "$PY" benchmarks/bench_preprocess.py --local --compare-devices --images 256 --size 512 \
      --num-cpus 16 --results "$RESULTS"
  fi
}

section_tests() {
  # Without CUDA every test in it skips (the smoke run checks that they are collected and skip cleanly).
  step tests 300 "$PY" -m pytest -q tests/test_gpu.py -p no:cacheprovider -o addopts="-ra"
  local summary met
  [ -f "$LOGS/tests.log" ] || return 0  # not run (out of time): its step row says so
  summary=$(grep -E '[0-9]+ (passed|failed|skipped|errors?)\b' "$LOGS/tests.log" | tail -n 1 | tr -d '=')
  case $summary in *failed*|*error*|"") met=NO ;; *passed*) met=yes ;; *) met=- ;; esac  # all skipped: no GPU
  printf 'tests\tpytest tests/test_gpu.py\t%s\tall pass\t%s\n' "${summary:-no summary line}" "$met" >> "$RESULTS"
  bundle
}

section_quality() {
  local q=$WORK/quality keys
  rm -rf "$q"
  keys=("steps.synth.output=$q/data" "steps.train.output=$q/train" "steps.train.registry=$q/registry"
        "steps.predict.output=$q/predictions" "steps.evaluate.output=$q/evaluation")
  if [ "$SMOKE" = 1 ]; then
    skip quality-gpu "no GPU: a tiny U-Net at 64x64 in fp32 on CPU, 2 epochs (the goal needs the GPU run)"
    keys+=(steps.synth.num_images=24 steps.synth.validation_images=4 "steps.synth.width=[128,128]"
           steps.train.model.architecture=unet steps.train.model.input_size=64 steps.train.model.num_filters=8
           steps.train.model.depth=3 steps.train.epochs=2 steps.train.use_gpu=false steps.train.precision=fp32
           steps.train.cpus_per_worker=1 steps.predict.batch_size=4)
    step quality 600 "$PY" -m lesion_ray.cli run benchmarks/gpu_quality.yaml "${keys[@]}"
  else
    # No time limit in a train spec: epochs from the budget and an epoch's estimated time (900 images at
    # ~145 img/s bf16 batch 8, plus validation and a checkpoint: ~8 s).
    local budget=${QUALITY_TRAIN_S:-150} epoch_s=${QUALITY_EPOCH_S:-8}
    local epochs=${QUALITY_EPOCHS:-$(( budget / epoch_s ))}
    echo "quality: $epochs epochs (QUALITY_TRAIN_S=$budget s / QUALITY_EPOCH_S=$epoch_s s per epoch)"
    step quality $(( budget + 150 )) "$PY" -m lesion_ray.cli run benchmarks/gpu_quality.yaml "${keys[@]}" \
      "steps.train.epochs=$epochs"
  fi
  cp runs/gpu-quality/lesion-ray.log "$LOGS/quality-ray.log" 2>/dev/null
  step quality-scores 60 "$PY" benchmarks/gpu_checks.py quality --pipeline-root "$q" --logs "$LOGS/quality" \
    --results "$RESULTS"
}

started=$(date +%s)
# With GPU_SUITE_BUDGET_S (e.g. 570 for a device call of timeout_s 600) no step runs past that budget, less 20 s
# for the table and the logs' archive: a call stopped at its limit would return neither.
DEADLINE=${GPU_SUITE_BUDGET_S:+$(( started + GPU_SUITE_BUDGET_S - 20 ))}
section_env
for section in "${SECTIONS[@]}"; do
  [ "$section" = env ] || "section_$section"
done
echo
echo "== gpu_suite: ${SECTIONS[*]} ($MODE) in $(( $(date +%s) - started )) s; logs: $LOG/logs.tar.gz"
bundle
cat "$LOG/table.txt"
[ "$SMOKE" = 1 ] && echo "(smoke: the goals are the GPU run's; tiny models on 2 shared CPUs are not expected to meet them)"
exit 0
