"""Fused distillation-loss kernels (Triton), imported as fastkd.kernels.

The reference implementations live in fastkd.losses; fused backends are added here behind the same
DistillLoss interface (issue 5) and are tested against that reference.
"""
