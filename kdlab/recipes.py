"""Recipes: a paper's table or figure as a grid of runs, at two scales.

A recipe YAML (``kdlab/assets/recipes/*.yaml``) names stages in dependency order. Each stage is a
base config plus *axes*: lists of labelled config changes whose cartesian product,
times the seeds, gives the stage's runs. A stage may take its teachers from earlier
stages: a teacher run matches a student run when their common axes carry the same
labels and (unless the teacher stage has a single seed) the same seed; ``ensemble:
true`` takes every matching teacher run (e.g. all seeds). Because a run dir is a pure
function of its config, the whole grid, teachers' run dirs included, is known before
anything trains: :func:`expand` returns it.

The recipes and the example run configs (``kdlab/assets/configs/*.yaml``, ``kdlab train
teacher-mnist1d``) are package data, found with :mod:`importlib.resources`, so an
installed wheel has them as an editable checkout does.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import Config, apply_overrides, build_config, merge_dicts as _merge, yaml_load, yaml_problem
from .errors import ConfigError
from .examples import CONFIG_DIR, assets, example_config_path, list_example_configs, resolve_config_path  # noqa: F401


RECIPE_DIR = assets("recipes")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AxisValue(_Strict):
    label: str
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value")


class Stage(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    config: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, list[AxisValue]] = Field(default_factory=dict)
    seeds: Optional[list[int]] = None
    teachers: list[str] = Field(default_factory=list, description="earlier stages whose runs teach this one")
    init_from: Optional[str] = Field(None, description="an earlier stage whose matching run starts this one's runs "
                                     "(model.init_run: its student weights, and its adapters when the same); runs "
                                     "whose label on a shared axis the earlier stage lacks start fresh")
    ensemble: bool = False
    analyze: bool = Field(False, description="run `kdlab analyze` on this stage's runs for the report")
    projections: Optional[list[list[Union[int, str]]]] = Field(
        None, description="analysis: class triples for the template projections (indices or class names); "
        "default 0,1,2")

    @field_validator("projections")
    @classmethod
    def _triples(cls, value):
        if value is not None and (not value or any(len(t) != 3 for t in value)):
            raise ValueError("projections: a list of class triples, e.g. [[0, 1, 2]]")
        return value


class Scale(_Strict):
    note: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0])
    base: dict[str, Any] = Field(default_factory=dict)
    stages: list[Stage]
    cpus_per_run: int = Field(1, ge=1)
    gpus_per_run: float = Field(0.0, ge=0, description="Ray executor: GPUs per run; N >= 2 runs each as a "
                                "torchrun of N processes (DDP) on one node; <= 1 lets runs share GPUs")

    @field_validator("gpus_per_run")
    @classmethod
    def _whole_gpus(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(f"gpus_per_run={value:g}: above 1, a run takes whole GPUs (one process each)")
        return value

    @property
    def processes_per_run(self) -> int:
        return int(self.gpus_per_run) if self.gpus_per_run >= 2 else 1


class Claim(_Strict):
    """A paper's claim as a paired comparison over seeds: side ``a`` is expected above side
    ``b`` (``a`` − ``b`` > 0; for a claim written with ≥, a tie counts as holding). Each
    side selects one run per seed by axis labels, plus ``stage`` when it is not the item's."""

    claim: str = Field(description="the claim as the paper states it, e.g. 'KL τ=∞ > KL τ=1'")
    a: dict[str, str] = Field(description="axis -> label (and optionally stage) of the side expected higher")
    b: dict[str, str] = Field(description="axis -> label (and optionally stage) of the other side")
    paper: Optional[float] = Field(None, description="the paper's own difference a − b (same units as the table)")


class ReportItem(_Strict):
    kind: Literal["table", "heatmap", "curve", "figures", "claims"]
    title: str
    stage: str
    metric: str = "test_acc"
    rows: Optional[str] = None
    cols: Optional[str] = None
    x: Optional[str] = None
    lines: Optional[str] = None
    where: dict[str, str] = Field(default_factory=dict, description="axis -> label filter")
    scale: float = 100.0
    spread: Literal["std", "minmax"] = Field("std", description="over seeds: mean ± std, or mean [min, max]")
    paper: dict[str, dict[str, float]] = Field(default_factory=dict, description="row -> col -> paper number")
    figures: list[str] = Field(default_factory=list, description="analysis figure names, for kind=figures")
    claims: list[Claim] = Field(default_factory=list, description="paired comparisons, for kind=claims")
    comment: str = ""


class Recipe(_Strict):
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    title: str
    source: str
    scales: dict[Literal["quick", "paper"], Scale]
    report: list[ReportItem] = Field(default_factory=list)


@dataclass
class RunSpec:
    stage: str
    labels: dict[str, str]
    seed: int
    config: Config
    teacher_of: list["RunSpec"] = field(default_factory=list)
    starts_from: Optional["RunSpec"] = None  # the earlier stage's run whose weights start this one (init_from)
    analyze: bool = False
    projections: Optional[list] = None

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    def describe(self) -> str:
        labels = ", ".join(f"{k}={v}" for k, v in self.labels.items())
        return f"{self.stage}[{labels}{', ' if labels else ''}seed={self.seed}]"


def list_recipes(directory: Path = RECIPE_DIR) -> list[Path]:
    """The packaged recipes (or the ``*.yaml`` of ``directory``), sorted by name."""
    return sorted(Path(directory).glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A packaged recipe by id (``kim-table2``), or the recipe YAML at a path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in list_recipes()) or f"none (no recipes in {RECIPE_DIR})"
        close = difflib.get_close_matches(str(name_or_path), [p.stem for p in list_recipes()], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown recipe {str(name_or_path)!r}{hint}; known: {known}")
    try:
        recipe = Recipe.model_validate(yaml_load(path.read_text(encoding="utf-8")))
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({yaml_problem(err)})") from None
    return recipe


def expand(recipe: Recipe, scale: str = "quick", out_dir: str | Path = "runs",
           settings: list[str] | tuple[str, ...] = ()) -> list[RunSpec]:
    """Every run of the recipe at ``scale``, stages in order, teachers resolved.

    ``settings`` (``key.sub=value``, as ``kdlab reproduce --set``) apply to every run
    after the recipe's own values (``teacher.*`` ones only to runs with teachers); those
    that change a run's hash (``bf16=true``) give other run dirs, ``device`` does not."""
    if scale not in recipe.scales:
        raise ConfigError(f"recipe {recipe.id} has no {scale!r} scale (has: {', '.join(recipe.scales)})")
    spec = recipe.scales[scale]
    by_stage: dict[str, list[RunSpec]] = {}
    runs: list[RunSpec] = []
    for stage in spec.stages:
        for ref in stage.teachers:
            if ref not in by_stage:
                raise ConfigError(f"recipe {recipe.id}: stage {stage.name!r} takes teachers from unknown or later stage {ref!r}")
        if stage.init_from is not None and stage.init_from not in by_stage:
            raise ConfigError(f"recipe {recipe.id}: stage {stage.name!r} starts from unknown or later stage "
                              f"{stage.init_from!r} (init_from names an earlier stage)")
        axis_names = list(stage.axes)
        combos = itertools.product(*(stage.axes[a] for a in axis_names)) if axis_names else [()]
        stage_runs = []
        for combo in combos:
            labels = {a: v.label for a, v in zip(axis_names, combo)}
            for seed in stage.seeds if stage.seeds is not None else spec.seeds:
                data = _merge(_merge(spec.base, stage.config), {"seed": seed, "out_dir": str(out_dir),
                                                                "name": f"{recipe.id}-{stage.name}"})
                overrides = [f"{k}={_yaml_scalar(val)}" for v in combo for k, val in v.set.items()]
                data = apply_overrides(data, overrides)
                teachers = []
                for ref in stage.teachers:
                    seeds_of_ref = len({r.seed for r in by_stage[ref]})
                    matches = [t for t in by_stage[ref] if _matches(t, labels, seed, seeds_of_ref, stage.ensemble)]
                    if not matches:
                        raise ConfigError(f"recipe {recipe.id}: no run of stage {ref!r} matches {labels} seed {seed}")
                    if len(matches) > 1 and not stage.ensemble:
                        raise ConfigError(f"recipe {recipe.id}: {len(matches)} runs of stage {ref!r} match {labels} "
                                          f"seed {seed}; give the stages a common axis or set ensemble: true")
                    teachers += matches
                if teachers:  # the stage's own teacher settings (cache, store) stay
                    data["teacher"] = {**(data.get("teacher") or {}), "runs": [str(t.run_dir) for t in teachers]}
                start = _start_run(recipe.id, stage, by_stage, labels, seed)
                if start is not None:
                    data["model"] = {**(data.get("model") or {}), "init_run": str(start.run_dir)}
                before = data
                data = apply_overrides(data, [s for s in settings
                                              if teachers or data.get("teacher") or not s.startswith("teacher.")])
                data = _rescale_milestones(before, data, settings)
                try:
                    config = build_config(data)
                except ConfigError as err:
                    where = "".join(f", {k}={v}" for k, v in labels.items())
                    raise ConfigError(f"recipe {recipe.id}, stage {stage.name}{where}, seed {seed}: {err}") from None
                stage_runs.append(RunSpec(stage.name, labels, seed, config, teachers, start, stage.analyze,
                                          stage.projections))
        by_stage[stage.name] = stage_runs
        runs += stage_runs
    return runs


def _rescale_milestones(before: dict, after: dict, settings) -> dict:
    """``--set optim.epochs=N`` on a multistep schedule moves its lr drops with it (Kim's 50%/75%
    stay 50%/75% of the new length), unless ``optim.milestones`` is set too."""
    from .config.sections import OptimConfig

    keys = {s.split("=", 1)[0].strip() for s in settings}
    default = OptimConfig()
    old_optim, new_optim = before.get("optim") or {}, after.get("optim") or {}
    old, new = old_optim.get("epochs", default.epochs), new_optim.get("epochs", default.epochs)
    if "optim.epochs" not in keys or "optim.milestones" in keys or old == new \
            or new_optim.get("schedule", default.schedule) != "multistep":
        return after
    # a drop at or after the last epoch would never happen: the last one is at epoch new − 1
    moved = {min(max(1, round(m * new / old)), max(1, new - 1)) for m in new_optim.get("milestones", default.milestones)}
    return {**after, "optim": {**new_optim, "milestones": sorted(moved)}}


def _start_run(recipe_id: str, stage: Stage, by_stage: dict, labels: dict, seed: int) -> Optional[RunSpec]:
    """The one run of ``stage.init_from`` that starts a run of ``stage`` (matched as teachers are),
    or None when the earlier stage has no run for this run's label on an axis they share (only
    some methods have a first stage: FitNets' hint, AB's initialisation, FT's paraphraser)."""
    if stage.init_from is None:
        return None
    earlier = by_stage[stage.init_from]
    for axis in set(labels) & set().union(*(r.labels for r in earlier)):
        if labels[axis] not in {r.labels.get(axis) for r in earlier}:
            return None
    seeds = len({r.seed for r in earlier})
    matches = [r for r in earlier if _matches(r, labels, seed, seeds, False)]
    if len(matches) != 1:
        found = "no run" if not matches else f"{len(matches)} runs"
        raise ConfigError(f"recipe {recipe_id}: {found} of stage {stage.init_from!r} match {labels} seed {seed} "
                          f"(stage {stage.name!r} starts from exactly one: give the stages a common axis)")
    return matches[0]


def _yaml_scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _matches(teacher: RunSpec, labels: dict, seed: int, teacher_seed_count: int, ensemble: bool) -> bool:
    common = set(teacher.labels) & set(labels)
    if any(teacher.labels[a] != labels[a] for a in common):
        return False
    return ensemble or teacher_seed_count == 1 or teacher.seed == seed
