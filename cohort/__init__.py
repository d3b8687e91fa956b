"""cohort: a distributed cohort trainer for knowledge distillation on PyTorch and Ray."""

__version__ = "0.1.0"
