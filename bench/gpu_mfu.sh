#!/usr/bin/env bash
# GPU MFU table for gpt2-small .. gpt2-large (bf16, DeepSpeed ZeRO-1 through pretrain.engines), in one
# call that stays under 8 minutes: the Python side stops starting presets after --budget-s (420 s) and
# `timeout` is the backstop. Needs torch with CUDA; DeepSpeed is used when importable (else a plain bf16
# loop, labelled in the output). Nothing is installed: the machine may have no network.
#   bash bench/gpu_mfu.sh                 # the table
#   bash bench/gpu_mfu.sh --dry-run       # the same logic on CPU with gpt-tiny
#   bash bench/gpu_mfu.sh --vocab 50304   # extra options go to bench.gpu_mfu
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
if "$PY" -c "import deepspeed" >/dev/null 2>&1; then echo "deepspeed: importable"; else echo "deepspeed: missing -> plain bf16 loop"; fi
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
exec timeout 470 "$PY" -m bench.gpu_mfu --budget-s 420 "$@"
