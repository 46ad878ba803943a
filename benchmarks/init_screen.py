"""Which teacher layers a sentence-embedding student should start from, scored before any training:
the teacher's pipeline with only those layers kept (sentence-transformers' layer-drop), STS-B zero-shot
Spearman x 100 (reported, not asserted; issue 23 and issue 24, item 4).

    python benchmarks/init_screen.py --layers 3 [--inits 4,8,12 10,11,12 ...] [--teacher mpnet-base]

--split train (the default) scores --rows labelled STS-B *train* pairs (a seeded draw), so that a start
chosen here is not chosen on STS-B dev, the split the students are judged on; --split dev reproduces
the first screens (init_screen_<teacher>_<layers>.json), which were scored on dev.

Under `--objective sentence` the mapping decides only which teacher layers initialise the student (no
layer is supervised), so a score of the untrained student costs one encode of 1,500 pairs (20 to 45
seconds for three to six mpnet layers on 2 CPU cores) where a distillation costs an hour. Whether the
untrained order survives training is what the trained rows of benchmarks/mpnet_distill.py measure
(the note of issue 23 compares them). Default inits: uniform, last, first, and every evenly spaced
choice ending at the last layer.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, quiet_logs, table, write_result  # noqa: E402
from mpnet_distill import GLUE  # noqa: E402

from fastkd.glue.data import TaskCache, subsample  # noqa: E402
from fastkd.glue.tasks import task_spec  # noqa: E402
from fastkd.mapping import heuristic, parse_mapping  # noqa: E402
from fastkd.models import resolve_model_path  # noqa: E402


def default_inits(n_teacher: int, layers: int) -> list[str]:
    named = [heuristic(m, layers, n_teacher).text for m in ("uniform", "last", "first")]
    spaced = [",".join(str(n_teacher - step * (layers - 1 - i)) for i in range(layers))
              for step in range(1, (n_teacher - 1) // max(1, layers - 1) + 1)]
    return list(dict.fromkeys(named + spaced))


def pairs(data_dir: str, split: str, rows: int):
    """The STS-B pairs that score each start: dev whole, or a seeded draw of `rows` train pairs (0: all)."""
    data = TaskCache(data_dir).data(task_spec("stsb"))
    if split == "dev":
        return data.dev[0]
    if rows < 0:
        raise SystemExit(f"--rows {rows}: give a number of train pairs, or 0 for all of them")
    train = data.train
    keep = subsample(len(train.labels), rows or None, 0)  # (sorted)
    return SimpleNamespace(text_a=[train.text_a[i] for i in keep], text_b=[train.text_b[i] for i in keep],
                           labels=[train.labels[i] for i in keep])


def score(model, dev) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    a = model.encode(dev.text_a, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    b = model.encode(dev.text_b, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return 100 * float(spearmanr(cosine, np.asarray(dev.labels, dtype=np.float64)).statistic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="mpnet-base")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--inits", nargs="*", default=None,
                   help="teacher layers to keep, as fastkd distill --mapping: 10,11,12 or uniform, last, first")
    p.add_argument("--data-dir", default=str(GLUE))
    p.add_argument("--split", choices=("train", "dev"), default="train",
                   help="STS-B split that scores the starts (dev is the split the students are judged on)")
    p.add_argument("--rows", type=int, default=1500, help="train pairs drawn (0: all 5,749); dev is used whole")
    p.add_argument("--name", default=None,
                   help="results/NAME.json (default: init_screen_<teacher>_<layers>, + _train for --split train, "
                        "_trainROWS for other --rows; a default name holding other starts is not written over)")
    args = p.parse_args()
    quiet_logs()
    import torch
    from sentence_transformers import SentenceTransformer

    if args.split == "dev":
        args.rows = None  # (dev is scored whole)
    name = args.name or (f"init_screen_{Path(str(args.teacher)).name}_{args.layers}"
                         + ("" if args.split == "dev" else "_train" if args.rows == 1500 else f"_train{args.rows}"))
    earlier = RESULTS / f"{name}.json"
    held = json.loads(earlier.read_text()).get("settings", {}).get("inits") if earlier.is_file() else args.inits
    if not args.name and held != args.inits:
        raise SystemExit(f"results/{name}.json holds a screen of other starts: give --name for this one")
    dev = pairs(args.data_dir, args.split, args.rows)
    teacher = SentenceTransformer(str(resolve_model_path(args.teacher)), device="cpu")
    teacher.max_seq_length = 128
    encoder = teacher[0].auto_model.encoder
    n_teacher = len(encoder.layer)
    inits = args.inits or default_inits(n_teacher, args.layers)
    rows = [{"kept": "all", "stsb_zeroshot": round(score(teacher, dev), 2)}]
    print(rows[-1], flush=True)
    for init in inits:
        kept = parse_mapping(init, args.layers, n_teacher).initial_layers  # (SUPERVISION@INIT: the layers after @)
        if "-" in init.rpartition("@")[2].split(","):
            raise SystemExit(f"--inits {init}: every student layer starts from a teacher layer here ('-' is not one)")
        init = ",".join(map(str, kept))
        student = copy.deepcopy(teacher)
        inner = student[0].auto_model
        inner.encoder.layer = torch.nn.ModuleList([inner.encoder.layer[k - 1] for k in kept])
        inner.config.num_hidden_layers = len(kept)
        started = time.perf_counter()
        rows.append({"kept": init, "stsb_zeroshot": round(score(student, dev), 2),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    judged_on = ("dev" if args.split == "dev" else "train (all pairs)" if not args.rows
                 else f"train ({len(dev.labels)} pairs drawn with seed 0)")
    write_result(name, {"machine": machine(), "settings": vars(args), "rows": rows,
                        "judge": f"STS-B {judged_on} zero-shot Spearman x100 of the untrained layer-drop pipeline"})
    print(table(rows, ["kept", "stsb_zeroshot"]))


if __name__ == "__main__":
    main()
