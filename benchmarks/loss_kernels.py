"""Each fused loss op against eager torch: forward+backward time and peak extra memory, per backend.

Ops (fastkd.ops): the attention-score MSE from Q/K (student and teacher Q/K of one layer pair), the
projected hidden-state MSE, MiniLM's attention-distribution KL from Q/K and MiniLMv2's relation KL
(one of its Q-Q/K-K/V-V relations: per-head vectors of both models, R = H relation heads). Shapes: B=16, H=12, S in {128, 512}, head dim in {32, 64} (hidden
op: student 384 -> teacher 768 wide, once per S); inputs in each of --dtypes (float32, and bfloat16
as under --bf16 autocast; the torch reference then computes in float32 from the 16-bit values).

On a CPU every (op, shape, backend) runs in two processes of its own: inputs are made and one untimed
forward+backward warms up; then one process times `--reps` forward+backward passes (median), the
other runs one pass while tracking the resident-set high-water mark, with glibc's mmap threshold
pinned at 128 KiB so every large tensor is its own mapping, returned to the OS when freed (the RSS
then follows the live tensors instead of the allocator's caching). "extra" = peak minus the level
with the inputs alive; it includes the gradients, which every backend must produce. On a GPU the
allocator's peak is used instead, all in one process (it is reset per measurement). Ratios are to
the eager `torch` reference measured in the same run.

    python benchmarks/loss_kernels.py [--backends torch,cpp --seq-lens 128,512 --head-dims 32,64 --reps 3]
                                      [--dtypes float32,bfloat16 --name loss_kernels_gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_result  # noqa: E402

OPS = ("attention_qk", "hidden", "attention_kl", "relation_kl")


def _inputs(op: str, B: int, H: int, S: int, dh: int, dtype: str, device):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen).to(device, getattr(torch, dtype))  # noqa: E731
    mask = torch.ones(B, S, dtype=torch.long, device=device)
    if op in ("attention_qk", "attention_kl"):
        qs, ks = r(B, H, S, dh).requires_grad_(), r(B, H, S, dh).requires_grad_()
        return (qs, ks, r(B, H, S, dh), r(B, H, S, dh), mask, dh ** -0.5, dh ** -0.5), [qs, ks]
    if op == "relation_kl":
        xs = r(B, H, S, dh).requires_grad_()
        return (xs, r(B, H, S, dh), mask, H), [xs]
    hs = r(B, S, 384).requires_grad_()
    proj = torch.nn.Linear(384, 768).to(device)
    return (hs, r(B, S, 768), mask, proj), [hs, *proj.parameters()]


def child(op: str, B: int, H: int, S: int, dh: int, dtype: str, backend: str, reps: int, what: str) -> dict:
    """One measurement in this process; prints one JSON line."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fastkd import ops
    from fastkd.bench import PeakMemory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fn = {"attention_qk": ops.attention_mse.attention_mse_qk, "hidden": ops.hidden_mse.hidden_mse,
          "attention_kl": ops.attention_kl.attention_kl_qk, "relation_kl": ops.attention_kl.relation_kl}[op]
    if ops.unavailable(backend, device) is not None:
        return {"skipped": ops.unavailable(backend, device)}
    args, params = _inputs(op, B, H, S, dh, dtype, device)

    def once() -> float:
        for p in params:
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*args, backend).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()  # warm-up: builds, caches, first-touch of the gradient buffers
    for p in params:
        p.grad = None
    if what == "time":
        return {"time_s": statistics.median(once() for _ in range(reps))}
    with PeakMemory(device) as memory:
        once()
    return {"extra_mib": memory.extra_mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="torch,cpp,triton,cuda")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--seq-lens", default="128,512")
    p.add_argument("--head-dims", default="32,64")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--name", default="loss_kernels", help="results/NAME.json")
    p.add_argument("--child", nargs=8, metavar=("OP", "B", "H", "S", "DH", "DTYPE", "BACKEND", "WHAT"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        op, B, H, S, dh, dtype, backend, what = args.child
        print(json.dumps(child(op, int(B), int(H), int(S), int(dh), dtype, backend, args.reps, what)))
        return

    import torch

    # On a GPU the allocator's own peak (reset per measurement) is exact in one process; on a CPU
    # the resident-set peak needs a fresh process per measurement.
    in_process = torch.cuda.is_available()
    backends = [b for b in args.backends.split(",") if b]
    if "torch" in backends:
        backends = ["torch"] + [b for b in backends if b != "torch"]
    rows, skipped = [], {}
    cases = [(op, S, dh, dtype) for op in args.ops.split(",") for dtype in args.dtypes.split(",")
             for S in map(int, args.seq_lens.split(","))
             for dh in (map(int, args.head_dims.split(",")) if op != "hidden" else [0])]
    for op, S, dh, dtype in cases:
        ref = None
        for backend in backends:
            res = {}
            for what in ("time", "memory"):
                if in_process:
                    res.update(child(op, args.batch, args.heads, S, dh, dtype, backend, args.reps, what))
                    continue
                cmd = [sys.executable, __file__, "--reps", str(args.reps), "--child", op, str(args.batch),
                       str(args.heads), str(S), str(dh), dtype, backend, what]
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072") if what == "memory" else None
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
                res.update(json.loads(out.stdout.strip().splitlines()[-1]))
            if "skipped" in res:
                skipped[backend] = res["skipped"]
                continue
            row = {"op": op, "dtype": dtype, "S": S, "head_dim": dh or "-", "backend": backend,
                   "time_ms": round(1000 * res["time_s"], 1), "extra_mib": round(res["extra_mib"], 1)}
            if backend == "torch":
                ref = res
            if ref is not None:
                row["time_vs_eager"] = round(res["time_s"] / ref["time_s"], 3)
                row["memory_vs_eager"] = round(res["extra_mib"] / ref["extra_mib"], 3) if ref["extra_mib"] else None
            rows.append(row)
            print(row, flush=True)
    print(table(rows, ["op", "dtype", "S", "head_dim", "backend", "time_ms", "extra_mib", "time_vs_eager", "memory_vs_eager"]))
    for b, why in skipped.items():
        print(f"not measured: {b}: {why}")
    path = write_result(args.name, {"batch": args.batch, "heads": args.heads, "reps": args.reps, "rows": rows,
                                         "not_measured": skipped})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
