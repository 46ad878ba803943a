"""What every Triton kernel module shares on the host side: triton itself (or stand-ins), the device
check, the dot-operand rules.

Importing a kernel module never fails without triton: `triton.jit` is then a no-op decorator,
AVAILABLE is False, UNAVAILABLE_REASON says why in one line, and `require()` raises it before any
launch. Interpreter or compiler is decided by triton at decoration time, so TRITON_INTERPRET=1 must
be set before the first import of fastkd.kernels (tests/conftest.py does it on a CPU).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except Exception as exc:  # ImportError, or a broken install failing at import time
    AVAILABLE = False
    UNAVAILABLE_REASON: str | None = " ".join(f"triton is not importable: {type(exc).__name__}: {exc}".split())

    class _Missing:
        """Enough of `triton` / `triton.language` for the kernel modules to define their kernels."""

        constexpr = int  # only ever seen in (string) annotations

        @staticmethod
        def jit(fn=None, **_kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            raise RuntimeError(f"Triton kernels are unavailable: {UNAVAILABLE_REASON}")

    triton = tl = _Missing()

    class InterpretedFunction:  # noqa: D101  (nothing is ever an instance)
        pass
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = None

HALF = (torch.float16, torch.bfloat16)


def require() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"Triton kernels are unavailable: {UNAVAILABLE_REASON}")


def interpreted(kernel) -> bool:
    """Whether `kernel` (a @triton.jit function) runs under the CPU interpreter."""
    return isinstance(kernel, InterpretedFunction)


def check_device(is_interpreted: bool, *tensors: torch.Tensor) -> None:
    """All inputs on one device, and a GPU unless the kernels run under the interpreter."""
    dev = tensors[0].device
    if any(x.device != dev for x in tensors):
        raise ValueError("fastkd.kernels: all inputs of a Triton op must be on the same device")
    if dev.type != "cuda" and not is_interpreted:
        raise RuntimeError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton "
                           f"is imported, for the CPU interpreter); got {dev}")


def pow2_dim(d: int) -> int:
    """tl.dot wants every dimension >= 16 and tl.arange a power of two."""
    return max(16, triton.next_power_of_2(d))


def native_dot(dtype: torch.dtype, other: torch.dtype, is_interpreted: bool) -> bool:
    """Whether two operands of these dtypes go into tl.dot as they are (16-bit tensor cores, float32
    accumulation). The interpreter multiplies bfloat16 dot operands as raw integers (checked with
    triton 3.9), so there bfloat16 is upcast; float16 runs natively under the interpreter too, which
    is how the tests exercise the 16-bit code path on a CPU."""
    if dtype not in HALF or other != dtype:
        return False
    return not (is_interpreted and dtype == torch.bfloat16)


def fp32_dot_precision() -> str:
    """tl.dot's input_precision for float32 operands: TF32 exactly when torch allows it for matmuls
    (torch.backends.cuda.matmul.allow_tf32, i.e. torch.set_float32_matmul_precision('high')), as
    eager attention would then use it too; IEEE float32 otherwise."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
