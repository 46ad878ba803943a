#!/usr/bin/env bash
# Full-corpus distillation under DeepSpeed ZeRO on several nodes (passwordless ssh between them, the
# same paths and environment on each; see launch/hostfile.example).
#   launch/distill_multinode.sh HOSTFILE CONFIG [fastkd distill flags...]
#   e.g. launch/distill_multinode.sh launch/hostfile.example launch/ds/zero3.json --teacher bert-base-uncased \
#            --student-layers 6 --corpus /data/wiki --batch-size 32 --bf16 --output /shared/runs/zero3
# --output must be on a filesystem every node sees: ranks write their checkpoint shards there.
set -euo pipefail
hostfile="${1:?usage: launch/distill_multinode.sh HOSTFILE CONFIG [fastkd distill flags...]}"
config="${2:?usage: launch/distill_multinode.sh HOSTFILE CONFIG [fastkd distill flags...]}"
shift 2
here="$(cd "$(dirname "$0")" && pwd)"
exec deepspeed --hostfile "$hostfile" "$here/fastkd_entry.py" distill --deepspeed "$config" "$@"
