"""One optimizer and schedule builder for every loop: AdamW with linear warmup then linear decay,
and one rule for what is not decayed (biases, norms, any parameter of fewer than 2 dimensions)."""

from __future__ import annotations

import torch
from transformers import get_linear_schedule_with_warmup


def param_groups(modules, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(modules, lr: float, weight_decay: float, fused: bool = False) -> torch.optim.AdamW:
    """fused: one kernel per group, and a non-finite step skipped on the device (found_inf)."""
    return torch.optim.AdamW(param_groups(modules, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-6,
                             fused=fused or None)


def warmup_then_linear(optimizer, warmup_fraction: float, total_steps: int):
    return get_linear_schedule_with_warmup(optimizer, int(warmup_fraction * total_steps), total_steps)
