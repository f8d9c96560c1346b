#!/usr/bin/env bash
# One prepared check of the bundle on a machine with a CUDA GPU (expected 2-4 minutes on one H200; every step
# has its own time limit and all of them share a budget, $GPU_CHECK_BUDGET_S, default 450 s, so it ends in
# under 8 minutes whatever happens):
#   1. nvidia-smi, torch / CUDA / cuDNN / NCCL versions;
#   2. AMP vs float32 (and float32 vs float64) losses of the paper configuration, same weights and batch;
#   3. a 1-GPU nccl torchrun of the real training config (train.yaml + multi_gpu_train.yaml) for 3 iterations
#      on a small SYNTHETIC prepared cache written to a temporary folder, then its outputs are checked;
#   4. the paper configuration's training step (batch 128, 2 neighbours, queue 581 x 4096, landmark order,
#      bn_splits 4), batched vs per-sample Loc-CondConv, AMP on and off (benchmark_training.py).
#
#   bash bundle/scripts/gpu_check.sh [LOG]         # LOG: default $GPU_CHECK_LOG, else gpu_check.log
#
# Everything printed goes to LOG as well; a machine-readable summary goes to $GPU_CHECK_JSON (default: LOG with
# .json for .log), rewritten after every step. Exit status 0 only if every step passed. Without a CUDA GPU it
# says so on one line and exits 3 before anything else. Python: $PYTHON, else the checkout's .venv, else
# python3. Python packages missing on the machine (monai, pytorch-ignite, fire, termcolor) are installed from
# the wheels in $GPU_CHECK_WHEELS (default: .whl in the checkout) into a temporary folder, if there are any.
# GPU_CHECK_DRY_RUN=1: the same steps on the CPU at toy sizes (AMP in bfloat16, gloo), to test this script's
# plumbing without a GPU; its numbers mean nothing.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 2
LOG="${1:-${GPU_CHECK_LOG:-gpu_check.log}}"
SUMMARY="${GPU_CHECK_JSON:-${LOG%.log}.json}"
[ "$SUMMARY" = "$LOG" ] && SUMMARY="$LOG.json"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
HELPER="$REPO/bundle/scripts/gpu_check.py"

mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1
TEE_PID=$!
WORK=""
finish() {  # remove the scratch folder, let tee write the last lines before the script ends
    [ -n "$WORK" ] && rm -rf "$WORK"
    exec 1>&- 2>&-
    wait "$TEE_PID" 2>/dev/null
}
trap finish EXIT

# 0. A CUDA GPU, or stop here (one line, non-zero exit).
if [ -n "${GPU_CHECK_DRY_RUN:-}" ]; then
    echo "gpu_check: DRY RUN on the CPU at toy sizes (plumbing only; the numbers mean nothing)"
    PARITY_ARGS=(--device cpu --amp_dtype bfloat16 --batch_size 8 --queue_size 16)
    BENCH_ARGS=(--device cpu --batch_size 4 --bn_splits 2 --queue_size 16 --repeats 1)
else
    "$PY" "$HELPER" cuda_ready || exit 3
    PARITY_ARGS=()
    BENCH_ARGS=(--device cuda --amp both --repeats 5)
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
echo "gpu_check: $(date -u +%FT%TZ), host $(hostname), repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')), python $PY"
echo "log $LOG, summary $SUMMARY, scratch $WORK"

# Packages the image may lack: install the carried wheels, if any, into a temporary folder.
missing="$("$PY" "$HELPER" missing_modules)"
WHEELS="${GPU_CHECK_WHEELS:-$REPO/.whl}"
if [ -n "$missing" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "missing modules: $missing; installing the wheels in $WHEELS"
    PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$WORK/site:$PYTHONPATH"
    missing="$("$PY" "$HELPER" missing_modules)"
fi
if [ -n "$missing" ]; then
    echo "gpu_check: these Python modules do not import: $missing (carry their wheels in $WHEELS, see docs/training.md); nothing was run"
    exit 4
fi

failed=0
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-450}))
step() {  # step NAME LIMIT_S COMMAND...: run (within its limit and the budget left), record, rewrite the summary
    local name=$1 limit=$2 start=$SECONDS rc left=$((DEADLINE - SECONDS))
    shift 2
    [ "$left" -lt "$limit" ] && limit=$left
    echo
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: SKIPPED, the time budget is spent ==="
        rc=125
    else
        echo "=== $name (limit ${limit} s) ==="
        timeout --kill-after=10 "$limit" "$@"
        rc=$?
        [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit} s ==="
    fi
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$WORK/steps.tsv"
    echo "=== $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (rc $rc)"), $((SECONDS - start)) s ==="
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    "$PY" "$HELPER" summary --work_dir "$WORK" --json_out "$SUMMARY" --log "$LOG" || true
    return "$rc"
}

# 1. The machine.
if [ -z "${GPU_CHECK_DRY_RUN:-}" ] || command -v nvidia-smi >/dev/null; then step nvidia_smi 30 nvidia-smi; fi
step info 45 "$PY" "$HELPER" info --json_out "$WORK/info.json"

# 2. AMP against float32 on the paper configuration (asserts the losses agree).
step amp_parity 100 "$PY" "$HELPER" amp_parity "${PARITY_ARGS[@]}" --json_out "$WORK/amp_parity.json"

# 3. The real training config under torchrun (1 process, nccl), 3 iterations, order landmark, split BN.
CACHE="$WORK/cache" RUN="$WORK/run"
step make_cache 30 "$PY" "$HELPER" make_cache --cache_dir "$CACHE" --num_subjects 4
step torchrun_training 150 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m monai.bundle run training \
    --config_file "['bundle/configs/train.yaml','bundle/configs/multi_gpu_train.yaml']" \
    --dataset_dir "$CACHE" --output_dir "$RUN" --model_path "$RUN/model.pt" \
    --batch_size 4 --epoch_length 3 --max_epochs 1 --num_workers 0 --mlflow false --order landmark --bn_splits 2
step training_outputs 30 "$PY" "$HELPER" check_training --output_dir "$RUN" --model_path "$RUN/model.pt" \
    --json_out "$WORK/training.json"

# 4. The paper configuration's training step, batched vs per-sample, AMP off and on.
step benchmark 210 "$PY" bundle/scripts/benchmark_training.py "${BENCH_ARGS[@]}" --json_out "$WORK/benchmark.json"

echo
if [ "$failed" -eq 0 ]; then
    echo "gpu_check: all steps passed (summary $SUMMARY)"
else
    echo "gpu_check: $failed step(s) FAILED (summary $SUMMARY)"
fi
[ "$failed" -eq 0 ]
