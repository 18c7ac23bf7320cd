"""Regimes: where training sequences come from."""

from kdlab.regimes import (  # noqa: F401  (registers)
    adaptive,
    off_policy,
    on_policy,
    scrg,
    seq_kd,
    warmup_distill,
)
from kdlab.regimes.base import REGIMES, Regime, RegimeContext, describe_options

__all__ = ["REGIMES", "Regime", "RegimeContext", "describe_options"]
