"""Regimes: where training sequences come from."""

from kdlab.regimes import off_policy, on_policy, scrg  # noqa: F401  (registers)
from kdlab.regimes.base import REGIMES, Regime, RegimeContext, describe_options

__all__ = ["REGIMES", "Regime", "RegimeContext", "describe_options"]
