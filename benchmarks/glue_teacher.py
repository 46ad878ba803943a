"""The reference every student is compared with: the default teacher fine-tuned on SST-2, MRPC, RTE.

A budget that fits a 2-core CPU: training sets subsampled (deterministically) to --max-train-examples,
full dev sets. Prints the GLUE table and minutes per task; writes benchmarks/results/glue_teacher.json.

    python benchmarks/glue_teacher.py [--data-dir ../shared/data/glue --max-train-examples 2000 --epochs 3 --lr 1e-4]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402

from fastkd.glue.config import FinetuneConfig, GlueConfig  # noqa: E402
from fastkd.glue.report import markdown  # noqa: E402
from fastkd.glue.run import run_glue  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA))
    p.add_argument("--tasks", default="sst2,mrpc,rte")
    p.add_argument("--max-train-examples", type=int, default=2000)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier weights newly initialised" report is expected
    hf_logging.disable_progress_bar()

    cfg = FinetuneConfig(epochs=args.epochs, max_train_examples=args.max_train_examples, batch_size=args.batch_size,
                         lr=args.lr, max_seq_len=args.max_seq_len, seed=args.seed, progress=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report = run_glue(GlueConfig(model=[args.model], tasks=args.tasks, data_dir=args.data_dir, output=out, finetune=cfg))
    minutes = (time.perf_counter() - started) / 60
    print(markdown(report))
    tasks = report["models"][0]["tasks"]
    for key, r in tasks.items():
        print(f"{r['task']}: score {100 * r['score']:.1f} (majority {100 * r['baseline_score']:.1f}), "
              f"{r['train_examples']} train examples, {r['steps']} steps, {r['seconds'] / 60:.1f} min")
    print(f"total {minutes:.1f} min")
    path = write_result("glue_teacher", {"model": args.model, "minutes": round(minutes, 2), "report": report})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
