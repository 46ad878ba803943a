"""Two parts of a CPU distillation step, timed alone (issue 26): dropout, and the bf16 teacher's weights.

    python benchmarks/cpu_step_parts.py [--repeats 30]

1. Dropout at p = 0.1 on a student's hidden states (32 x 128 x 384) and attention probabilities
   (32 x 12 x 128 x 128): torch's `F.dropout` against fastkd's fused op (`fastkd.ops.dropout.dropout`),
   float32 and bf16, each the median of --repeats calls after one.
2. The default teacher's forward at 32 x 128 under bf16 autocast: over its float32 weights (autocast casts
   every Linear weight again at each forward) against fastkd's Teacher, which runs the Linears from a bf16
   copy made once; the hidden states are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, quiet_logs, table, write_result  # noqa: E402

from fastkd.models import load_teacher  # noqa: E402
from fastkd.ops.dropout import dropout  # noqa: E402
from fastkd.teacher import Teacher  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    quiet_logs()
    host = machine()
    print(f"{host['cpu']}, {host['cores']} cores, {', '.join(host['isa'])}; {torch.get_num_threads()} threads")
    rows = []
    for name, shape in (("hidden states", (32, 128, 384)), ("attention probabilities", (32, 12, 128, 128))):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype)
            torch_ms = median_ms(lambda: torch.nn.functional.dropout(x, 0.1, True), args.repeats)
            fused_ms = median_ms(lambda: dropout(x, 0.1, True), args.repeats)
            rows.append({"part": f"dropout, {name} {'x'.join(map(str, shape))}", "dtype": str(dtype).split(".")[1],
                         "torch_ms": torch_ms, "fastkd_ms": fused_ms, "ratio": f"{torch_ms / fused_ms:.1f}x"})
            print(rows[-1], flush=True)

    model = load_teacher("default").eval()
    ids = torch.randint(1000, model.config.vocab_size, (32, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    layers = list(range(model.config.num_hidden_layers + 1))
    plain = Teacher(model, layers, [], autocast_dtype=torch.bfloat16)
    plain.half_linears = lambda device: {}  # autocast over the float32 weights
    copy = Teacher(model, layers, [], autocast_dtype=torch.bfloat16)
    a, b = plain(ids, mask), copy(ids, mask)
    assert all(torch.equal(a.hidden[layer], b.hidden[layer]) for layer in layers)
    autocast_ms = median_ms(lambda: plain(ids, mask), max(5, args.repeats // 3))
    copy_ms = median_ms(lambda: copy(ids, mask), max(5, args.repeats // 3))
    rows.append({"part": "default teacher forward 32 x 128, bf16 autocast", "dtype": "bfloat16",
                 "torch_ms": autocast_ms, "fastkd_ms": copy_ms, "ratio": f"{autocast_ms / copy_ms:.2f}x"})
    print(rows[-1], flush=True)
    print(table(rows, list(rows[0])))
    write_result("cpu_step_parts", {"settings": vars(args), "rows": rows,
                                    "columns": {"torch_ms": "torch's dropout / autocast over float32 weights",
                                                "fastkd_ms": "fastkd's fused dropout / the Teacher's bf16 copy"}})


if __name__ == "__main__":
    main()
