"""One RNG policy for every loop (distill, ZeRO, the search's proxy, resume): what is captured and
restored, and how a run is seeded.

Captured: torch's CPU generator, the generator of the CUDA device the run computes on (only that
one: asking every device would open a CUDA context, hundreds of MiB, on each GPU a rank can see),
numpy's and Python's. A checkpoint holds exactly this, so 10 steps + resume + 10 steps equal 20
straight steps; the search swaps it around each candidate's step, so a candidate's result depends
only on (mapping, seed); a GLUE fine-tune runs `seeded` by its seed, so its result depends only on
(model, task, seed) and the caller's streams go on as if it had not run.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


def _cuda_device(device) -> torch.device | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None  # a CPU run, even on a GPU machine: no context is opened for it
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def capture(device=None) -> dict:
    cuda = _cuda_device(device)
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(cuda) if cuda is not None else None}


def restore(state: dict, device=None) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("python") is not None:
        random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, torch.Tensor):
            torch.cuda.set_rng_state(cuda, _cuda_device(device) or "cuda")
        else:  # single-process checkpoints before this policy held every device's
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def isolated(device=None):
    """Whatever runs inside draws from the global generators as it likes; the caller's state is
    restored afterwards (its streams go on as if the work had not run)."""
    outer = capture(device)
    try:
        yield
    finally:
        restore(outer, device)


@contextlib.contextmanager
def seeded(seed: int, device=None):
    """`isolated`, with every generator seeded by `seed` inside."""
    with isolated(device):
        seed_everything(seed)
        yield
