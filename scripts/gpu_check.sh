#!/usr/bin/env bash
# GPU check: run from anywhere on a fresh CUDA machine. Installs fedlayer (CUDA torch from
# the default index when torch is missing), then prints one line per check:
#   PASS|FAIL <check> [detail]
# Checks: CUDA visible to torch; the CUDA-marked tests (the warm worker's too); a 2-round simulation with
# device=cuda for every method (the summary must say it trained).
set -uo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 PIP_DISABLE_PIP_VERSION_CHECK=1
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

check() {  # check NAME COMMAND...: one line, the last lines of output on failure
  local name=$1 log
  shift
  if log=$("$@" 2>&1); then
    echo "PASS $name ${DETAIL:-}"
  else
    echo "FAIL $name: $(printf '%s' "$log" | tail -n 3 | tr '\n' ' ')"
  fi
}

if ! python -c "import fedlayer, flwr, torch" >/dev/null 2>&1; then
  check "install" bash -c 'python -m pip install -q "torch==2.13.0" && python -m pip install -q -e ".[dev]" && python -m pip install -q --no-deps animal-mnist==0.4'
fi
DETAIL=$(python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null) \
  check "cuda-available" python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
check "cuda-tests" python -m pytest -q -m cuda tests/test_cuda.py
check "warm-worker-cuda" python -m pytest -q -n 0 -m cuda tests/test_warm_worker.py
for strategy in fedavg fedlama fedlp laq pfedla fll local; do
  check "simulation-$strategy-cuda" python -m fedlayer.commands.sim "strategy=$strategy" device=cuda dataset=mnist5k \
    federation.num_clients=4 federation.rounds=2 train.local_steps=20 "output_dir=$out" "run_name=$strategy"
done
