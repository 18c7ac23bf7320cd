"""Regimes: where training sequences come from."""

from kdlab.regimes import off_policy  # noqa: F401  (registers)
from kdlab.regimes.base import REGIMES, Regime, RegimeContext

__all__ = ["REGIMES", "Regime", "RegimeContext"]
