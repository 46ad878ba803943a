"""Layer mappings: which teacher layer supervises each student layer.

Pure Python (no torch) so the search's GA can use it cheaply.

A mapping for a student with M layers and a teacher with N layers is a tuple g of length M;
g[m-1] in 1..N means student layer m learns teacher hidden state h_{g} and attention A_{g};
None means student layer m gets no layer supervision. Text form: "3,6,9,12", "-" for None.

A mapping also says which teacher layer each student layer starts as a copy of (`initial_layers`).
By default that is the layer supervising it (the uniform mapping's layer for an unsupervised one);
`init` sets other layers apart from the supervision, as sentence-transformers' `layers_to_keep` does.
Text form: SUPERVISION@INIT, "4,5,6@2,4,6"; a mapping whose init is the default is written without it,
so each mapping has one text (the search's store key).
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
    init: tuple[int, ...] | None = None  # the teacher layers the student's layers are copied from; None: tied

    def __post_init__(self):
        if not self.layers:
            raise UserError("layer mapping is empty: give one teacher layer per student layer")
        for m, g in enumerate(self.layers, start=1):
            if g is not None and not 1 <= g <= self.teacher_layers:
                raise UserError(
                    f"layer mapping {_layers_text(self.layers)!r}: student layer {m} maps to teacher layer {g}, "
                    f"but the teacher has layers 1..{self.teacher_layers}"
                )
        if self.init is None:
            return
        init = tuple(self.init)
        if len(init) != len(self.layers):
            raise UserError(f"initial layers {_layers_text(init)!r} have {len(init)} entries but the student has "
                            f"{len(self.layers)} layers: give one teacher layer to copy per student layer")
        for m, g in enumerate(init, start=1):
            if g is None:
                raise UserError(f"initial layers {_layers_text(init)!r}: every student layer needs a teacher layer "
                                "to copy ('-' is for the supervising layers only)")
            if not 1 <= g <= self.teacher_layers:
                raise UserError(f"initial layers {_layers_text(init)!r}: student layer {m} copies teacher layer {g}, "
                                f"but the teacher has layers 1..{self.teacher_layers}")
        # the default init is not written: one mapping, one text (and one equality)
        object.__setattr__(self, "init", None if init == self._tied_init() else init)

    def _tied_init(self) -> tuple[int, ...]:
        fallback = heuristic("uniform", len(self.layers), self.teacher_layers).layers
        return tuple(u if g is None else g for g, u in zip(self.layers, fallback))

    @property
    def initial_layers(self) -> tuple[int, ...]:
        """The teacher layer each student layer starts as a copy of (1-based)."""
        return self.init if self.init is not None else self._tied_init()

    @property
    def student_layers(self) -> int:
        return len(self.layers)

    @property
    def text(self) -> str:
        return _layers_text(self.layers) + ("" if self.init is None else "@" + _layers_text(self.init))

    @property
    def supervision_text(self) -> str:
        return _layers_text(self.layers)

    def genome(self, with_init: bool) -> tuple:
        """The search's genome: the supervising layers, then (with_init) the initial layers."""
        return self.layers + (self.initial_layers if with_init else ())

    @classmethod
    def from_genome(cls, genome: tuple, student_layers: int, teacher_layers: int) -> "LayerMapping":
        """The inverse of genome(): M genes are tied, 2M genes carry the initial layers after the supervision."""
        if len(genome) == 2 * student_layers:
            return cls(tuple(genome[:student_layers]), teacher_layers, tuple(genome[student_layers:]))
        return cls(tuple(genome), teacher_layers)

    def pairs(self) -> list[tuple[int, int]]:
        """(student layer, teacher layer) for every supervised student layer, 1-based."""
        return [(m, g) for m, g in enumerate(self.layers, start=1) if g is not None]

    def is_monotone(self) -> bool:
        chosen = [g for g in self.layers if g is not None]
        return all(a <= b for a, b in zip(chosen, chosen[1:]))

    def __str__(self) -> str:
        return self.text


def _layers_text(layers) -> str:
    return ",".join("-" if g is None else str(g) for g in layers)


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
    """Parse "uniform" | "last" | "first" | "random:SEED" | "3,6,-,12", each optionally followed by
    "@INIT", the initial layers in the same forms ("4,5,6@2,4,6", "last@uniform")."""
    supervision, at, init = text.partition("@")
    mapping = _parse_layers(supervision, student_layers, teacher_layers)
    if not at:
        return mapping
    try:
        initial = _parse_layers(init, student_layers, teacher_layers)
    except UserError as exc:
        raise UserError(f"mapping {text!r}, after '@' (the initial layers): {exc}") from None
    if None in initial.layers:
        raise UserError(f"mapping {text!r}: every student layer needs a teacher layer to copy after '@' ('-' is for "
                        "the supervising layers, before it)")
    return LayerMapping(mapping.layers, teacher_layers, initial.layers)


def _parse_layers(text: str, student_layers: int, teacher_layers: int) -> LayerMapping:
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
                      monotone: bool = False, with_init: bool = False) -> int:
    """Number of distinct mappings that supervise at least one layer: N^M, (N+1)^M - 1 with None,
    C(N+M-1, M) when non-decreasing.

    With monotone and None, the non-None entries must be non-decreasing: choose which k >= 1 positions
    are supervised, then a non-decreasing k-sequence over N layers. with_init: times the choices of
    initial layers (N^M, or C(N+M-1, M) non-decreasing), each a distinct mapping.
    """
    M, N = student_layers, teacher_layers
    init = (math.comb(N + M - 1, M) if monotone else N ** M) if with_init else 1
    if not monotone:
        return ((N + 1) ** M - 1 if allow_none else N ** M) * init
    if not allow_none:
        return math.comb(N + M - 1, M) * init
    return sum(math.comb(M, k) * math.comb(N + k - 1, k) for k in range(1, M + 1)) * init
