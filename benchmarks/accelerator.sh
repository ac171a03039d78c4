#!/usr/bin/env bash
# What a HourNAS ImageNet search costs on this machine's GPU, from a fresh checkout, in one
# command (about 8 minutes on one H100: installing, then benchmarks/accelerator.py):
#
#     bash benchmarks/accelerator.sh [extra arguments for benchmarks/accelerator.py]
#
# Installs requirements.txt plus JAX's CUDA wheels (requirements-cuda.txt) into the current
# Python environment (HOURNAS_SKIP_INSTALL=1 skips that), prints nvidia-smi and jax.devices(),
# then runs benchmarks/accelerator.py at its defaults (the paper's search: FBNet space, 224x224,
# 1000 classes, batch 256), with the seconds left of HOURNAS_BENCH_BUDGET_S (default 480) as its
# --budget-s: measurements it could not start in time are reported null, "skipped: time
# budget". Without a GPU that JAX sees, it says so and runs the CPU-sized --tiny instead.
# The last line printed is the benchmark's JSON.
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
BUDGET_S="${HOURNAS_BENCH_BUDGET_S:-480}"
# Seconds kept back for the measurement running when the budget is reached, and the summary.
MARGIN_S="${HOURNAS_BENCH_MARGIN_S:-90}"
start=$SECONDS

have_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  have_gpu=1
fi

if [[ "${HOURNAS_SKIP_INSTALL:-0}" != 1 ]]; then
  requirements=requirements.txt
  [[ $have_gpu == 1 ]] && requirements=requirements-cuda.txt
  echo "== pip install -r $requirements"
  if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check -r "$requirements"; then
    echo "error: pip install -r $requirements failed" >&2
    exit 1
  fi
  echo "   done in $((SECONDS - start)) s"
fi

echo "== nvidia-smi"
if [[ $have_gpu == 1 ]]; then
  nvidia-smi
else
  echo "no NVIDIA GPU here (nvidia-smi is missing or lists none)"
fi

echo "== jax.devices()"
backend=$("$PYTHON" - <<'EOF'
import jax
print(jax.devices(), file=__import__('sys').stderr)
print(jax.default_backend())
EOF
)
status=$?
if [[ $status != 0 ]]; then
  echo "error: JAX does not start (exit $status)" >&2
  exit 1
fi

# The GPU's memory for the device process (JAX takes 75% by default); the input-pipeline
# children never touch the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
if [[ "$backend" == gpu || "$backend" == cuda ]]; then
  left=$((BUDGET_S - (SECONDS - start) - MARGIN_S))
  (( left < 60 )) && left=60
  echo "== python benchmarks/accelerator.py --budget-s $left $*"
  exec "$PYTHON" benchmarks/accelerator.py --budget-s "$left" "$@"
fi
echo "JAX sees no GPU (backend: $backend): running the CPU-sized --tiny instead"
echo "== python benchmarks/accelerator.py --tiny $*"
exec "$PYTHON" benchmarks/accelerator.py --tiny "$@"
