"""Layer mappings: which teacher layer supervises each student layer.

Pure Python (no torch) so the search's GA can use it cheaply.

A mapping for a student with M layers and a teacher with N layers is a tuple g of length M;
g[m-1] in 1..N means student layer m learns teacher hidden state h_{g} and attention A_{g};
None means student layer m gets no layer supervision. Text form: "3,6,9,12", "-" for None.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .errors import UserError

HEURISTICS = ("uniform", "last", "first")


@dataclass(frozen=True)
class LayerMapping:
    layers: tuple[int | None, ...]  # length M, 1-based teacher layers or None
    teacher_layers: int  # N

    def __post_init__(self):
        if not self.layers:
            raise UserError("layer mapping is empty: give one teacher layer per student layer")
        for m, g in enumerate(self.layers, start=1):
            if g is not None and not 1 <= g <= self.teacher_layers:
                raise UserError(
                    f"layer mapping {self.text!r}: student layer {m} maps to teacher layer {g}, "
                    f"but the teacher has layers 1..{self.teacher_layers}"
                )

    @property
    def student_layers(self) -> int:
        return len(self.layers)

    @property
    def text(self) -> str:
        return ",".join("-" if g is None else str(g) for g in self.layers)

    def pairs(self) -> list[tuple[int, int]]:
        """(student layer, teacher layer) for every supervised student layer, 1-based."""
        return [(m, g) for m, g in enumerate(self.layers, start=1) if g is not None]

    def is_monotone(self) -> bool:
        chosen = [g for g in self.layers if g is not None]
        return all(a <= b for a, b in zip(chosen, chosen[1:]))

    def __str__(self) -> str:
        return self.text


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def heuristic(name: str, student_layers: int, teacher_layers: int, seed: int = 0,
              monotone: bool = False) -> LayerMapping:
    """The named mappings: uniform (round(m*N/M)), last (N-M+m), first (m), random (seeded)."""
    M, N = student_layers, teacher_layers
    if M < 1 or N < 1:
        raise UserError(f"need at least one student and one teacher layer (got M={M}, N={N})")
    clamp = lambda g: min(max(g, 1), N)  # noqa: E731  (a student deeper than its teacher)
    if name == "uniform":
        layers = [clamp(_round_half_up(m * N / M)) for m in range(1, M + 1)]
    elif name == "last":
        layers = [clamp(N - M + m) for m in range(1, M + 1)]
    elif name == "first":
        layers = [clamp(m) for m in range(1, M + 1)]
    elif name == "random":
        rng = random.Random(seed)
        layers = [rng.randint(1, N) for _ in range(M)]
        if monotone:
            layers.sort()
    else:
        raise UserError(f"unknown mapping heuristic {name!r}: use uniform, last, first or random:SEED")
    return LayerMapping(tuple(layers), N)


def parse_mapping(text: str, student_layers: int, teacher_layers: int) -> LayerMapping:
    """Parse "uniform" | "last" | "first" | "random:SEED" | "3,6,-,12"."""
    spec = text.strip()
    name, _, arg = spec.partition(":")
    if name in HEURISTICS and not arg:
        return heuristic(name, student_layers, teacher_layers)
    if name == "random":
        try:
            seed = int(arg)
        except ValueError:
            raise UserError(f"mapping {text!r}: random needs an integer seed, e.g. random:7") from None
        return heuristic("random", student_layers, teacher_layers, seed=seed)
    layers: list[int | None] = []
    for part in spec.split(","):
        part = part.strip()
        if part in ("-", "none", "None"):
            layers.append(None)
            continue
        try:
            layers.append(int(part))
        except ValueError:
            raise UserError(
                f"cannot parse mapping {text!r}: use comma-separated teacher layers like '2,4,6' "
                "('-' for no supervision) or one of uniform, last, first, random:SEED"
            ) from None
    if len(layers) != student_layers:
        raise UserError(
            f"mapping {text!r} has {len(layers)} entries but the student has {student_layers} "
            "layers: give exactly one teacher layer per student layer"
        )
    return LayerMapping(tuple(layers), teacher_layers)


def search_space_size(student_layers: int, teacher_layers: int, allow_none: bool = False,
                      monotone: bool = False) -> int:
    """Number of distinct mappings that supervise at least one layer: N^M, (N+1)^M - 1 with None,
    C(N+M-1, M) when non-decreasing.

    With monotone and None, the non-None entries must be non-decreasing: choose which k >= 1 positions
    are supervised, then a non-decreasing k-sequence over N layers.
    """
    M, N = student_layers, teacher_layers
    if not monotone:
        return (N + 1) ** M - 1 if allow_none else N ** M
    if not allow_none:
        return math.comb(N + M - 1, M)
    return sum(math.comb(M, k) * math.comb(N + k - 1, k) for k in range(1, M + 1))
