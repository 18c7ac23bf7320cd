"""kdlab: knowledge distillation of language models."""

__version__ = "0.4.0"
