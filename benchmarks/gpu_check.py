"""`make gpu-check`: what fastkd needs to know about a GPU, in one command (about 8 minutes on one GPU).

1. correctness: every fused op of fastkd.ops on `triton` and `cuda` against its torch reference on
   the same values, loss (with and without autograd) and gradients: float32, bfloat16, float16 (and float32 with TF32 allowed),
   S in {17, 128, 511, 1024}, head dims 32/64/128, equal and different head counts, padding with an
   all-padded batch row; the attention KL and MiniLMv2's relation KL (384 vs 768 wide, R = 12, 24);
   then the self-check every run does before first use (fastkd.ops.select).
2. `fastkd bench` (default teacher -> 3 layers) at S=128 and S=512, float32 and bf16, every backend, and
   `auto` (each op timed on the run's shapes, the fastest kept) as a row of its own naming its picks.
3. benchmarks/loss_kernels.py on the GPU: each op, eager vs fused, time and extra memory.

Everything lands in benchmarks/results/gpu_check_<gpu>.json (and loss_kernels_<gpu>.json), with the
device named; a summary is printed. A failed correctness row is reported, never hidden: exit 1.
Without an NVIDIA GPU it prints one line and exits 0 (so `make gpu-check` is safe anywhere).

    python benchmarks/gpu_check.py [--quick] [--skip-bench] [--probe]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))


def driver_sees_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def gpu_absent_reason(probe: bool = False) -> str | None:
    """Why this machine cannot run the GPU check, or None when an NVIDIA GPU is usable. probe: the
    driver decides (before the venv exists; the interpreter running this may hold a CPU-only torch)."""
    if probe and driver_sees_gpu():
        return None
    try:
        import torch
    except Exception:  # no torch yet (make gpu-check installs it) and no driver answered
        return "no NVIDIA GPU here (nvidia-smi lists none, and there is no torch to ask)"
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "torch.cuda.is_available() is False"
        return f"no NVIDIA GPU here ({why})"
    if torch.version.hip is not None:
        return "an AMD GPU (ROCm): fastkd's CUDA kernels are NVIDIA-only"
    return None


# --- 1. correctness --------------------------------------------------------------------------------

def _mask(B: int, S: int, device):
    import torch

    lengths = torch.tensor([S, S // 2 + 1, 0][:B])  # full, odd-length padded, all padded
    return (torch.arange(S)[None, :] < lengths[:, None]).long().to(device)


def attention_cases(seq_lens, head_dims, heads: int = 4):
    """(name, B, Hs, Ht, S, ds, dt): every S and head dim with equal heads, plus different counts."""
    cases = [(f"S={S} d={d}", 3, heads, heads, S, d, d) for S in seq_lens for d in head_dims]
    cases += [(f"S={S} heads 2 vs 3, d=32", 3, 2, 3, S, 32, 32) for S in seq_lens[-1:]]  # merged: 64, 96 wide
    return cases


def relation_cases(seq_lens):
    """(name, B, S, student width, teacher width, relation heads): MiniLMv2 relations of a 384-wide
    student against a 768-wide teacher (12 heads each side), at 12 and at 24 relation heads."""
    return [(f"S={S} 384 vs 768, R={r}", 3, S, 384, 768, r) for S in seq_lens[-2:] for r in (12, 24)]


def hidden_cases(seq_lens):
    """(name, B, S, Ds, Dt, projected)."""
    return [(f"S={S} 384->768", 3, S, 384, 768, True) for S in seq_lens[-2:]] + \
           [(f"S={seq_lens[-1]} 768 identity", 3, seq_lens[-1], 768, 768, False)]


def gradient_tolerance(tolerance: float, dtype, want) -> float:
    """The relative gradient tolerance for gradients handed back in `dtype`, plus one subnormal step of
    that dtype relative to the largest reference gradient: a mean over B*H*S rows (S = 1024) makes
    gradients of ~1e-5, below float16's smallest normal (6.1e-5), where float16 holds only absolute
    steps of 6e-8, so even an exact float32 kernel cast to float16 misses a relative eps there."""
    import torch

    if want is None or not want.numel() or not dtype.is_floating_point:
        return tolerance
    info = torch.finfo(dtype)
    step = info.smallest_normal * info.eps  # the subnormal spacing
    return tolerance + step / max(want.abs().max().item(), 1e-30)


def correctness(device, backends, dtypes, seq_lens=(17, 128, 511, 1024), head_dims=(32, 64, 128),
                tf32: bool = True) -> list[dict]:
    """Every (op, case, dtype, backend): the largest relative error of the loss and of each gradient
    against the torch reference on the same values, and whether it is within the self-check's
    tolerance. tf32: also float32 with torch's TF32 matmuls allowed (its own, looser tolerance)."""
    import torch
    from torch import nn

    from fastkd.ops import attention_kl as ak
    from fastkd.ops import attention_mse as am
    from fastkd.ops import hidden_mse as hm
    from fastkd.ops import select

    gen = torch.Generator().manual_seed(0)
    modes = [(dt, False) for dt in dtypes] + ([(torch.float32, True)] if tf32 and device.type == "cuda" else [])
    rows = []

    def compare(op, name, dtype, allow_tf32, backend, fn, reference, args, grad_idx):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            value_tol, grad_tol = select.tolerances(device, dtype)
            want, want_grads = select._evaluate(reference, args, grad_idx, lambda x: x.detach().float().requires_grad_())
            t0 = time.perf_counter()
            got, got_grads = select._evaluate(fn, args, grad_idx, lambda x: x.detach().clone().requires_grad_())
            seconds = time.perf_counter() - t0
            with torch.no_grad():  # the loss-only kernels (evaluation, the teacher-free terms) too
                loss_only = fn(*args).detach().float()
            value_err = max(select._relative_error(got, want), select._relative_error(loss_only, want))
            # each gradient against its own tolerance; the row reports the worst one (largest err / tol)
            grad_err, grad_tol = max(((select._relative_error(g, w), gradient_tolerance(grad_tol, dtype, w))
                                      for g, w in zip(got_grads, want_grads)),
                                     key=lambda et: et[0] / et[1], default=(0.0, grad_tol))
            ok = value_err <= value_tol and grad_err <= grad_tol
            error = None
        except Exception as exc:
            value_err = grad_err = float("inf")
            ok, seconds, error = False, 0.0, " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
        finite = lambda x: x if x == x and x not in (float("inf"), float("-inf")) else None  # noqa: E731 (strict JSON)
        row = {"op": op, "case": name, "dtype": str(dtype).replace("torch.", "") + ("+tf32" if allow_tf32 else ""),
               "backend": backend, "loss_error": finite(value_err), "grad_error": finite(grad_err),
               "tolerance": [value_tol, grad_tol] if error is None else None, "ok": ok,
               "first_call_s": round(seconds, 3)}
        if error:
            row["error"] = error
        rows.append(row)

    for dtype, allow_tf32 in modes:
        for name, B, hs, ht, S, ds, dt in attention_cases(list(seq_lens), list(head_dims)):
            mask = _mask(B, S, device)
            qk = lambda h, d: [torch.randn(B, h, S, d, generator=gen).to(device, dtype) for _ in range(2)]  # noqa: E731
            qs, ks = qk(hs, ds)
            qt, kt = qk(ht, dt)
            args = (qs, ks, qt, kt, mask, ds ** -0.5, dt ** -0.5)
            for backend in backends:
                compare("attention_mse", name, dtype, allow_tf32, backend,
                        lambda *a, b=backend: am.attention_mse_qk(*a, b), am.reference, args, (0, 1))
                if hs == ht:  # different head counts: the KL compares head averages, on the reference only
                    compare("attention_kl", name, dtype, allow_tf32, backend,
                            lambda *a, b=backend: ak.attention_kl_qk(*a, b), ak.reference, args, (0, 1))
        for name, B, S, ds_cat, dt_cat, heads in relation_cases(list(seq_lens)):
            mask = _mask(B, S, device)
            xs = torch.randn(B, 12, S, ds_cat // 12, generator=gen).to(device, dtype)
            xt = torch.randn(B, 12, S, dt_cat // 12, generator=gen).to(device, dtype)
            for backend in backends:
                compare("relation_kl", name, dtype, allow_tf32, backend,
                        lambda xs_, xt_, m, b=backend, r=heads: ak.relation_kl(xs_, xt_, m, r, b),
                        lambda xs_, xt_, m, r=heads: ak.relation_kl(xs_, xt_, m, r, "torch"), (xs, xt, mask), (0,))
        for name, B, S, Ds, Dt, projected in hidden_cases(list(seq_lens)):
            mask = _mask(B, S, device)
            projection = None
            if projected:
                projection = torch.nn.utils.skip_init(nn.Linear, Ds, Dt, device=device)
                with torch.no_grad():
                    projection.weight.copy_(torch.randn(Dt, Ds, generator=gen) * Ds ** -0.5)
                    projection.bias.copy_(torch.randn(Dt, generator=gen))
            args = (torch.randn(B, S, Ds, generator=gen).to(device, dtype),
                    torch.randn(B, S, Dt, generator=gen).to(device, dtype), mask, projection)
            for backend in backends:
                compare("hidden_mse", name, dtype, allow_tf32, backend,
                        lambda *a, b=backend: hm.hidden_mse(*a, b), hm.reference, args, (0,))
    return rows


def self_checks(device, backends, dtypes) -> list[dict]:
    """fastkd.ops.select.check, exactly as a run does it before first use, on every dtype and on the
    mixed pairs runs produce (a float32 ZeRO student against its bf16 teacher, and the reverse)."""
    import torch

    from fastkd.ops import select

    pairs = [(dt, dt) for dt in dtypes] + [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
    return [{"op": op, "backend": b, "dtype": select.dtype_label(s, t),
             "result": select.check(op, b, device, s, t) or "passed"}
            for op in ("attention_mse", "attention_kl", "hidden_mse") for b in backends for s, t in pairs]


# --- 2. and 3. speed -------------------------------------------------------------------------------

def bench(seq_lens=(128, 512), quick: bool = False) -> list[dict]:
    """`fastkd bench` at each S, float32 and bf16, every backend present (torch is the reference) and auto."""
    import torch

    from fastkd.bench import run_bench
    from fastkd.config import BenchConfig

    teacher = "default"
    try:
        from fastkd.models import load_config

        load_config(teacher, "teacher")
    except Exception as exc:  # e.g. an offline machine without the default teacher's package
        teacher = _stand_in_teacher()
        print(f"gpu-check: the default teacher is not loadable ({type(exc).__name__}); benchmarking a randomly "
              f"initialised model of its shape instead: {teacher}", flush=True)
    results = []
    for S in seq_lens:
        for bf16 in (False, True):
            cfg = BenchConfig(teacher=teacher, seq_len=S, bf16=bf16, batch_size=32 if S <= 128 else 16,
                              steps=3 if quick else 10, warmup=1 if quick else 3)
            result = run_bench(cfg)
            for row in result["rows"]:
                results.append({"seq_len": S, "mode": "bf16" if bf16 else "fp32", "batch": cfg.batch_size, **row})
            torch.cuda.empty_cache()
    return results


def _stand_in_teacher() -> str:
    """all-MiniLM-L6-v2's shape (6 layers, 384 wide, 12 heads, BERT vocabulary) with random weights, for
    timing on a machine that cannot install the real one. Speed does not depend on the weights."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = REPO / "runs" / "gpu_check_teacher"
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        vocab = path / "vocab.txt"
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30517)]
        vocab.write_text("\n".join(words) + "\n")
        BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
        config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512)
        BertModel(config).save_pretrained(path)
    return str(path)


def loss_kernels(name: str, quick: bool) -> Path:
    cmd = [sys.executable, str(HERE / "loss_kernels.py"), "--backends", "torch,triton,cuda",
           "--dtypes", "float32,bfloat16", "--seq-lens", "128,512" if quick else "128,512,1024",
           "--head-dims", "64" if quick else "32,64", "--reps", "3" if quick else "5", "--name", name]
    subprocess.run(cmd, check=True)
    return HERE / "results" / f"{name}.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", action="store_true", help="exit 0 when a GPU is usable, else print why and exit 1")
    p.add_argument("--quick", action="store_true", help="fewer shapes and steps (about 3 minutes)")
    p.add_argument("--skip-bench", action="store_true", help="correctness and self-check only")
    p.add_argument("--require-gpu", action="store_true",
                   help="a GPU was found (make gpu-check probed the driver): fail, never skip, if torch cannot use it")
    args = p.parse_args()
    why = gpu_absent_reason(probe=args.probe)
    if why is not None:
        if args.require_gpu:
            reason = why.replace("no NVIDIA GPU here (", "").rstrip(")")
            print(f"gpu-check: the driver lists a GPU but the venv's torch cannot use it ({reason}): install a CUDA "
                  "build (rm .venv/.installed; make gpu-check TORCH_SPEC='torch==2.13.0 --index-url "
                  "https://download.pytorch.org/whl/cu130', say)")
            return 2
        print(f"gpu-check: {why}; nothing to check (run it on a machine with an NVIDIA GPU)")
        return 1 if args.probe else 0
    if args.probe:
        return 0

    import torch

    from _common import machine, write_result
    from fastkd.ops import backends as ops_backends

    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    started = time.perf_counter()
    present = [b for b in ("triton", "cuda") if ops_backends.unavailable(b, device) is None]
    missing = {b: ops_backends.unavailable(b, device) for b in ("triton", "cuda") if b not in present}
    for b, reason in missing.items():
        print(f"gpu-check: backend {b} is missing: {reason}", flush=True)
    if not present:
        print("gpu-check: no fused backend is present on this GPU, so nothing can be checked", flush=True)
        return 1
    dtypes = (torch.float32, torch.bfloat16, torch.float16)  # float16: DeepSpeed fp16 engines
    seq_lens = (17, 128, 1024) if args.quick else (17, 128, 511, 1024)
    head_dims = (64, 128) if args.quick else (32, 64, 128)
    rows = correctness(device, present, dtypes, seq_lens, head_dims)
    checks = self_checks(device, present, dtypes)
    bad = [r for r in rows if not r["ok"]] + [c for c in checks if c["result"] != "passed"]
    print(f"gpu-check: {len(rows) - len([r for r in rows if not r['ok']])}/{len(rows)} correctness rows within "
          f"tolerance; self-checks: {sum(c['result'] == 'passed' for c in checks)}/{len(checks)} passed "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    for r in bad:
        print("  FAILED", json.dumps(r), flush=True)
    payload = {"gpu": gpu, "missing_backends": missing, "correctness": rows, "self_checks": checks}
    path = write_result(f"gpu_check_{slug}", payload)
    if not args.skip_bench:
        payload["bench"] = bench(quick=args.quick)
        path = write_result(f"gpu_check_{slug}", payload)
        payload["loss_kernels"] = str(loss_kernels(f"loss_kernels_{slug}", args.quick).relative_to(REPO))
        path = write_result(f"gpu_check_{slug}", payload)
        for r in payload["bench"]:
            picked = f" (picked {r['ran_on']})" if r["backend"] == "auto" else ""
            print(f"  bench S={r['seq_len']} {r['mode']} {r['backend']}{picked}: {r['seq_per_s']} seq/s, "
                  f"x{r.get('speedup_vs_torch')} vs torch, peak +{r['peak_extra_mib']} MiB", flush=True)
    payload["machine"] = machine()
    payload["seconds"] = round(time.perf_counter() - started, 1)
    path = write_result(f"gpu_check_{slug}", payload)
    print(f"gpu-check: wrote {path.relative_to(REPO)} in {payload['seconds']:.0f} s", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
