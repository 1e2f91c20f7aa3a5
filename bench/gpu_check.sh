#!/usr/bin/env bash
# The GPU check of the model core (one H100/H200, about 8 minutes): jaxdistill's step and the PyTorch
# reference on the bench_smollm pair at seq 512 and 2048 (tokens/s, MFU, measured peak), the full
# objective and kd + lm, and the P100 fit with the memory fraction capped at 16 GB. Appends its rows,
# with date, device and commit, to bench/RESULTS.md. Targets (issue 15): kd + lm at seq 2048 >= 3x the
# reference's tokens/s and >= 50% MFU (bf16); the full objective >= 35% MFU; the P100 form fits 16 GB.
#   bash bench/gpu_check.sh            (on the GPU machine, from the repository root)
#   GPU_CHECK_SMOKE=1 bash bench/gpu_check.sh   (the same commands on tiny models, nothing appended: a CPU
#                                               check of the script before device time is spent on it)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-bench/gpu_check.log}
ARG=""; SEQS="512,2048"; BATCH=8; REPEATS=5; P100="p100"
if [ -n "${GPU_CHECK_SMOKE:-}" ]; then ARG=":smoke"; SEQS="32"; BATCH=2; REPEATS=1; P100="smoke"; fi
KDLM="--config.curriculum.attention=(0.,0.,0.) --config.curriculum.feature=(0.,0.,0.) \
--config.curriculum.layerwise=(0.,0.,0.) --config.curriculum.contrastive=(0.,0.,0.)"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
device=$($PY -c "import jax; d = jax.devices()[0]; print(d.device_kind)")
: > "$OUT"
run() {  # label, then bench.step arguments
  local label=$1; shift
  echo "=== $label" | tee -a "$OUT"
  timeout 240 $PY -m bench.step "$@" 2>&1 | grep -E "^device|^ +[0-9]|reference" | tee -a "$OUT"
}
run "kd + lm, with the PyTorch reference" --config "configs/bench_smollm.py$ARG" --seq_lens "$SEQS" \
    --batch_sizes "$BATCH" --repeats "$REPEATS" --reference $KDLM
run "full objective" --config "configs/bench_smollm.py$ARG" --seq_lens "$SEQS" --batch_sizes "$BATCH" \
    --repeats "$REPEATS"
export XLA_PYTHON_CLIENT_MEM_FRACTION=$($PY -c "import jax; print(min(1.0, 16e9 / jax.devices()[0].memory_stats()['bytes_limit']))" 2>/dev/null || echo 0.11)
run "P100 fit: 16 GB of device memory, fp16, 4 x 512 x 16 micro-batches" \
      --config "configs/bench_smollm.py:$P100" --repeats 1
unset XLA_PYTHON_CLIENT_MEM_FRACTION
if [ -n "${GPU_CHECK_SMOKE:-}" ]; then exit 0; fi   # the smoke form only checks the commands
{
  echo
  echo "### GPU check, $(date -u +%F), $device, commit $commit: \`bash bench/gpu_check.sh\`"
  echo
  echo '```'
  cat "$OUT"
  echo '```'
} >> bench/RESULTS.md
echo "appended to bench/RESULTS.md"
