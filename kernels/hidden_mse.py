"""The hidden-state MSE on Triton (fastkd.ops.hidden_mse holds the op: formula, reference, extension,
dispatch): the projection's GEMMs by torch per chunk of rows, one elementwise kernel for the partial
sums of squares and G = 2 (P - ht) rowmask, written in place over P.
"""

from __future__ import annotations

import torch

from .runtime import check_device, interpreted, require, tl, triton


@triton.jit
def hidden_mse_kernel(
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


INTERPRETED = interpreted(hidden_mse_kernel)


def block_sizes(n_rows: int, D: int, block_r: int | None, block_c: int | None) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): an elementwise stream, ~2048 elements a tile, rows up to 256 wide."""
    bc = block_c or min(256, max(16, triton.next_power_of_2(D)))        # floors: tiny shapes just
    br = block_r or min(2048 // bc, max(2, triton.next_power_of_2(n_rows)))  # mask lanes off
    for blk in (br, bc):
        if blk & (blk - 1):
            raise ValueError(f"block sizes must be powers of two, got {blk}")
    return br, bc, 4


def run_kernel(p, ht, bias, mask8, g, *, block_r, block_c) -> torch.Tensor:
    """One launch over the rows of p (n, D); fills g unless None. Returns the per-program partial
    sums of squares (summed by the caller: deterministic, no float atomics)."""
    n, D = p.shape
    br, bc, num_warps = block_sizes(n, D, block_r, block_c)
    grid = triton.cdiv(n, br)
    partial = torch.empty(grid, device=p.device, dtype=torch.float32)
    hidden_mse_kernel[(grid,)](
        p, ht, bias if bias is not None else p, mask8, g if g is not None else partial, partial,
        n, D, p.stride(0), p.stride(1), ht.stride(0), ht.stride(1), g.stride(0) if g is not None else 0,
        HAS_BIAS=bias is not None, WRITE_GRAD=g is not None,
        BLOCK_R=br, BLOCK_C=bc, num_warps=num_warps)
    return partial


def launch(hs, ht, mask, weight, bias, *, grad_hs: bool, grad_w: bool, grad_b: bool,
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
    check_device(INTERPRETED, *(x for x in (hs, ht, mask, weight, bias) if x is not None))
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
        partial = run_kernel(hs2, ht2, bias, mask8, g, block_r=block_r, block_c=block_c)
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
        partials.append(run_kernel(p, ht2[r0:r1], None, mask8[r0:r1], p if need_g else None,
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


def scaled(buf: torch.Tensor | None, scale: torch.Tensor, like: tuple[torch.Size, torch.dtype] | None):
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
        loss, count, dhs, dw, db = launch(
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
        return (scaled(dhs, scale, like_hs), None, None, scaled(dw, scale, like_w),
                scaled(db, scale, like_b), None, None, None, None)


def triton_hidden_mse(hs, ht, mask, weight=None, bias=None, chunk_rows: int = 4096, *,
                      block_r: int | None = None, block_c: int | None = None) -> torch.Tensor:
    """The Triton op (tests pass small blocks for the elementwise kernel). Returns a float32 0-dim
    tensor; gradients for hs, weight and bias come back in their dtypes."""
    return TritonHiddenMse.apply(hs, ht, mask, weight, bias, int(chunk_rows), torch.is_grad_enabled(),
                                 block_r, block_c)
