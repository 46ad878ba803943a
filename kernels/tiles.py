"""What the Q/K kernels (attention MSE, attention KL) share.

Device side, @triton.jit helpers: the block of query (or key) rows a program holds, with its sequence's
end; the head dimensions; a tile of one head's rows, and the student's and teacher's tiles together;
a score tile; a gradient accumulation. Host side: the launch preamble
(shapes checked, the per-sequence end of real tokens, the int8 mask, which operands go into tl.dot
as they are, block sizes, strides) and the one rounding of a float32 gradient into its input's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .runtime import check_device, fp32_dot_precision, native_dot, pow2_dim, require, tl, triton


# --- device side ----------------------------------------------------------------------------------

@triton.jit
def real_tokens(mask_ptr, b, S, offs):
    """(inside the sequence, a real token) for the positions `offs` of sequence b."""
    inside = offs < S
    return inside, tl.load(mask_ptr + b * S + offs, mask=inside, other=0) != 0


@triton.jit
def held_block(pid, pid_bh, H, S, mask_ptr, end_ptr, BLOCK: tl.constexpr):
    """The (batch, head) and the block of rows program `pid` holds: (b, h, offsets, inside, real,
    loop end). The loop over the other side stops at the last real token (right-padded batches skip
    their padded tail); a block wholly past it has no valid pair: zero iterations."""
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inside, real = real_tokens(mask_ptr, b, S, offs)
    end = tl.load(end_ptr + b)
    end = tl.where(pid * BLOCK < end, end, 0)
    return b, h, offs, inside, real, end


@triton.jit
def load_rows(base, offs, inside, offs_d, d_in, stride_s, stride_d):
    """The (rows, BLOCK_D) tile of one head's (S, d) matrix at `base`; zeros outside."""
    return tl.load(base + offs[:, None] * stride_s + offs_d[None, :] * stride_d,
                   mask=inside[:, None] & d_in[None, :], other=0.0)


@triton.jit
def head_dims(DS, DT, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    """Offsets and masks of the student's (DS) and the teacher's (DT) head dimension."""
    offs_ds = tl.arange(0, BLOCK_DS)
    offs_dt = tl.arange(0, BLOCK_DT)
    return offs_ds, offs_ds < DS, offs_dt, offs_dt < DT


@triton.jit
def pair_tiles(s_base, t_base, offs, inside, offs_ds, ds_in, offs_dt, dt_in, ss_s, ss_d, st_s, st_d):
    """The student's and the teacher's tiles of rows `offs` of one head (both models' Q, or both K)."""
    return (load_rows(s_base, offs, inside, offs_ds, ds_in, ss_s, ss_d),
            load_rows(t_base, offs, inside, offs_dt, dt_in, st_s, st_d))


@triton.jit
def as_operand(x, NATIVE: tl.constexpr):
    """A tile held across the loop: as loaded where tl.dot takes it natively, else float32 once."""
    if not NATIVE:
        x = x.to(tl.float32)
    return x


@triton.jit
def held_tiles(s_base, t_base, offs, inside, offs_ds, ds_in, offs_dt, dt_in, ss_s, ss_d, st_s, st_d,
               NATIVE_S: tl.constexpr, NATIVE_T: tl.constexpr):
    """The pair of tiles a program holds across its loop, each in the form its dots take (as_operand)."""
    xs, xt = pair_tiles(s_base, t_base, offs, inside, offs_ds, ds_in, offs_dt, dt_in, ss_s, ss_d, st_s, st_d)
    return as_operand(xs, NATIVE_S), as_operand(xt, NATIVE_T)


@triton.jit
def scores(a, b, scale, NATIVE: tl.constexpr, PRECISION: tl.constexpr):
    """scale * a b^T in float32, each model's scores as the reference computes them: 16-bit operands
    straight into tl.dot (tensor cores, float32 accumulation) when NATIVE, float32 dots otherwise."""
    if NATIVE:
        out = tl.dot(a, tl.trans(b))
    else:
        out = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision=PRECISION)
    return out * scale


@triton.jit
def accumulate(acc, g, x, NATIVE: tl.constexpr, PRECISION: tl.constexpr):
    """acc + g x: g rounded to x's 16-bit dtype to meet it in a tensor-core dot when NATIVE (the one
    extra rounding of the 16-bit gradients), float32 otherwise."""
    if NATIVE:
        acc += tl.dot(g.to(x.dtype), x)
    else:
        acc += tl.dot(g, x.to(tl.float32), input_precision=PRECISION)
    return acc


# --- host side ------------------------------------------------------------------------------------

def block_sizes(S: int, bds: int, bdt: int, elt_bytes: int, block_m: int | None,
                block_n: int | None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the GPU (untuned guesses, see below).

    Each loop step streams one (BLOCK, bds + bdt) tile of K (rows kernel) or Q (cols kernel) and holds
    one of Q (K); capping a tile at 32 KiB keeps 2 pipeline stages plus the held tile well inside the
    shared memory of sm_80 (164 KiB) and sm_90 (228 KiB): 64 for 16-bit head dims up to 128 or fp32
    up to 64, 32 for fp32 at 128. Never more than S rounded up (16 at least, for tl.dot).
    """
    default = 64
    while default > 16 and default * (bds + bdt) * elt_bytes > 32 * 1024:
        default //= 2
    cap = pow2_dim(S)
    bm = block_m or min(default, cap)
    bn = block_n or min(default, cap)
    for blk in (bm, bn):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {blk}")
    # The fp32 dQ/dK accumulator (BLOCK x bds) and the D tile live in registers: more warps for
    # wide heads or fp32 operands (FMA dots) to stay clear of spills.
    num_warps = 4 if elt_bytes == 2 and max(bds, bdt) <= 64 else 8
    return bm, bn, num_warps, 2


@dataclass
class QKLaunch:
    """One Q/K op's launch, prepared: shapes, the real-token mask, and the kernels' common arguments."""

    B: int
    H: int
    S: int
    DS: int
    DT: int
    real: torch.Tensor            # (B, S) bool
    mask8: torch.Tensor | None    # (B, S) int8, contiguous (None when there is nothing to launch)
    end: torch.Tensor | None      # (B,) int32: 1 + index of the last real token (0: none)
    strides: tuple[int, ...]      # qs, ks, qt, kt: 4 strides each
    constexprs: dict              # BLOCK_M, BLOCK_N, BLOCK_DS, BLOCK_DT, NATIVE_S, NATIVE_T, PRECISION, warps, stages

    @property
    def empty(self) -> bool:
        return self.B * self.H * self.S == 0

    @property
    def grid_m(self) -> int:
        return triton.cdiv(self.S, self.constexprs["BLOCK_M"])

    @property
    def grid_n(self) -> int:
        return triton.cdiv(self.S, self.constexprs["BLOCK_N"])


def prepare_qk(qs, ks, qt, kt, mask, is_interpreted: bool, block_m: int | None, block_n: int | None) -> QKLaunch:
    """The preamble both Q/K ops run before a launch: triton present, shapes (qs, ks (B, H, S, ds);
    qt, kt (B, H, S, dt); mask (B, S)), the grid's y limit, one device, and the kernels' settings."""
    require()
    if qs.dim() != 4 or ks.shape != qs.shape:
        raise ValueError(f"qs, ks must both be (B, H, S, ds); got {tuple(qs.shape)}, {tuple(ks.shape)}")
    B, H, S, DS = qs.shape
    if qt.dim() != 4 or kt.shape != qt.shape or qt.shape[:3] != qs.shape[:3]:
        raise ValueError(f"qt, kt must both be (B, H, S, dt) with the student's B, H, S; "
                         f"got {tuple(qt.shape)}, {tuple(kt.shape)}")
    DT = qt.shape[-1]
    if mask.shape != (B, S):
        raise ValueError(f"mask must be (B, S) = {(B, S)}; got {tuple(mask.shape)}")
    if B * H > 65535:
        raise ValueError(f"B * H = {B * H} exceeds the CUDA grid's y limit (65535); split the batch")
    check_device(is_interpreted, qs, ks, qt, kt, mask)
    real = mask.bool()
    mask8 = end = None
    if B * H * S:
        positions = torch.arange(1, S + 1, device=qs.device, dtype=torch.int32)
        end = (real.to(torch.int32) * positions).amax(1).to(torch.int32)
        mask8 = real.to(torch.int8).contiguous()
    native_s = native_dot(qs.dtype, ks.dtype, is_interpreted)
    native_t = native_dot(qt.dtype, kt.dtype, is_interpreted)
    bds, bdt = pow2_dim(DS), pow2_dim(DT)
    bm, bn, num_warps, num_stages = block_sizes(S, bds, bdt, 2 if native_s and native_t else 4, block_m, block_n)
    return QKLaunch(B, H, S, DS, DT, real, mask8, end, (*qs.stride(), *ks.stride(), *qt.stride(), *kt.stride()),
                    dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_DS=bds, BLOCK_DT=bdt, NATIVE_S=native_s, NATIVE_T=native_t,
                         PRECISION=fp32_dot_precision(), num_warps=num_warps, num_stages=num_stages))


def scale_grad(buf: torch.Tensor | None, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """buf * scale computed in fp32 and rounded once into `dtype` (no fp32 temporary for 16-bit)."""
    if buf is None:
        return None
    out = torch.empty(buf.shape, device=buf.device, dtype=dtype)
    return torch.mul(buf, scale, out=out)
