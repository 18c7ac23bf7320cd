"""Models: the tiny-model factory used by tests and the demo."""

from kdlab.models.tiny import PRESETS, build_preset, build_tiny_model

__all__ = ["PRESETS", "build_preset", "build_tiny_model"]
