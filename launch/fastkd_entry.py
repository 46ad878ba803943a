"""Entry script for launchers that start a file rather than a module (the deepspeed launcher):

    deepspeed --num_gpus 8 launch/fastkd_entry.py search --corpus ... --output ...
"""

import sys

from fastkd.cli import main

if __name__ == "__main__":
    sys.exit(main())
