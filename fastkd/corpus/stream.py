"""Token sequences -> a deterministic, resumable batch stream (and the corpus sample the search uses).

Packed sequences are drawn in a seeded permutation per epoch; unit corpora (sentences, lines) in
length-bucketed batches padded to their own longest. The state is one integer either way, so a
resume continues at the exact sequence.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from ..padding import pad_batch
from .build import corpus_layout, unit_lengths

log = logging.getLogger(__name__)

BUCKET_BATCHES = 64  # global batches whose sequences are length-sorted together (then the batches are shuffled)


def parse_sample(spec: str | float | int | None) -> float | int | None:
    """'5000' -> 5000 sequences (an integer is a count); '0.1', '1e-1', '1.0' -> a fraction in (0, 1]."""
    if spec is None or spec == "all":
        return None
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        count = int(spec)
        if count < 1:
            raise UserError(f"corpus sample {spec!r} must be at least 1 sequence")
        return count
    try:
        value = float(spec)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= 1):
        raise UserError(f"corpus sample {spec!r}: give a fraction in (0, 1] like 0.1, or a whole number of sequences like 5000")
    return value


def sample_indices(total: int, spec: float | int | None, seed: int) -> np.ndarray:
    """Deterministic sorted subset of range(total): a fraction or a count, chosen by seed."""
    if spec is None:
        return np.arange(total)
    k = max(1, round(total * spec)) if isinstance(spec, float) else spec
    if k > total:
        log.warning("corpus sample: asked for %d sequences, the corpus has %d; using all", k, total)
        k = total
    return np.sort(np.random.default_rng(seed).permutation(total)[:k])


def sample_corpus(dataset, spec, seed: int):
    spec = parse_sample(spec) if isinstance(spec, str) else spec
    if spec is None:
        return dataset
    return dataset.select(sample_indices(len(dataset), spec, seed))


@dataclass
class StreamState:
    batches_done: int = 0
    tokens_served: int = 0  # this rank's real (unpadded) tokens since the process started: a rate, not state


class BatchStream:
    """Endless deterministic batches: epoch e visits the sequences in order_e, a permutation of them.

    Position p of the global stream is sequence order_{p // n}[p % n]; global batch k covers
    positions [k*G, (k+1)*G) with G = batch_size * world_size, and rank r takes its own
    batch_size slice. So the state is one integer, and a resume continues at the exact sequence.

    Packed corpora: order_e = permutation(seed, e). Unit corpora (sentences, lines): that permutation
    cut into chunks of BUCKET_BATCHES global batches, each chunk sorted by length and its batches
    shuffled (the chunks aligned to the global batch boundaries), so a batch holds sentences of
    similar length, padded to its own longest.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        layout = corpus_layout(dataset)
        self.mode = layout["mode"]
        self.bucketed = self.mode != "packed"
        self.pad_id = layout.get("pad_id") or 0
        self.lengths = unit_lengths(dataset) if self.bucketed else None
        self.dataset = dataset if self.bucketed else dataset.with_format("torch")
        self.n = len(dataset)
        if self.n < batch_size * world_size:
            log.warning("the corpus holds %d sequence(s), fewer than one global batch (%d): every batch repeats "
                        "them; --corpus-sample N is a count of sequences (1.0 is the whole corpus)",
                        self.n, batch_size * world_size)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.state = StreamState()
        self._perm_epoch = -1
        self._perm = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._perm = self._bucket(perm, epoch) if self.bucketed else perm
            self._perm_epoch = epoch
        return self._perm

    def _bucket(self, perm: np.ndarray, epoch: int) -> np.ndarray:
        """`perm` with each chunk of BUCKET_BATCHES global batches sorted by length, its whole batches shuffled."""
        size = self.batch_size * self.world_size
        first = (-epoch * self.n) % size  # this epoch's positions before the first global batch boundary
        bounds = sorted({0, self.n, *range(first, self.n, size)})
        blocks = list(zip(bounds[:-1], bounds[1:]))
        rng = np.random.default_rng([self.seed, epoch, 1])
        out = perm.copy()
        for c in range(0, len(blocks), BUCKET_BATCHES):
            chunk = blocks[c:c + BUCKET_BATCHES]
            lo, hi = chunk[0][0], chunk[-1][1]
            rows = perm[lo:hi]
            rows = rows[np.argsort(self.lengths[rows], kind="stable")]
            pieces = np.split(rows, np.cumsum([b - a for a, b in chunk])[:-1])
            whole = [i for i, (a, b) in enumerate(chunk) if b - a == size]  # a part batch keeps its place
            for slot, src in zip(whole, rng.permutation(whole)):
                out[chunk[slot][0]:chunk[slot][1]] = pieces[src]
            for i, (a, b) in enumerate(chunk):
                if b - a != size:
                    out[a:b] = pieces[i]
        return out

    def indices(self, batch: int) -> list[int]:
        global_size = self.batch_size * self.world_size
        start = batch * global_size + self.rank * self.batch_size
        out = []
        for p in range(start, start + self.batch_size):
            out.append(int(self._permutation(p // self.n)[p % self.n]))
        return out

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The sequences at `indices` as one batch (unit corpora padded to their longest)."""
        if not self.bucketed:
            rows = self.dataset[indices]
            return {"input_ids": rows["input_ids"].long(), "attention_mask": rows["attention_mask"].long()}
        return pad_batch(self.dataset[indices]["input_ids"], self.pad_id)

    def take(self) -> tuple[list[int], dict[str, torch.Tensor]]:
        """The next batch and the corpus rows it holds (for a run that reads the teacher's labels of them)."""
        rows = self.indices(self.state.batches_done)
        batch = self.rows(rows)
        self.state.batches_done += 1
        # (host memory, before the engine moves it: counting its tokens never waits for a device)
        self.state.tokens_served += int(batch["attention_mask"].numpy().sum())
        return rows, batch

    def next(self) -> dict[str, torch.Tensor]:
        return self.take()[1]

    def typical_length(self) -> int:
        """The sequence length of a typical batch: a packed row's, or the median unit's (a length-bucketed
        batch pads to its own longest, which is close to its members')."""
        if not self.bucketed:
            return int(self.dataset[0]["input_ids"].shape[-1]) if self.n else 1
        return max(1, int(np.ceil(np.median(self.lengths)))) if self.n else 1

    def real_tokens(self) -> int:
        """Real (unpadded) tokens this rank has served since the process started."""
        return self.state.tokens_served

    def sample(self, count: int = 8) -> dict[str, torch.Tensor]:
        """The corpus's first `count` sequences, as a batch; the stream's position is left alone."""
        return self.rows(list(range(min(count, self.n))))

    def state_dict(self) -> dict:
        return {"batches_done": self.state.batches_done, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world_size, "corpus_mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        state = {"corpus_mode": "packed", **state}  # (checkpoints from before the unit modes)
        if state["corpus_mode"] != self.mode:
            raise UserError(f"cannot resume: the checkpoint's run read its corpus as {state['corpus_mode']}, this run as "
                            f"{self.mode}: give --corpus-mode {state['corpus_mode']}")
        for key in ("seed", "n", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise UserError(f"cannot resume: the checkpoint's data stream had {key}={state[key]}, this run has {getattr(self, key)}")
        self.state.batches_done = state["batches_done"]
