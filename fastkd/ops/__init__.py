"""The distillation-loss ops, one module each (Liger-Kernel's layout), behind one dispatch.

    attention_mse   TinyBERT's attention-score MSE from Q and K (never S x S on the fused backends)
    hidden_mse      the hidden-state MSE through a width projection (never the whole projection)
    attention_kl    MiniLM's attention-distribution KL and MiniLMv2's relations (cpp, triton; never S x S)

Each op module holds its torch reference, the binding of the compiled extension (csrc/), its
dispatch over backends and its self-check cases; its Triton kernels and autograd Function are in
kernels/ (fastkd.kernels), one module per op. `backends`
says which backends are present on a device, `select` picks the one an op runs on after checking it
against the reference. fastkd.losses (DistillLoss) imports these; nothing here imports it.
"""

from . import attention_kl, attention_mse, hidden_mse, select
from .backends import BACKENDS, CHOICES, ENV, present_chain, resolve_backend, unavailable
from .select import backend_for, selections

__all__ = ["BACKENDS", "CHOICES", "ENV", "attention_kl", "attention_mse", "backend_for", "hidden_mse",
           "present_chain", "select", "resolve_backend", "selections", "unavailable"]
