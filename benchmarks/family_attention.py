"""What the attention term costs per family: whole distillation steps with the attention loss on and
off, for base-sized teachers (12 layers, 768 wide, 12 heads; random weights, the uncased WordPiece
vocabulary) of BERT (Q/K recorded, fused `cpp` op), DeBERTa-v3 and MPNet (full scores recorded,
torch reference on (B, H, S, S)), 12 -> 4 layers, uniform mapping.

    python benchmarks/family_attention.py [--seq-lens 128,512 --batch-size 8 --steps 4]

The attention share is 1 - step(attention off) / step(attention on): the part of a step the
attention term (recording, loss, its backward) costs, which is what a fused form for the
disentangled/relative-bias scores could at best remove.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import table, write_result  # noqa: E402
from distill_step import DEFAULT_CORPUS, measure  # noqa: E402

from fastkd.config import DistillConfig  # noqa: E402
from fastkd.models import load_tokenizer  # noqa: E402

BASE = dict(layers=12, hidden=768, heads=12, ffn=3072)


def base_teacher(model_type: str, root: Path) -> Path:
    from conftest import make_tiny_encoder  # the tests' family configs, at base size here

    return make_tiny_encoder(model_type, root / model_type, load_tokenizer("default"), **BASE, max_positions=512)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="bert,deberta-v2,mpnet")
    p.add_argument("--seq-lens", default="128,512")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for model_type in args.families.split(","):
            teacher = base_teacher(model_type, Path(root))
            for seq_len in map(int, args.seq_lens.split(",")):
                times = {}
                for w_attention in (1.0, 0.0):
                    with tempfile.TemporaryDirectory() as out:
                        cfg = DistillConfig(output=out, corpus=str(DEFAULT_CORPUS), teacher=str(teacher), student_layers=4,
                                            max_seq_len=seq_len, batch_size=args.batch_size,
                                            max_steps=args.steps + args.warmup + 1, w_attention=w_attention,
                                            progress=False, objective="tinybert", corpus_mode="packed")
                        times[w_attention] = measure(cfg, args.steps, args.warmup)
                on, off = times[1.0], times[0.0]
                rows.append({"family": model_type, "batch": args.batch_size, "seq_len": seq_len,
                             "attention_path": {"bert": "cpp (fused, Q/K)"}.get(model_type, "torch (full scores)"),
                             "step_s": on["step_s"], "step_s_no_attention": off["step_s"],
                             "attention_share": round(1 - off["step_s"] / on["step_s"], 3),
                             "peak_rss_mib": on["peak_rss_mib"], "peak_rss_mib_no_attention": off["peak_rss_mib"]})
                print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, list(rows[0])))
    path = write_result("family_attention", {"threads": torch.get_num_threads(), "shape": BASE, "student_layers": 4,
                                             "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
