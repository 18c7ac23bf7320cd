"""Aggregating runs over seeds: mean, sample standard deviation, 95% confidence interval, ranks.

The interval is Student's t: `mean ± t(0.975, n − 1) · s / √n`, the usual choice for a handful of
seeds (it is wider than the normal 1.96 · s / √n, honestly so for n = 2 or 3). With one seed there
is no spread to estimate: std 0 and no interval (NaN half-width).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# two-sided 95% quantiles t(0.975, df) of Student's t for df = 1..30 (standard tables)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table for df ≤ 30, beyond it the Cornish–Fisher expansion (< 1e-3 off)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Summary:
    """One metric over seeds."""

    mean: float
    std: float  # sample standard deviation (n − 1); 0 for one value
    ci95: float  # half-width of the 95% interval; NaN for one value
    n: int

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def summarise(values: Sequence[float]) -> Summary:
    """Mean, sample std and 95% half-width of the finite values (NaN and missing are left out)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return Summary(math.nan, math.nan, math.nan, 0)
    if n == 1:
        return Summary(vals[0], 0.0, math.nan, 1)
    std = statistics.stdev(vals)
    return Summary(statistics.fmean(vals), std, t_quantile_975(n - 1) * std / math.sqrt(n), n)


def ranks(means: Mapping[str, float], *, higher_is_better: bool = True) -> dict[str, int]:
    """Competition ranks (1 = best; ties share the better rank; NaN ranks last)."""

    def key(name: str) -> float:
        value = means[name]
        if math.isnan(value):
            return math.inf
        return -value if higher_is_better else value

    ordered = sorted(means, key=key)
    out: dict[str, int] = {}
    for i, name in enumerate(ordered):
        previous = ordered[i - 1] if i else None
        tie = previous is not None and key(previous) == key(name)
        out[name] = out[previous] if tie else i + 1
    return out
