"""fastkd against TextBrewer, whole distillation steps side by side in one run (issue 26, item 5).

    pip install --no-deps textbrewer==0.2.1     # (a dev-only peer; its own dependencies are fastkd's)
    python benchmarks/vs_textbrewer.py [--steps 10] [--configs fp32-128,bf16-128,fp32-512,bf16-512]

The job: the default teacher (all-MiniLM-L6-v2, 6 layers, 384 wide) distilled into a 3-layer student
that copies teacher layers 2, 4, 6 (fastkd's uniform mapping), TinyBERT's terms with weight 1: the
embedding output and each mapped layer's hidden state (MSE) and attention (MSE). One step = the
teacher's forward, the student's forward, the losses, the backward, gradient clipping at norm 1 and
fastkd's fused AdamW (the same optimizer on both sides), on one batch of real-token-only sequences (the
losses' worst case), the median of --steps after --warmup.

  fastkd      `fastkd bench`'s step (fastkd.bench.measure_backend): each loss backend present (`torch`
              the reference, `cpp` the fused CPU ops), then `auto` (what distill runs by default: per op the
              backend that timed fastest on these shapes, named in its row), pre-softmax attention scores
              from Q and K.
  TextBrewer  0.2.1's GeneralDistiller with the same layer matches (`hidden_mse`, `attention_mse`) on
              stock Hugging Face eager models returning every hidden state and attention map (B x H x S x S
              tensors, as TextBrewer takes them: post-softmax probabilities, where fastkd compares
              pre-softmax scores; the same cost); its step is its own train_on_batch, then the same
              backward, clipping and AdamW. It has no bf16 path (apex fp16 only): its float32 step is
              the reference of every row, the bf16 rows included.

Every row names the CPU, its flags and the threads (the header of the output and the JSON). Timings
are noisy on a shared machine: the rows of one configuration are measured back to back, each after
its own warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quiet_logs, table, write_result  # noqa: E402

from fastkd.bench import measure_backend, profile_table  # noqa: E402
from fastkd.config import BenchConfig  # noqa: E402
from fastkd.mapping import parse_mapping  # noqa: E402
from fastkd.models import build_student, load_teacher, load_tokenizer, resolve_model_path, student_shape  # noqa: E402
from fastkd import ops  # noqa: E402
from fastkd.optim import adamw  # noqa: E402
from fastkd.training import TrainConfig  # noqa: E402

BATCH = {128: 32, 512: 8}


def textbrewer_step_seconds(teacher_path: str, tokenizer, cfg: BenchConfig) -> float:
    """Median seconds of TextBrewer's whole step on the same job (float32: TextBrewer has no bf16 path)."""
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from transformers import AutoModel

    cfg_lr = TrainConfig(max_steps=1, batch_size=1).lr  # the lr fastkd's bench step runs with
    teacher_model = load_teacher(cfg.teacher)
    shape = student_shape(teacher_model.config, cfg.student_layers)
    mapping = parse_mapping(cfg.mapping, shape.layers, teacher_model.config.num_hidden_layers)
    with tempfile.TemporaryDirectory() as folder:
        # fastkd's teacher-initialised student, saved and reloaded as a stock model: the same weights.
        build_student(teacher_model, shape, "teacher", mapping, seed=cfg.seed).save_pretrained(folder)
        student = AutoModel.from_pretrained(folder, attn_implementation="eager", output_hidden_states=True,
                                            output_attentions=True)
    teacher = AutoModel.from_pretrained(teacher_path, attn_implementation="eager", output_hidden_states=True,
                                        output_attentions=True).eval()
    student.train()
    matches = [{"layer_T": 0, "layer_S": 0, "feature": "hidden", "loss": "hidden_mse", "weight": 1}]
    for m, g in enumerate(mapping.layers, start=1):
        matches.append({"layer_T": g, "layer_S": m, "feature": "hidden", "loss": "hidden_mse", "weight": 1})
        matches.append({"layer_T": g - 1, "layer_S": m - 1, "feature": "attention", "loss": "attention_mse",
                        "weight": 1})

    def adaptor(batch, outputs):
        return {"hidden": outputs.hidden_states, "attention": outputs.attentions, "inputs_mask": batch["attention_mask"]}

    logs = tempfile.TemporaryDirectory()
    distiller = GeneralDistiller(TrainingConfig(device="cpu", log_dir=logs.name),
                                 DistillationConfig(intermediate_matches=matches, kd_loss_weight=0, hard_label_weight=0),
                                 teacher, student, adaptor, adaptor)
    # fastkd's own optimizer and clipping (fused AdamW, grad norm 1.0): only the distillation differs
    optimizer = adamw([student], lr=cfg_lr, weight_decay=0.01, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(min(1000, tokenizer.vocab_size // 2), tokenizer.vocab_size, (cfg.batch_size, cfg.seq_len),
                        generator=gen)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step() -> float:
        t0 = time.perf_counter()
        total, _ = distiller.train_on_batch(batch, {})
        total.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(cfg.warmup):
        step()
    seconds = statistics.median(step() for _ in range(cfg.steps))
    logs.cleanup()
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="fp32-128,bf16-128,fp32-512,bf16-512", help="DTYPE-SEQLEN, comma-separated")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", type=int, default=0,
                   help="profile this many more steps of each fastkd row (torch.profiler): its top ops in the output")
    p.add_argument("--name", default="vs_textbrewer", help="results/NAME.json")
    args = p.parse_args()
    for spec in args.configs.split(","):
        dtype, _, length = spec.partition("-")
        if dtype not in ("fp32", "bf16") or not length.isdigit() or int(length) not in BATCH:
            raise SystemExit(f"--configs: {spec!r} is not fp32|bf16-{'|'.join(map(str, BATCH))}")
    quiet_logs()
    try:
        import textbrewer
    except ImportError:
        raise SystemExit("TextBrewer is not installed: pip install --no-deps textbrewer==0.2.1") from None
    host = machine()
    print(f"{host['cpu']}, {host['cores']} cores, {', '.join(host['isa'])}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; TextBrewer {textbrewer.__version__}", flush=True)
    tokenizer = load_tokenizer("default")
    teacher_path = str(resolve_model_path("default"))
    device = torch.device("cpu")
    rows, peer = [], {}
    for spec in args.configs.split(","):
        dtype, seq_len = spec.split("-")
        seq_len = int(seq_len)
        cfg = BenchConfig(batch_size=BATCH[seq_len], seq_len=seq_len, steps=args.steps, warmup=args.warmup,
                          bf16=dtype == "bf16", profile=args.profile)
        if seq_len not in peer:  # float32 only: measured once per length, with the float32 rows
            peer[seq_len] = cfg.batch_size / textbrewer_step_seconds(teacher_path, tokenizer, cfg)
            rows.append({"config": f"fp32 B{cfg.batch_size} x S{seq_len}", "system": "TextBrewer 0.2.1",
                         "seq_per_s": round(peer[seq_len], 2), "vs TextBrewer fp32": "1.00x"})
            print(rows[-1], flush=True)
        teacher_model = load_teacher("default")
        for backend in [b for b in ("torch", "cpp") if ops.unavailable(b, device) is None] + ["auto"]:
            r = measure_backend(backend, teacher_model, tokenizer, cfg, device)
            picked = "" if backend != "auto" else " (" + ", ".join(f"{op} {b}" for op, b in r["ran_on"].items()) + ")"
            rows.append({"config": f"{dtype} B{cfg.batch_size} x S{seq_len}", "system": f"fastkd {backend}{picked}",
                         "seq_per_s": r["seq_per_s"], "vs TextBrewer fp32": f"{r['seq_per_s'] / peer[seq_len]:.2f}x",
                         "ran_on": r["ran_on"], **({"profile": r["profile"]} if "profile" in r else {})})
            print({k: v for k, v in rows[-1].items() if k != "profile"}, flush=True)
            if "profile" in r:
                print(profile_table(r["profile"]), flush=True)
    shown = [{k: v for k, v in r.items() if k not in ("ran_on", "profile")} for r in rows]
    print(table(shown, list(shown[0])))
    write_result(args.name, {"machine": host, "settings": vars(args), "textbrewer": textbrewer.__version__,
                             "rows": rows})


if __name__ == "__main__":
    main()
