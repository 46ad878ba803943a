"""Hidden-state MSE (TinyBERT's hidden and embedding terms) through a learned width projection.

    hs: (B, S, Ds) student (differentiable); ht: (B, S, Dt) teacher; mask (B, S)
    weight: (Dt, Ds) or None (identity, Ds == Dt); bias: (Dt,) or None
    P     = hs @ weight^T + bias
    loss  = sum_{real tokens, Dt dims} (P - ht)^2 / max(n_real * Dt, 1)

One module per op: the torch reference, the binding of the compiled extension (cpp, cuda), the
dispatch and the self-check's cases; the Triton kernel and its autograd Function are in
kernels/hidden_mse.py (fastkd.kernels).

The fused backends go by chunks of rows (B*S flattened), so the full (B*S, Dt) projection never
exists (Liger-Kernel's fused-linear scheme):
  P = hs_c @ W^T + b                  a GEMM (cuBLAS on a GPU), float32
  one elementwise pass over P, ht_c:  partial sums of squares, P overwritten in place by
                                      G = 2 (P - ht) rowmask (unscaled by the count)
  dhs_c = G @ W;  dW += G^T hs_c;  db += G.sum(0)
All gradients are produced in the forward (when needed) and kept in float32; backward only
multiplies by grad_output / count and casts to the parameters' dtypes. Math is float32 throughout,
like the reference: the GEMMs follow torch's own float32 matmul settings (TF32 only if
torch.backends.cuda.matmul.allow_tf32). The GEMMs are not the op's cost (the elementwise pass
and memory are), so no 16-bit path is taken here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..kernels.hidden_mse import triton_hidden_mse
from . import _extension as ext

NAME = "hidden_mse"
FUSED = ("cpp", "triton", "cuda")
CHUNK_ROWS = 4096  # rows of the projected hidden state alive at once (12 MiB at 768 wide)


# --- the torch reference ---------------------------------------------------------------------

def reference(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor,
              projection: nn.Module | None = None) -> torch.Tensor:
    """Mean over real tokens and teacher dims of (proj(h_s) - h_t)^2. Hidden: (B, S, D)."""
    hs = student_hidden.float()
    if isinstance(projection, nn.Linear):
        # In float32 whatever the weights' dtype (DeepSpeed bf16 keeps 16-bit weights, with no autocast).
        bias = None if projection.bias is None else projection.bias.float()
        hs = torch.nn.functional.linear(hs, projection.weight.float(), bias)
    elif projection is not None:  # any other map (tests, custom heads)
        hs = projection(hs)
    mask = attention_mask.bool()[..., None]
    diff = torch.where(mask, hs - teacher_hidden.float(), torch.zeros((), device=hs.device))
    count = mask.sum() * teacher_hidden.shape[-1]
    return diff.pow(2).sum() / count.clamp(min=1)


# --- the compiled extension (cpp, cuda) -----------------------------------------------------------

class ExtensionHiddenMse(torch.autograd.Function):
    @staticmethod
    def run(hs, ht, row_mask, weight, bias, chunk_rows, need_grad):
        w = ext.f32(weight) if weight is not None else ext.empty_like_f32(hs)
        b = ext.f32(bias) if bias is not None else ext.empty_like_f32(hs)
        with ext.no_autocast(hs.device):
            loss_sum, dhs, dw, db = ext.module_for(hs.device).projected_mse(
                ext.f32(hs), ext.f32(ht), row_mask.bool().contiguous(), w, b, need_grad, int(chunk_rows))
        return loss_sum, dhs, dw if weight is not None else None, db if bias is not None else None

    @staticmethod
    def forward(ctx, hs, ht, row_mask, weight, bias, count: torch.Tensor, chunk_rows: int, grad: bool):
        need_grad = grad and any(ctx.needs_input_grad[i] for i in (0, 3, 4))
        loss_sum, *grads = ExtensionHiddenMse.run(hs, ht, row_mask, weight, bias, chunk_rows, need_grad)
        ctx.count, ctx.chunk_rows, ctx.grads = count, chunk_rows, grads if need_grad else None
        ctx.save_for_backward(hs, ht, row_mask, weight, bias)
        return loss_sum / count

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients are not themselves differentiable
    def backward(ctx, grad_out):
        hs, ht, row_mask, weight, bias = ctx.saved_tensors
        dhs, dw, db = ext.hand_over(
            ctx, lambda: ExtensionHiddenMse.run(hs, ht, row_mask, weight, bias, ctx.chunk_rows, True)[1:])
        scale = grad_out / ctx.count
        return (ext.scaled(dhs, scale, hs.dtype), None, None,
                ext.scaled(dw, scale, None if weight is None else weight.dtype),
                ext.scaled(db, scale, None if bias is None else bias.dtype), None, None, None)


# --- dispatch -------------------------------------------------------------------------------------

def hidden_mse(hs, ht, mask, projection, backend: str) -> torch.Tensor:
    """reference(hs, ht, mask, projection) on `backend`, never holding proj(hs) whole on the fused ones.
    projection: an nn.Linear (student -> teacher width) or None (identity)."""
    if backend == "torch":
        return reference(hs, ht, mask, projection)
    weight = None if projection is None else projection.weight
    bias = None if projection is None else projection.bias
    if backend == "triton":
        return triton_hidden_mse(hs.contiguous(), ht.contiguous(), mask, weight, bias, chunk_rows=CHUNK_ROWS)
    if backend not in ("cpp", "cuda"):
        raise ValueError(f"{NAME}: unknown backend {backend!r}")
    Ds, Dt = hs.shape[-1], ht.shape[-1]
    rows = mask.reshape(-1)
    count = (rows.to(torch.float32).sum() * Dt).clamp(min=1.0)
    return ExtensionHiddenMse.apply(hs.reshape(-1, Ds), ht.reshape(-1, Dt), rows, weight, bias, count, CHUNK_ROWS,
                                    torch.is_grad_enabled())


# --- self-check -------------------------------------------------------------------------------------

def self_check_cases(device: torch.device, dtype: torch.dtype, teacher_dtype: torch.dtype, gen: torch.Generator):
    """Small random padded inputs (an odd length, a padded row, an all-padded row; 249 rows, so
    several chunks under self_check_settings), with a width projection (with a bias, as fastkd builds
    them) and without (equal widths). Each case: (args for hidden_mse without the backend, indices of
    the differentiable inputs; the projection's parameters count too)."""
    B, S, ds, dt = 3, 83, 48, 80
    lengths = torch.tensor([S, 37, 0])
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long().to(device)
    hidden = lambda d, t: torch.randn(B, S, d, generator=gen).to(device, t)  # noqa: E731
    # No draw from the global RNG; 16-bit weights when the inputs are (DeepSpeed keeps them so).
    projection = torch.nn.utils.skip_init(nn.Linear, ds, dt, device=device,
                                          dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(dt, ds, generator=gen) * ds ** -0.5)
        projection.bias.copy_(torch.randn(dt, generator=gen))
    return [((hidden(ds, dtype), hidden(dt, teacher_dtype), mask, projection), (0,)),
            ((hidden(dt, dtype), hidden(dt, teacher_dtype), mask, None), (0,))]


@contextlib.contextmanager
def self_check_settings():
    """Chunks of 64 rows during the check, so the chunk loop (and its remainder) is checked too."""
    global CHUNK_ROWS
    old, CHUNK_ROWS = CHUNK_ROWS, 64
    try:
        yield
    finally:
        CHUNK_ROWS = old
