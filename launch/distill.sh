#!/usr/bin/env bash
# Full-corpus distillation under DeepSpeed ZeRO on the GPUs (or CPU processes) of one node.
#   launch/distill.sh NPROC CONFIG [fastkd distill flags...]
#   e.g. launch/distill.sh 8 launch/ds/zero2.json --teacher bert-base-uncased --student-layers 4 \
#            --mapping 2,5,8,12 --corpus wiki/ --max-seq-len 128 --batch-size 32 --bf16 --output runs/zero2
# Global batch = --batch-size x --grad-accum x NPROC; the configs in launch/ds/ take it with "auto".
# Interrupted? Run the same command with --resume.
set -euo pipefail
nproc="${1:?usage: launch/distill.sh NPROC CONFIG [fastkd distill flags...]}"
config="${2:?usage: launch/distill.sh NPROC CONFIG [fastkd distill flags...]}"
shift 2
here="$(cd "$(dirname "$0")" && pwd)"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu  # CPU ranks talk over gloo
fi
exec deepspeed --num_gpus "$nproc" "$here/fastkd_entry.py" distill --deepspeed "$config" "$@"
