"""From YAML text and ``key.sub=value`` overrides to a validated :class:`~kdlab.config.Config`:
YAML read with duplicate keys refused, overrides parsed and applied, pydantic's errors
turned into one-line :class:`~kdlab.errors.ConfigError` messages naming the key.
Re-exported by :mod:`kdlab.config`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .model import Config


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key twice (plain YAML keeps the last one
    silently, so a config's earlier setting would be lost without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # (the base class reports unhashable keys)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {seen[key] + 1} and line {key_node.start_mark.line + 1}; "
                    "YAML would keep only the last)", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def yaml_load(text: str):
    """``yaml.safe_load`` that refuses duplicate keys: every YAML kdlab reads goes through it."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        return f"unknown config key '{loc}'"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"config key '{loc}': {msg}{more}" if loc else f"config: {msg}{more}"


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: its problem and where (the first line alone can be just
    "while constructing a mapping")."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem:
        return problem + (f" at line {mark.line + 1}" if mark is not None and "line" not in problem else "")
    return str(err).splitlines()[0]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("inf", "+inf", "infinity"):
        value = math.inf
    return key.split("."), value


def merge_dicts(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, recursively for nested mappings (neither is modified)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> Config:
    data = apply_overrides(data or {}, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or none: defaults), apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = yaml_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({yaml_problem(err)})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text (a config is a YAML file)") from None
        except OSError as err:
            raise ConfigError(f"{path}: unreadable ({err.strerror})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    return build_config(data, overrides)
