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


def _close_key(dotted: str) -> str:
    """" (did you mean optim.epochs?)" for a misspelt dotted key, from the config's own fields."""
    import difflib

    from pydantic import BaseModel

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name
            kind = field.annotation
            for candidate in (kind, *getattr(kind, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    yield from keys(candidate, f"{prefix}{name}.")

    close = difflib.get_close_matches(dotted, list(keys(Config)), n=1, cutoff=0.7)
    return f" (did you mean {close[0]}?)" if close else ""


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    kind, msg = first["type"], first["msg"]
    if kind == "extra_forbidden":
        return f"unknown config key '{loc}'{_close_key(loc)}"
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


CONFIG_REF = "config:"


def _resolve_teacher_configs(data: dict, depth: int = 0, base: Path | None = None) -> dict:
    """``teacher.runs`` entries ``config:NAME`` (a packaged example, `kdlab configs`, or a YAML
    path) name the run dir that config trains — a run dir is a function of its config — under
    this config's ``out_dir`` unless that config sets its own."""
    teacher = data.get("teacher")
    runs = teacher.get("runs") if isinstance(teacher, dict) else None
    runs = [runs] if isinstance(runs, str) else runs  # (one teacher, given without brackets)
    if not isinstance(runs, list) or not any(isinstance(r, str) and r.startswith(CONFIG_REF) for r in runs):
        return data
    if depth > 4:
        raise ConfigError("teacher.runs: config: references nest more than 4 deep (a cycle?)")
    from ..examples import resolve_config_path

    resolved = []
    for run in runs:
        if isinstance(run, str) and run.startswith(CONFIG_REF):
            name = run[len(CONFIG_REF):]
            try:  # a path relative to the referencing YAML's folder first, then as given (cwd, examples)
                path = base / name if base is not None and (base / name).is_file() else resolve_config_path(name)
            except ConfigError as err:
                raise ConfigError(f"teacher.runs: {run}: {err}") from None
            try:
                referenced = yaml_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                raise ConfigError(f"teacher.runs: {run}: {path} is not a readable YAML config") from None
            if "out_dir" in data and "out_dir" not in referenced:
                referenced = {**referenced, "out_dir": data["out_dir"]}
            try:
                run = str(build_config(_resolve_teacher_configs(referenced, depth + 1, path.parent)).run_dir())
            except ConfigError as err:
                raise ConfigError(f"teacher.runs: {run}: {err}") from None
        resolved.append(run)
    return {**data, "teacher": {**teacher, "runs": resolved}}


def build_config(data: dict | None = None, overrides: list[str] | None = None, base: Path | None = None) -> Config:
    """A validated Config from a dict and overrides; ``base``: the folder ``config:`` teacher
    references are looked up in first (the YAML file's)."""
    data = _resolve_teacher_configs(apply_overrides(data or {}, overrides or []), base=base)
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
    return build_config(data, overrides, base=path.parent if path is not None else None)
