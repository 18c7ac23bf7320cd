"""The teacher-hacking detector on synthetic proxy/golden curves with known shapes."""

from __future__ import annotations

import math
import random

import pytest

from kdlab.eval.hacking import (
    BOTH_FALLING,
    BOTH_RISING,
    GOLDEN_FLAT,
    HACKING,
    detect_teacher_hacking,
    running_median,
)

STEPS = list(range(0, 420, 20))  # 21 evaluations


def _power_law(step: int, start: float, floor: float) -> float:
    """A polynomially converging distance, as a well-behaved training curve."""
    return floor + (start - floor) / math.sqrt(1 + step / 10)


def test_proxy_down_golden_up_is_flagged_at_the_golden_minimum():
    proxy = [_power_law(s, 2.0, 0.05) for s in STEPS]
    golden = [0.4 + 1e-6 * (s - 200) ** 2 for s in STEPS]  # lowest at step 200, then rising
    verdict = detect_teacher_hacking(STEPS, proxy, golden)
    assert verdict.flagged and verdict.pattern == HACKING
    # the running median flattens the minimum: the onset is found within one evaluation
    assert abs(verdict.onset - 200) <= 20
    assert verdict.golden_change > 0.05 and verdict.proxy_change < -0.05
    assert f"teacher hacking from step {verdict.onset}" in verdict.describe()


def test_both_falling_is_not_flagged():
    proxy = [_power_law(s, 2.0, 0.05) for s in STEPS]
    golden = [_power_law(s, 1.5, 0.3) for s in STEPS]
    verdict = detect_teacher_hacking(STEPS, proxy, golden)
    assert not verdict.flagged and verdict.pattern == BOTH_FALLING
    assert verdict.onset is None and verdict.golden_change < 0 and verdict.proxy_change < 0
    assert verdict.describe().startswith("no teacher hacking (both falling")


def test_both_rising_after_a_minimum_is_overfitting_not_hacking():
    """Held-out proxy and golden rise together: the student drifts from both; not flagged."""
    proxy = [0.2 + 1e-6 * (s - 160) ** 2 for s in STEPS]
    golden = [0.5 + 1e-6 * (s - 160) ** 2 for s in STEPS]
    verdict = detect_teacher_hacking(STEPS, proxy, golden)
    assert not verdict.flagged and verdict.pattern == BOTH_RISING
    assert abs(verdict.onset - 160) <= 20


def test_noise_and_a_single_outlier_do_not_change_the_verdict():
    rng = random.Random(0)
    proxy = [_power_law(s, 2.0, 0.05) * (1 + rng.uniform(-0.005, 0.005)) for s in STEPS]
    falling = [_power_law(s, 1.5, 0.3) * (1 + rng.uniform(-0.005, 0.005)) for s in STEPS]
    falling[-3] *= 1.5  # one bad evaluation near the end
    assert not detect_teacher_hacking(STEPS, proxy, falling).flagged
    rising = [0.4 + 1e-6 * (s - 200) ** 2 + rng.uniform(-0.002, 0.002) for s in STEPS]
    assert detect_teacher_hacking(STEPS, proxy, rising).flagged


def test_a_rise_within_the_tolerance_is_flat():
    proxy = [_power_law(s, 2.0, 0.05) for s in STEPS]
    golden = [0.4 + 1e-7 * (s - 200) ** 2 for s in STEPS]  # +1% at the end: below 2%
    verdict = detect_teacher_hacking(STEPS, proxy, golden)
    assert not verdict.flagged
    assert detect_teacher_hacking(STEPS, proxy, golden, tolerance=0.005).flagged
    flat = detect_teacher_hacking(STEPS, proxy, [0.4] * len(STEPS))
    assert not flat.flagged and flat.pattern == GOLDEN_FLAT


def test_running_median_by_hand():
    assert running_median([1.0, 9.0, 2.0, 3.0]) == [5.0, 2.0, 3.0, 2.5]


@pytest.mark.parametrize(
    ("steps", "proxy", "golden", "message"),
    [
        ([0, 1, 2], [1, 2], [1, 2, 3], "same length"),
        ([0, 1], [1, 2], [1, 2], "at least 3"),
        ([0, 2, 1], [1, 2, 3], [1, 2, 3], "increasing"),
    ],
)
def test_bad_curves_are_refused(steps, proxy, golden, message):
    with pytest.raises(ValueError, match=message):
        detect_teacher_hacking(steps, proxy, golden)
