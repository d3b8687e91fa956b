"""Classifiers for CIFAR-sized inputs and the ONE multi-branch network.

Every model is a SplitNet: `trunk` → `last_stage` → global average pool → `classifier`,
which is what lets ONE share the trunk and replicate the rest.
"""
from .base import SplitNet, count_parameters
from .one import ONE_MODEL_NAMES, OneNet, build_one
from .registry import MODEL_NAMES, RESIDUAL_INIT, build_model, zero_init_wanted

__all__ = ["build_model", "build_one", "MODEL_NAMES", "ONE_MODEL_NAMES", "count_parameters",
           "OneNet", "SplitNet", "RESIDUAL_INIT", "zero_init_wanted"]
