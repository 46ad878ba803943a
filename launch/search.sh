#!/usr/bin/env bash
# Spread a layer-mapping search over the GPUs (or CPU processes) of one node: each rank evaluates its
# slice of every generation with its own teacher copy; rank 0 owns the GA's store and the outputs.
#   launch/search.sh NPROC [fastkd search flags...]
#   e.g. launch/search.sh 8 --teacher bert-base-uncased --student-layers 4 --corpus wiki/ --data-dir glue_data --output runs/search
# The deepspeed launcher works the same way (it passes --local_rank, which fastkd accepts):
#   deepspeed --num_gpus 8 launch/fastkd_entry.py search ...
set -euo pipefail
nproc="${1:?usage: launch/search.sh NPROC [fastkd search flags...]}"
shift
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # CPU ranks: one thread each, no oversubscription
fi
exec python -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m fastkd search "$@"
