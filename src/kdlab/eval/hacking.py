"""Teacher hacking ("On Teacher Hacking in LM Distillation", Tiapkin et al., 2025), from curves.

The student's distance to the teacher (proxy) and to the true distribution (golden) are
measured over training. Teacher hacking is the proxy still falling while the golden distance
rises: the student keeps getting closer to the teacher by moving away from the truth.

`detect_teacher_hacking` reads the two measured curves. Each is first smoothed by a running
median of three points (one outlying evaluation cannot flag a run). The golden curve's lowest
point is the candidate onset; the run is flagged when, from there to the end, golden rose by
more than `tolerance` (relative) and proxy fell by more than `tolerance`. Otherwise the verdict
names what the curves did instead (both falling: healthy; both rising: over-fitting, the student
also moves away from the teacher, which is not teacher hacking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HACKING = "teacher hacking"
BOTH_FALLING = "both falling"
BOTH_RISING = "both rising"
GOLDEN_RISING = "golden rising, proxy flat"
GOLDEN_FLAT = "golden flat"
PROXY_RISING = "golden falling, proxy rising"
PROXY_FLAT = "golden falling, proxy flat"


@dataclass(frozen=True)
class HackingVerdict:
    """What the proxy and golden curves did.

    Attributes:
        flagged: proxy fell while golden rose (teacher hacking).
        pattern: one of the module's pattern names (`HACKING`, `BOTH_FALLING`, ...).
        onset: the step where golden was lowest, when golden rose afterwards; else `None`.
        proxy_change: relative change of the smoothed proxy over the window judged (from the
            onset to the end when golden rose, else from the first to the last point).
        golden_change: the same for golden.
    """

    flagged: bool
    pattern: str
    onset: int | None
    proxy_change: float
    golden_change: float

    def describe(self) -> str:
        """One sentence for a report."""
        changes = f"proxy {self.proxy_change:+.1%}, golden {self.golden_change:+.1%}"
        if self.flagged:
            return f"teacher hacking from step {self.onset}: {changes} since then"
        if self.onset is not None:
            return f"no teacher hacking ({self.pattern} from step {self.onset}: {changes})"
        return f"no teacher hacking ({self.pattern}: {changes} over the run)"


def detect_teacher_hacking(
    steps: Sequence[int],
    proxy: Sequence[float],
    golden: Sequence[float],
    *,
    tolerance: float = 0.02,
) -> HackingVerdict:
    """Judge measured proxy and golden curves (same steps); see the module docstring.

    Args:
        steps: increasing training steps of the evaluations (at least 3).
        proxy: distance to the teacher at those steps (e.g. KL(teacher‖student), held out).
        golden: distance to the true distribution at those steps (e.g. KL(true‖student)).
        tolerance: the smallest relative change counted as a rise or a fall.
    """
    if not len(steps) == len(proxy) == len(golden):
        raise ValueError(
            f"steps, proxy and golden must have the same length, got {len(steps)}, "
            f"{len(proxy)} and {len(golden)}"
        )
    if len(steps) < 3:
        raise ValueError(
            f"need at least 3 evaluations to judge a trend, got {len(steps)}; "
            "evaluate more often (eval.every)"
        )
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError("steps must be strictly increasing")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    p, g = running_median(proxy), running_median(golden)
    low = min(range(len(g)), key=g.__getitem__)
    golden_rise = _relative(g[low], g[-1])
    if low < len(g) - 1 and golden_rise > tolerance:
        proxy_change = _relative(p[low], p[-1])
        if proxy_change < -tolerance:
            pattern = HACKING
        elif proxy_change > tolerance:
            pattern = BOTH_RISING
        else:
            pattern = GOLDEN_RISING
        return HackingVerdict(pattern == HACKING, pattern, steps[low], proxy_change, golden_rise)
    proxy_change, golden_change = _relative(p[0], p[-1]), _relative(g[0], g[-1])
    if golden_change >= -tolerance:
        pattern = GOLDEN_FLAT
    elif proxy_change < -tolerance:
        pattern = BOTH_FALLING
    elif proxy_change > tolerance:
        pattern = PROXY_RISING
    else:
        pattern = PROXY_FLAT
    return HackingVerdict(False, pattern, None, proxy_change, golden_change)


def running_median(values: Sequence[float]) -> list[float]:
    """Median of each point and its two neighbours (the ends keep their own two-point mean)."""
    out = []
    for i in range(len(values)):
        window = sorted(values[max(i - 1, 0) : i + 2])
        n = len(window)
        out.append(window[n // 2] if n % 2 else (window[n // 2 - 1] + window[n // 2]) / 2)
    return out


def _relative(before: float, after: float) -> float:
    return (after - before) / abs(before) if before else after - before
