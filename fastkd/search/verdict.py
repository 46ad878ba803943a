"""The verdict: is the searched mapping better than `uniform` and `last`, and by how much?

Design: every mapping is evaluated on the same verdict seeds (common random numbers: the same
distillation batches, fine-tuning examples, batch order and head initialisation per seed), and
those seeds never took part in choosing the winner. The comparison is therefore paired: per seed,
d_k = fitness(winner, k) - fitness(reference, k), and the interval is Student's t on the d_k
(scipy.stats.t), mean ± t_{0.975, n-1} * sd / sqrt(n). Pairing removes the seed's shared part of
the noise (a lucky batch order helps both mappings); the t interval is exact for normal d_k and
honest for small n (its width grows fast below 4 seeds, as it should).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from scipy import stats

CONFIDENCE = 0.95
MIN_SD = 1e-9  # paired differences spread less than this are floating-point rounding, not a measurement


@dataclass(frozen=True)
class PairedInterval:
    n: int  # verdict seeds both mappings have
    mean: float  # mean paired difference (winner - reference)
    sd: float  # SD of the paired differences (nan for n < 2)
    half_width: float  # of the CONFIDENCE interval (nan for n < 2)
    confidence: float = CONFIDENCE
    method: str = "paired t"

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def measured(self) -> bool:
        """An interval worth a claim: at least 2 pairs and a non-zero spread (SD 0 means nothing was measured)."""
        return self.n >= 2 and math.isfinite(self.sd) and self.sd > MIN_SD

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def paired_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> PairedInterval:
    """t interval of mean(a - b) over pairs; a[k] and b[k] come from the same seed."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length ({len(a)} vs {len(b)})")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n == 0:
        return PairedInterval(0, math.nan, math.nan, math.nan, confidence)
    mean = statistics.fmean(d)
    if n < 2:
        return PairedInterval(n, mean, math.nan, math.nan, confidence)
    sd = statistics.stdev(d)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return PairedInterval(n, mean, sd, half, confidence)


def sentence(winner: str, reference_name: str, reference: str, iv: PairedInterval) -> str:
    """One plain sentence a user can act on."""
    pct = f"{100 * iv.confidence:.0f}%"
    if winner == reference:
        return f"The winner is `{reference_name}` ({reference}) itself."
    if iv.n < 2:
        return (f"Against `{reference_name}` ({reference}): {iv.n} verdict seed(s) in common, so no claim "
                "(an interval needs at least 2 held-out seeds: raise --verdict-seeds).")
    if not iv.measured:
        return (f"Against `{reference_name}` ({reference}): the {iv.n} paired differences are all {iv.mean:+.4f}, "
                "a spread of zero, so no interval and no claim.")
    body = f"{iv.mean:+.4f} ± {iv.half_width:.4f} ({pct}, paired t over {iv.n} held-out seeds)"
    if iv.low > 0:
        return f"Beats `{reference_name}` ({reference}) by {body}: `{winner}` is better."
    if iv.high < 0:
        return f"Loses to `{reference_name}` ({reference}) by {body}: keep `{reference_name}`."
    bound = max(abs(iv.low), abs(iv.high))
    return (f"`{reference_name}` ({reference}) is within ±{bound:.4f} of the winner (difference {body}): "
            f"keep `{reference_name}`, the simpler choice.")


def overall(winner: str, comparisons: list[tuple[str, str, PairedInterval]]) -> str:
    """One recommendation from the comparisons [(name, mapping, interval)], `uniform` first.

    The searched mapping is recommended only when it beats every *other* heuristic; otherwise the
    first one (`uniform`, the simpler choice) is kept. Each interval is 95%; k of them hold together
    with at least 1 - k x 5% (Bonferroni), which the line says.
    """
    if not comparisons:
        return "Overall: nothing to compare with."
    first = comparisons[0][0]
    same = next((name for name, mapping, _ in comparisons if mapping == winner), None)
    others = [(name, iv) for name, mapping, iv in comparisons if mapping != winner]
    if same == first or not others:
        return f"Overall: the search found `{same or first}` itself; keep `{same or first}`."
    label = f"`{winner}`" + (f" (= `{same}`)" if same else "")
    if all(iv.measured and iv.low > 0 for _, iv in others):
        together = f"; together at least {100 * (1 - len(others) * (1 - CONFIDENCE)):.0f}%" if len(others) > 1 else ""
        return f"Overall: use {label}: it beats {', '.join(f'`{n}`' for n, _ in others)} (each interval 95%{together})."
    return f"Overall: keep `{first}`: {label} is not shown to beat every other heuristic."
