"""Entry script for launchers that start a file rather than a module (the deepspeed launcher):

    deepspeed --num_gpus 8 launch/fastkd_entry.py distill --deepspeed launch/ds/zero2.json ...
    deepspeed --num_gpus 8 launch/fastkd_entry.py search ...

The deepspeed launcher puts `--local_rank=N` in front of the subcommand, where fastkd's parser
cannot take it; it becomes LOCAL_RANK (what torchrun sets) instead.
"""

import os
import sys

from fastkd.cli import main


def _take_local_rank(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


if __name__ == "__main__":
    sys.exit(main(_take_local_rank(sys.argv[1:])))
