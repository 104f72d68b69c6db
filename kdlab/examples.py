"""Packaged YAMLs: the folders of ``kdlab/assets/`` and the example run configs (``kdlab
configs``, ``kdlab train teacher-mnist1d``). Found with :mod:`importlib.resources`, so an
installed wheel has them as an editable checkout does. (Its own module: the config loader
resolves ``config:NAME`` teachers with it, and recipes import the config.)"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from .errors import ConfigError


def assets(kind: str) -> Path:
    """A folder of packaged YAMLs (``recipes`` or ``configs``). pip installs packages as
    files, so the resource is a real directory; a zip import is not supported."""
    return Path(str(importlib.resources.files("kdlab").joinpath("assets", kind)))


CONFIG_DIR = assets("configs")


def list_example_configs() -> list[Path]:
    """The packaged example run configs (``kdlab configs``)."""
    return sorted(CONFIG_DIR.glob("*.yaml"))


def example_config_path(name: str | Path) -> Path:
    """The packaged example config ``name`` (``teacher-mnist1d``, with or without
    ``.yaml``, or as the old checkout path ``configs/teacher-mnist1d.yaml``)."""
    path = Path(name)
    stem = path.stem if path.suffix == ".yaml" else path.name
    if path.parent in (Path("."), Path("configs")) and stem:
        candidate = CONFIG_DIR / f"{stem}.yaml"
        if candidate.is_file():
            return candidate
    known = ", ".join(p.stem for p in list_example_configs())
    raise ConfigError(f"no example config {str(name)!r}; examples: {known}")


def resolve_config_path(name_or_path: str | Path) -> Path:
    """``kdlab train CONFIG``: an existing file, else a packaged example by name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    try:
        return example_config_path(name_or_path)
    except ConfigError:
        known = ", ".join(p.stem for p in list_example_configs())
        raise ConfigError(f"config file {path} not found (packaged examples, see `kdlab configs`: {known})") from None
