"""Fused distillation-loss kernels (Triton), imported as fastkd.kernels.

Three ops, each equal (value and gradients) to its plain-torch reference in fastkd.losses and
tested against it in tests/test_kernels_triton.py:

- attention_mse_qk(qs, ks, qt, kt, mask, scale_s, scale_t): attention-score MSE straight from the
  student's and teacher's Q and K, flash-attention style, never materialising an S x S tensor;
- attention_mse_scores(s, t, mask): the same loss from materialised (B, H, S, S) scores, loss and
  gradient in one pass;
- hidden_mse(hs, ht, mask, weight=None, bias=None, chunk_rows=4096): hidden-state MSE through a
  projection, chunked over rows so the full projection is never held.

All return a float32 0-dim mean loss; math is float32 and gradients come back in the inputs' dtypes.
They run on CUDA tensors, or on CPU under the Triton interpreter (TRITON_INTERPRET=1 set before
triton is imported). Importing this package never fails: without a usable triton, AVAILABLE is False,
UNAVAILABLE_REASON says why (one line) and the three functions raise RuntimeError.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except Exception as exc:  # ImportError, or a broken install failing at import time
    AVAILABLE = False
    UNAVAILABLE_REASON: str | None = " ".join(f"triton is not importable: {type(exc).__name__}: {exc}".split())
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = None

if AVAILABLE:
    from .attention_mse import attention_mse_qk
    from .hidden_mse import hidden_mse
    from .scores_mse import attention_mse_scores
else:
    def _unavailable(*_args, **_kwargs):
        raise RuntimeError(f"fastkd.kernels is unavailable: {UNAVAILABLE_REASON}")

    def attention_mse_qk(qs, ks, qt, kt, mask, scale_s, scale_t):
        """Unavailable without triton: raises RuntimeError with UNAVAILABLE_REASON."""
        _unavailable()

    def attention_mse_scores(s, t, mask):
        """Unavailable without triton: raises RuntimeError with UNAVAILABLE_REASON."""
        _unavailable()

    def hidden_mse(hs, ht, mask, weight=None, bias=None, chunk_rows=4096):
        """Unavailable without triton: raises RuntimeError with UNAVAILABLE_REASON."""
        _unavailable()

__all__ = ["AVAILABLE", "UNAVAILABLE_REASON", "attention_mse_qk", "attention_mse_scores", "hidden_mse"]
