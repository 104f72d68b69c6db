"""Typed, validated run configs: YAML (``yaml.safe_load``) + dotted overrides.

An unknown key, a wrong type or an out-of-range value raises :class:`ConfigError`
with a one-line message naming the key. Field descriptions double as documentation
(``kdlab train --help-config`` prints them).

The package's modules, each importing only those before it: ``sections.py`` (the
sections' models: data, model, optim, loss, teacher, mutual_information, decode),
``distill.py`` (the distillation method and its options), ``model.py`` (:class:`Config`, its run hash, ``describe_config``) and ``loading.py``
(YAML, overrides, ``build_config`` / ``load_config``). Everything is imported from here.
"""

from __future__ import annotations

from .distill import FEATURE_METHODS, METHODS, DistillConfig
from .loading import apply_overrides, build_config, load_config, merge_dicts, parse_override, yaml_load, yaml_problem
from .model import Config, describe_config
from .sections import (
    SEED_MAX,
    DataConfig,
    DecodeConfig,
    LossConfig,
    ModelConfig,
    MutualInformationConfig,
    OptimConfig,
    TeacherCacheConfig,
    TeacherConfig,
    TeacherStoreConfig,
    TeacherWeightsConfig,
)

__all__ = [
    "Config", "DataConfig", "ModelConfig", "OptimConfig", "LossConfig", "TeacherCacheConfig", "TeacherStoreConfig",
    "TeacherWeightsConfig", "TeacherConfig", "MutualInformationConfig", "DecodeConfig", "SEED_MAX",
    "describe_config", "yaml_load", "yaml_problem", "parse_override", "merge_dicts", "apply_overrides",
    "build_config", "load_config", "DistillConfig", "METHODS", "FEATURE_METHODS",
]

# The models keep kdlab.config as their module, as before the split into the modules above:
# type names print as before (`kdlab train --help-config` shows
# list[kdlab.config.TeacherWeightsConfig]) and pickles name the same classes. (Set once all
# are built: pydantic resolves a model's annotations in its module as it is defined.)
for _model in (Config, DataConfig, ModelConfig, OptimConfig, LossConfig, TeacherCacheConfig, TeacherStoreConfig,
               TeacherWeightsConfig, TeacherConfig, MutualInformationConfig, DecodeConfig, DistillConfig):
    _model.__module__ = __name__
del _model
