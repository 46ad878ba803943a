"""Hidden-state MSE (TinyBERT's hidden and embedding terms) through a learned width projection.

    hs: (B, S, Ds) student (differentiable); ht: (B, S, Dt) teacher; mask (B, S)
    weight: (Dt, Ds) or None (identity, Ds == Dt); bias: (Dt,) or None
    P     = hs @ weight^T + bias
    loss  = sum_{real tokens, Dt dims} (P - ht)^2 / max(n_real * Dt, 1)

One module per op: the torch reference, the Triton kernel and its autograd Function, the binding of
the compiled extension (cpp, cuda), the dispatch and the self-check's cases.

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

from . import _extension as ext
from ._triton import check_device, interpreted, require, tl, triton

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


# --- Triton -----------------------------------------------------------------------------------

@triton.jit
def _hidden_mse_kernel(
    p_ptr,                        # (n, D) P rows, float32 or (identity) hs's dtype
    ht_ptr,                       # (n, D) teacher rows, any float dtype
    bias_ptr,                     # (D,) added to P inside the kernel (identity + bias only)
    mask_ptr,                     # (n,) int8, nonzero = real token
    g_ptr,                        # (n, D) float32: 2 (P - ht) rowmask; may alias p_ptr (in place)
    partial_ptr,                  # (cdiv(n, BLOCK_R),) float32
    n_rows, D,
    sp_r, sp_c, sht_r, sht_c, sg_r,
    HAS_BIAS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)      # (BR,)
    row_in = offs_r < n_rows
    real = tl.load(mask_ptr + offs_r, mask=row_in, other=0) != 0
    rows = offs_r.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for start_c in range(0, D, BLOCK_C):
        offs_c = start_c + tl.arange(0, BLOCK_C)        # (BC,)
        col_in = offs_c < D
        use = real[:, None] & col_in[None, :]           # padded rows are not read
        p = tl.load(p_ptr + rows[:, None] * sp_r + offs_c[None, :] * sp_c, mask=use, other=0.0).to(tl.float32)
        if HAS_BIAS:
            p += tl.load(bias_ptr + offs_c, mask=col_in, other=0.0).to(tl.float32)[None, :]
        t = tl.load(ht_ptr + rows[:, None] * sht_r + offs_c[None, :] * sht_c, mask=use, other=0.0).to(tl.float32)
        d = tl.where(use, p - t, 0.0)
        acc += d * d
        if WRITE_GRAD:
            # Each element is read and written by this program only, so g may alias p.
            tl.store(g_ptr + rows[:, None] * sg_r + offs_c[None, :], 2.0 * d,
                     mask=row_in[:, None] & col_in[None, :])
    tl.store(partial_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


_INTERPRETED = interpreted(_hidden_mse_kernel)


def _block_sizes(n_rows: int, D: int, block_r: int | None, block_c: int | None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): an elementwise stream, ~2048 elements a tile, rows up to 256 wide."""
    bc = block_c or min(256, max(16, triton.next_power_of_2(D)))        # floors: tiny shapes just
    br = block_r or min(2048 // bc, max(2, triton.next_power_of_2(n_rows)))  # mask lanes off
    for blk in (br, bc):
        if blk & (blk - 1):
            raise ValueError(f"block sizes must be powers of two, got {blk}")
    return br, bc, 4


def _run_kernel(p, ht, bias, mask8, g, *, block_r, block_c) -> torch.Tensor:
    """One launch over the rows of p (n, D); fills g unless None. Returns the per-program partial
    sums of squares (summed by the caller: deterministic, no float atomics)."""
    n, D = p.shape
    br, bc, num_warps = _block_sizes(n, D, block_r, block_c)
    grid = triton.cdiv(n, br)
    partial = torch.empty(grid, device=p.device, dtype=torch.float32)
    _hidden_mse_kernel[(grid,)](
        p, ht, bias if bias is not None else p, mask8, g if g is not None else partial, partial,
        n, D, p.stride(0), p.stride(1), ht.stride(0), ht.stride(1), g.stride(0) if g is not None else 0,
        HAS_BIAS=bias is not None, WRITE_GRAD=g is not None,
        BLOCK_R=br, BLOCK_C=bc, num_warps=num_warps)
    return partial


def _hidden_mse_launch(hs, ht, mask, weight, bias, *, grad_hs: bool, grad_w: bool, grad_b: bool,
                       chunk_rows: int = 4096, block_r: int | None = None, block_c: int | None = None):
    """Returns (loss float32 0-dim, count float32 0-dim >= 1, dhs (B*S, Ds) | None, dW | None,
    db | None): float32 gradients still to be multiplied by grad_output / count."""
    if hs.dim() != 3 or ht.dim() != 3 or hs.shape[:2] != ht.shape[:2]:
        raise ValueError(f"hs, ht must be (B, S, Ds), (B, S, Dt); got {tuple(hs.shape)}, {tuple(ht.shape)}")
    B, S, Ds = hs.shape
    Dt = ht.shape[-1]
    if mask.shape != (B, S):
        raise ValueError(f"mask must be (B, S) = {(B, S)}; got {tuple(mask.shape)}")
    if weight is None and Ds != Dt:
        raise ValueError(f"weight None means identity, which needs Ds == Dt; got {Ds} != {Dt}")
    if weight is not None and weight.shape != (Dt, Ds):
        raise ValueError(f"weight must be (Dt, Ds) = {(Dt, Ds)}; got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (Dt,):
        raise ValueError(f"bias must be (Dt,) = {(Dt,)}; got {tuple(bias.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    require()
    check_device(_INTERPRETED, *(x for x in (hs, ht, mask, weight, bias) if x is not None))
    dev = hs.device

    N = B * S
    hs2, ht2 = hs.reshape(N, Ds), ht.reshape(N, Dt)
    real = mask.reshape(N).bool()
    mask8 = real.to(torch.int8).contiguous()
    count = real.sum().mul(Dt).clamp(min=1).to(torch.float32)
    dhs = torch.empty((N, Ds), device=dev, dtype=torch.float32) if grad_hs else None
    dw = torch.zeros((Dt, Ds), device=dev, dtype=torch.float32) if grad_w and weight is not None else None
    db = torch.zeros((Dt,), device=dev, dtype=torch.float32) if grad_b and bias is not None else None
    if N == 0 or Dt == 0:
        zero = torch.zeros((), device=dev, dtype=torch.float32)
        return zero, count, None if dhs is None else dhs.zero_(), dw, db

    if weight is None:
        # Identity: nothing to bound, one launch over all rows straight from hs; G is dhs itself.
        g = dhs if grad_hs else (torch.empty((N, Dt), device=dev, dtype=torch.float32) if db is not None else None)
        partial = _run_kernel(hs2, ht2, bias, mask8, g, block_r=block_r, block_c=block_c)
        if db is not None:
            db += g.sum(0)
        return partial.sum() / count, count, dhs, dw, db

    w = weight.float()                                                      # (Dt, Ds), no copy if fp32
    b = bias.float() if bias is not None else None
    need_g = dhs is not None or dw is not None or db is not None
    partials = []
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        hs_c = hs2[r0:r1].float()                                           # (n, Ds)
        p = torch.addmm(b, hs_c, w.t()) if b is not None else torch.mm(hs_c, w.t())   # (n, Dt) fp32
        partials.append(_run_kernel(p, ht2[r0:r1], None, mask8[r0:r1], p if need_g else None,
                                    block_r=block_r, block_c=block_c))
        if not need_g:
            continue
        g = p                                                               # now G, (n, Dt)
        if dhs is not None:
            torch.mm(g, w, out=dhs[r0:r1])                                  # (n, Ds)
        if dw is not None:
            dw.addmm_(g.t(), hs_c)                                          # (Dt, Ds)
        if db is not None:
            db += g.sum(0)
    return torch.cat(partials).sum() / count, count, dhs, dw, db


def _scaled(buf: torch.Tensor | None, scale: torch.Tensor, like: tuple[torch.Size, torch.dtype] | None):
    """buf * scale in fp32, rounded once into the (shape, dtype) of the input it is the gradient of."""
    if buf is None:
        return None
    shape, dtype = like
    out = torch.empty(shape, device=buf.device, dtype=dtype)
    torch.mul(buf.view(shape), scale, out=out)
    return out


class TritonHiddenMse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ht, mask, weight, bias, chunk_rows, grad_enabled, block_r, block_c):
        need = ctx.needs_input_grad
        loss, count, dhs, dw, db = _hidden_mse_launch(
            hs, ht, mask, weight, bias, grad_hs=grad_enabled and need[0], grad_w=grad_enabled and need[3],
            grad_b=grad_enabled and need[4], chunk_rows=chunk_rows, block_r=block_r, block_c=block_c)
        ctx.save_for_backward(count, dhs, dw, db)
        # Only shapes/dtypes are needed to cast the grads back, not the tensors themselves.
        ctx.likes = tuple((x.shape, x.dtype) if x is not None else None for x in (hs, weight, bias))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable  # the gradients are not themselves differentiable
    def backward(ctx, grad_output):
        count, dhs, dw, db = ctx.saved_tensors
        scale = grad_output.float() / count
        like_hs, like_w, like_b = ctx.likes
        return (_scaled(dhs, scale, like_hs), None, None, _scaled(dw, scale, like_w),
                _scaled(db, scale, like_b), None, None, None, None)


def triton_hidden_mse(hs, ht, mask, weight=None, bias=None, chunk_rows: int = CHUNK_ROWS, *,
                      block_r: int | None = None, block_c: int | None = None) -> torch.Tensor:
    """The Triton op (tests pass small blocks for the elementwise kernel). Returns a float32 0-dim
    tensor; gradients for hs, weight and bias come back in their dtypes."""
    return TritonHiddenMse.apply(hs, ht, mask, weight, bias, int(chunk_rows), torch.is_grad_enabled(),
                                 block_r, block_c)


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
