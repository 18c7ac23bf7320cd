"""kdlab: knowledge distillation of language models."""

__version__ = "0.5.0"
