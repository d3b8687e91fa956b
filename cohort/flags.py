"""Command lines generated from the config tree: one flag per config field (help and default
from `cohort.config.setting`), `--recipe NAME` for a method's presets, and the config built
back from the parsed flags (defaults, under the recipe, under the flags given)."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from . import methods
from .config import JobConfig, field_types, flag_of
from .errors import UsageError

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage dump) with exit code 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text else []


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_type(annotation):
    """The argparse `type` of a field's annotation (None for booleans)."""
    text = str(annotation)
    if annotation is bool:
        return None
    if "list[int]" in text:
        return int_list
    if "list[str]" in text:
        return str_list
    for kind in (int, float):
        if annotation is kind:
            return kind
    return str


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return repr(value) if value in ("", None) else str(value)


def add_config_flags(parser: argparse.ArgumentParser, cls: type[JobConfig]) -> dict[str, str]:
    """One flag per command-line field of `cls`; returns {dest: flag}. Defaults are SUPPRESSed
    in the namespace so `config_from_args` knows which flags were given (recipes)."""
    types = field_types(cls)
    flags = {}
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False):
            continue
        flag, default = flag_of(f), (f.default if f.default_factory is dataclasses.MISSING
                                     else f.default_factory())
        help_text = f"{f.metadata.get('help', '')} (default: {_shown(default)})".replace("%", "%%")
        kind = _parse_type(types[f.name])
        if kind is None and flag.startswith("--no-"):   # a flag named for clearing its field
            parser.add_argument(flag, dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=help_text)
        elif kind is None:   # --flag sets it, --no-flag clears it (over a default or a recipe)
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                                choices=choices if kind is str else None, help=help_text,
                                metavar=None if choices and kind is str else f.name.upper())
        flags[f.name] = flag
    return flags


def add_method_flags(parser: argparse.ArgumentParser, method: type[methods.Method]) -> None:
    parser.description = method.summary
    recipes = method.recipes
    if recipes:
        listing = "; ".join(f"{name}: {r.source}" for name, r in recipes.items())
        parser.add_argument("--recipe", choices=tuple(recipes), default=argparse.SUPPRESS,
                            help=f"a paper's settings, under the flags given ({listing})")
    add_config_flags(parser, method.Config)


def given(args: argparse.Namespace, cls: type[JobConfig]) -> dict:
    """The config fields set on the command line (or by a sweep) in `args`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(method: type[methods.Method], args: argparse.Namespace) -> JobConfig:
    """The method's config: its defaults, under the recipe's settings, under the flags."""
    values = given(args, method.Config)
    recipe = values.get("recipe") or ""
    if recipe:
        if recipe not in method.recipes:
            raise UsageError("--recipe", f"{recipe!r} is not one of: {', '.join(method.recipes) or 'none'}")
        values = {**method.recipes[recipe].settings, **values}
    return method.Config(**values)
