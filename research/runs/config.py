"""Python-file configs (ml_collections.ConfigDict), command-line overrides and validation.

A config file (e.g. `experiments/configs/digits_rf.py`) defines `get_config() -> ConfigDict` and
optionally `validate(config)` raising ValueError on invalid values. `load_config(path, overrides)`
loads it, applies "a.b=value" overrides with type checking, validates and returns a locked config;
all of this happens before any model is built or compiled.

Override value parsing (by the type of the existing value): bool accepts true/false/1/0/yes/no;
int accepts integer literals; float accepts any number (incl. 1e-3, inf is rejected); str takes
the text as is; tuple/list take a Python literal ("(1, 2)", "[1,2]") or a comma-separated list
("1,2"), each element parsed like the existing elements; None-valued fields take a Python literal
or, failing that, the text.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import math
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_collections

CONFIG_FILE = "config.json"
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


# ---------------------------------------------------------------- loading
def _load_module(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} does not define get_config()")
    return module


def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_flat_keys(v, full + "."))
    return keys


def _unknown_key_error(key: str, cfg_root: ml_collections.ConfigDict) -> ValueError:
    candidates = _flat_keys(cfg_root)
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:  # also compare the last component against the last components
        last = key.rsplit(".", 1)[-1]
        by_last = {c.rsplit(".", 1)[-1]: c for c in candidates}
        close = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=3, cutoff=0.6)]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}")


# ---------------------------------------------------------------- value parsing
def _parse_scalar(text: str, like: Any, key: str) -> Any:
    t = text.strip()
    if isinstance(like, bool):
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise ValueError(f"config key {key!r} expects a bool (true/false), got {text!r}")
    if isinstance(like, int):
        try:
            return int(t, 0) if not t.lstrip("+-").isdigit() else int(t)
        except ValueError:
            raise ValueError(f"config key {key!r} expects an int, got {text!r}") from None
    if isinstance(like, float):
        try:
            value = float(t)
        except ValueError:
            raise ValueError(f"config key {key!r} expects a float, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"config key {key!r} expects a finite float, got {text!r}")
        return value
    if isinstance(like, str):
        return text
    if like is None:
        try:
            return ast.literal_eval(t)
        except (ValueError, SyntaxError):
            return text
    raise TypeError(f"config key {key!r} has a value of type {type(like).__name__}, which cannot be "
                    "overridden from the command line")


def _parse_value(text: str, like: Any, key: str) -> Any:
    if isinstance(like, (tuple, list)):
        t = text.strip()
        try:
            items = ast.literal_eval(t)
            if not isinstance(items, (tuple, list)):
                items = (items,)
            items = [str(x) if not isinstance(x, str) else x for x in items]
        except (ValueError, SyntaxError):
            items = [s for s in t.strip("()[]").split(",") if s.strip()]
        if like and len({type(x) for x in like}) == 1:
            elem = like[0]
            parsed = [_parse_scalar(s, elem, f"{key}[{i}]") for i, s in enumerate(items)]
        else:
            parsed = [_parse_scalar(s, None, f"{key}[{i}]") for i, s in enumerate(items)]
        return type(like)(parsed)
    return _parse_scalar(text, like, key)


def apply_override(cfg: ml_collections.ConfigDict, override: str) -> None:
    """Applies one "a.b.c=value" override in place (the config must be unlocked or the key must exist)."""
    if "=" not in override:
        raise ValueError(f"override {override!r} must have the form key=value")
    key, text = override.split("=", 1)
    key = key.strip()
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise _unknown_key_error(key, cfg)
        if i < len(parts) - 1:
            node = node[part]
    last = parts[-1]
    current = node[last]
    if isinstance(current, ml_collections.ConfigDict):
        raise ValueError(f"config key {key!r} is a group; override one of its fields "
                         f"({', '.join(f'{key}.{k}' for k in current.keys())})")
    value = _parse_value(text, current, key)
    with node.unlocked() if node.is_locked else _nullcontext():
        node[last] = value


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _split_preset(path: str) -> tuple[str, str | None]:
    """"file.py:preset" -> ("file.py", "preset"); a plain path -> (path, None)."""
    head, sep, tail = path.rpartition(":")
    if sep and head.endswith(".py") and tail and os.sep not in tail:
        return head, tail
    return path, None


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from the Python file `path`, applies overrides, validates, locks.

    ``path`` may name a preset, ``"experiments/configs/bench_2d.py:quick"``: the file's
    ``get_config(preset)`` is called with it (a file without presets rejects any); the file lists its
    presets in ``PRESETS``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: unknown key (message lists close matches), badly typed value, unknown preset, or a
        value rejected by the file's `validate(config)`.
    """
    path, preset = _split_preset(os.fspath(path))
    module = _load_module(path)
    if preset is None:
        cfg = module.get_config()
    else:
        presets = tuple(getattr(module, "PRESETS", ()))
        if preset not in presets:
            raise ValueError(f"config {path} has no preset {preset!r}; presets: {list(presets) or 'none'}")
        cfg = module.get_config(preset)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise TypeError(f"get_config() in {path} must return an ml_collections.ConfigDict, got {type(cfg).__name__}")
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not one string")
    for override in overrides:
        apply_override(cfg, override)
    validate = getattr(module, "validate", None)
    if validate is not None:
        try:
            validate(cfg)
        except ValueError as e:
            raise ValueError(f"invalid config ({path}): {e}") from None
    cfg.lock()
    return cfg


# ---------------------------------------------------------------- validation helpers
def _get(cfg: ml_collections.ConfigDict, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if part not in node:
            raise _unknown_key_error(key, cfg)
        node = node[part]
    return node


def check_positive(cfg: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
    """ValueError unless each `key` holds a number > 0 (>= 0 with allow_zero)."""
    for key in keys:
        v = _get(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 if allow_zero else v > 0):
            raise ValueError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


def check_range(cfg: ml_collections.ConfigDict, key: str, low: float, high: float) -> None:
    """ValueError unless low <= cfg[key] <= high."""
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise ValueError(f"{key} must be in [{low}, {high}], got {v!r}")


def check_choice(cfg: ml_collections.ConfigDict, key: str, choices: Sequence[Any]) -> None:
    """ValueError unless cfg[key] is one of `choices` (close matches suggested for strings)."""
    v = _get(cfg, key)
    if v not in choices:
        close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{key} must be one of {list(choices)}, got {v!r}{hint}")


def check(condition: bool, message: str) -> None:
    """ValueError(message) unless condition."""
    if not condition:
        raise ValueError(message)


# ---------------------------------------------------------------- saving and the command line
def config_to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """The config as a plain JSON-compatible dict (what ``config.json`` holds)."""
    return json.loads(json.dumps(cfg.to_dict(), sort_keys=True, default=str))


def save_config(cfg: ml_collections.ConfigDict, run_dir: str | os.PathLike) -> str:
    """Writes `<run_dir>/config.json` (process 0 only); returns its path."""
    path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    if jax.process_index() == 0:
        os.makedirs(os.fspath(run_dir), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2, sort_keys=True, default=str)
            f.write("\n")
    return path


def add_config_args(parser: argparse.ArgumentParser, *, default_config: str | None = None) -> argparse.ArgumentParser:
    """Adds `--config PATH`, repeatable `--set key=value` and positional `key=value` overrides."""
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="Python config file defining get_config()")
    parser.add_argument("--set", dest="config_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more overrides, same as --set")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of one line")
    return parser


def config_from_cli(argv: Sequence[str] | None = None, *, parser: argparse.ArgumentParser | None = None,
                    default_config: str | None = None) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
    """Parses `--config PATH [--set k=v ...] [k=v ...]` (plus any arguments already on `parser`).

    Returns the loaded, validated, locked config and the parsed namespace. A config error exits via
    `parser.error` with the message (exit status 2), before anything is compiled.
    """
    parser = parser or argparse.ArgumentParser()
    add_config_args(parser, default_config=default_config)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, list(args.config_overrides) + list(args.overrides))
    except (ValueError, TypeError, FileNotFoundError) as e:
        parser.error(str(e))
    return cfg, args
