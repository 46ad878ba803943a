"""A short real distillation from the 12-layer all-mpnet-base-v2 (`--teacher mpnet-base`) and what
its sentence pipeline gives zero-shot on real STS-B dev, teacher and students side by side.

    python benchmarks/mpnet_distill.py [--layers 6 --steps 60 --batch-size 8 --seq-len 64]

Distils a teacher-initialised student (uniform mapping) on WikiText-2, then scores the teacher, the
student as initialised (0 steps) and the distilled student with fastkd.sentence.zeroshot_stsb
(Spearman of the cosine of the pipeline's embeddings, STS-B dev, 1500 pairs). One seed: the
loss curve and three numbers, no claim about which mapping or budget is better.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402
from distill_step import DEFAULT_CORPUS  # noqa: E402

from fastkd.config import DistillConfig  # noqa: E402
from fastkd.distill import run_distill  # noqa: E402
from fastkd.glue.finetune import TaskCache  # noqa: E402
from fastkd.glue.tasks import task_spec  # noqa: E402
from fastkd.export import export_student  # noqa: E402
from fastkd.mapping import heuristic  # noqa: E402
from fastkd.models import build_student, load_teacher, load_tokenizer, resolve_model_path, student_shape  # noqa: E402
from fastkd.sentence import zeroshot_stsb  # noqa: E402

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--objective", default="auto", help="as distill's (auto: sentence for this teacher)")
    p.add_argument("--corpus-mode", default="auto", help="as distill's (auto: sentences for the sentence objective)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dev = TaskCache(str(GLUE)).data(task_spec("stsb")).dev[0]
    rows = {"teacher all-mpnet-base-v2 (12 layers)": zeroshot_stsb(resolve_model_path("mpnet-base"), dev)}
    with tempfile.TemporaryDirectory() as out:
        common = dict(corpus=str(DEFAULT_CORPUS), teacher="mpnet-base", student_layers=args.layers,
                      max_seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, log_every=5,
                      checkpoint_every=10 ** 6, progress=False, objective=args.objective, corpus_mode=args.corpus_mode)
        # The teacher-initialised student exactly as distill builds it, exported with the pipeline.
        teacher = load_teacher("mpnet-base")
        built = build_student(teacher, student_shape(teacher.config, args.layers), "teacher",
                              heuristic("uniform", args.layers, teacher.config.num_hidden_layers))
        initial = export_student(built, load_tokenizer("mpnet-base"), Path(out) / "init", {},
                                 pipeline_from=resolve_model_path("mpnet-base"))
        del teacher, built
        rows[f"student {args.layers} layers, teacher init, not trained"] = zeroshot_stsb(initial, dev)
        student = run_distill(DistillConfig(output=f"{out}/run", max_steps=args.steps, **common))
        rows[f"student {args.layers} layers, distilled {args.steps} steps"] = zeroshot_stsb(student, dev)
        info = json.loads((student / "fastkd.json").read_text())
        curve = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    for name, r in rows.items():
        print(f"{name}: STS-B dev zero-shot Spearman {100 * r['spearman']:.1f} ({r['pipeline']})")
    print("loss every 5 steps:", [round(r["loss"], 3) for r in curve])
    path = write_result("mpnet_distill", {"settings": vars(args), "mapping": info["mapping"], "loss_ops": info["loss_ops"],
                                         "seconds": info["seconds"], "zeroshot_stsb": rows,
                                         "curve": [{k: r[k] for k in ("step", "loss", "attention", "hidden", "embedding")}
                                                   for r in curve]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
