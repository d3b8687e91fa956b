"""The method registry: every module of this package registers one method (or two) with
`@register`; importing the package imports them all, so a new method is a new file here.

    METHODS["dml"]            the method's class (cohort.methods.base.Method)
    config_class("one")       its config dataclass
    load_config(dict)         a config.json back into its class
"""
from __future__ import annotations

import importlib
import pkgutil

from ..config import JobConfig, from_dict
from ..errors import UsageError
from .base import (METHODS, ChainMethod, CohortMethod, EpochContext, EvalSet, Method,
                   NetworkMethod, Recipe, register)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise UsageError("--method", f"{name!r} is not one of: {', '.join(METHODS)}")
    return METHODS[name]


def config_class(name: str) -> type[JobConfig]:
    return get(name).Config


def load_config(values: dict) -> JobConfig:
    """A run's config.json (a dict) back into its method's config class."""
    return from_dict(config_class(values.get("method", "")), values)


def of(cfg: JobConfig) -> Method:
    """The method instance that trains `cfg`."""
    return get(cfg.method)(cfg)


__all__ = ["METHODS", "ChainMethod", "CohortMethod", "EpochContext", "EvalSet", "Method",
           "NetworkMethod", "Recipe", "register", "get", "config_class", "load_config", "of"]
