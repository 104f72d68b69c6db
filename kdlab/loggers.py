"""Experiment trackers beside ``metrics.jsonl`` and TensorBoard: Weights & Biases and MLflow.

Each is off unless the config's ``logging`` section asks for it (``logging.wandb=true``,
``logging.mlflow=true``), each is an extra (``kdlab[wandb]``, ``kdlab[mlflow]``), and only
the main process (rank 0) logs. What each receives:

- the resolved config as hyperparameters (W&B: the nested config; MLflow: one parameter per
  dotted key, ``optim.lr``), and as tags the run's name, hash, objective in words, model,
  dataset, kdlab version and git commit;
- each epoch's line of ``metrics.jsonl`` (loss, its named parts ``train_kd`` …, accuracy,
  lr, evaluations when due), at the same step as TensorBoard: optimizer steps done;
- the final result: ``result.json``'s ``final`` numbers, the parameter count and the
  training time (W&B: the run summary, ``final/<key>``; MLflow: metrics ``final.<key>``),
  and the run's end state (MLflow: FINISHED, FAILED, or KILLED for a run stopped to resume).

A run dir keeps its trackers' run ids in ``loggers.json``, written when a tracker's run is
created: a resumed run continues the same W&B run (``resume="allow"``; offline, a new
offline file of the same run id, which ``wandb sync`` merges) and the same MLflow run,
whose epochs logged before the kill are not logged twice. Where the runs go: W&B's files
under ``RUN_DIR/wandb``; MLflow by default into a SQLite store beside the run dirs,
``sqlite:///OUT_DIR/mlflow.db`` (MLflow 3 keeps its file store in maintenance mode and
refuses it by default), one experiment (``logging.mlflow_experiment``) for a sweep's runs.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from .errors import ConfigError, warn
from .files import atomic_write_json
from .runs import read_json

__all__ = ["Trackers", "check_loggers", "flatten", "IDS_FILE"]

IDS_FILE = "loggers.json"


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists and None kept as values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def check_loggers(cfg) -> None:
    """Before a run starts: each logger asked for imports (a one-line error naming the extra)."""
    for wanted, module, extra in ((cfg.logging.wandb, "wandb", "wandb"), (cfg.logging.mlflow, "mlflow", "mlflow")):
        if not wanted:
            continue
        try:
            __import__(module)
        except Exception as err:  # ImportError, or a broken install
            raise ConfigError(f"logging.{extra}=true needs {module}: pip install 'kdlab[{extra}]' "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if cfg.logging.mlflow:
        try:
            __import__("sqlalchemy")
            __import__("alembic")
        except ImportError:
            if cfg.logging.mlflow_tracking_uri is None:
                raise ConfigError("logging.mlflow=true stores runs in sqlite:///OUT_DIR/mlflow.db, which needs "
                                  "sqlalchemy and alembic: pip install 'kdlab[mlflow]', or set "
                                  "logging.mlflow_tracking_uri") from None


def _tags(cfg, run_dir: Path) -> dict:
    from .run_list import objective
    from .runs import git_commit
    from .version import __version__

    return {"kdlab.name": run_dir.name, "kdlab.hash": cfg.run_hash(), "kdlab.objective": objective(cfg),
            "kdlab.model": cfg.model.name, "kdlab.dataset": cfg.data.name, "kdlab.version": __version__,
            "kdlab.commit": git_commit() or "unknown"}


class _Wandb:
    def __init__(self, cfg, run_dir: Path, ids: dict, resumed: bool):
        import wandb

        settings = cfg.logging
        run_id = ids.get("wandb") or secrets.token_hex(6)  # (W&B run ids: letters and digits)
        tags = _tags(cfg, run_dir)
        self.run = wandb.init(
            project=settings.wandb_project, entity=settings.wandb_entity, mode=settings.wandb_mode, id=run_id,
            name=run_dir.name, dir=str(run_dir), resume="allow", config=cfg.model_dump(mode="json"),
            tags=[tags["kdlab.objective"].replace(" ", ""), cfg.model.name, cfg.data.name, *settings.wandb_tags][:64],
            notes=f"kdlab run {run_dir.name} (hash {tags['kdlab.hash']}, commit {tags['kdlab.commit']})",
            reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        self.run.config.update({"kdlab": tags}, allow_val_change=True)
        ids["wandb"] = run_id

    def log_epoch(self, record: dict, step: int) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def log_result(self, result: dict) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in _final_numbers(result).items()})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("FINISHED", "KILLED") else 1)


class _Mlflow:
    def __init__(self, cfg, run_dir: Path, ids: dict, resumed: bool):
        import mlflow
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        settings = cfg.logging
        uri = settings.mlflow_tracking_uri or f"sqlite:///{Path(cfg.out_dir).resolve() / 'mlflow.db'}"
        quiet = [logging.getLogger(name) for name in ("mlflow", "alembic")]
        levels = [lg.level for lg in quiet]
        for lg in quiet:  # (creating the store logs its schema migrations at INFO)
            lg.setLevel(logging.WARNING)
        try:
            self.client = client = MlflowClient(tracking_uri=uri)
            recorded = ids.get("mlflow")
            if recorded and recorded.get("tracking_uri") == uri:
                self.run_id = recorded["run_id"]
                client.update_run(self.run_id, status="RUNNING")
            else:
                experiment = _experiment(client, settings.mlflow_experiment)
                run = client.create_run(experiment, run_name=run_dir.name, tags=_tags(cfg, run_dir))
                self.run_id = run.info.run_id
                params = flatten(cfg.model_dump(mode="json"))
                batch = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
                for begin in range(0, len(batch), 100):  # (MLflow takes at most 100 params a batch)
                    client.log_batch(self.run_id, params=batch[begin : begin + 100])
                client.log_batch(self.run_id, tags=[RunTag("mlflow.source.name", "kdlab")])
                ids["mlflow"] = {"run_id": self.run_id, "tracking_uri": uri}
            history = client.get_metric_history(self.run_id, "train_loss")
            self.logged_until = max((m.step for m in history), default=0)  # a resumed run logs each epoch once
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)
        self._mlflow = mlflow

    def log_epoch(self, record: dict, step: int) -> None:
        from mlflow.entities import Metric

        if step <= self.logged_until:
            return
        now = _now_ms()
        metrics = [Metric(k, float(v), now, step) for k, v in record.items() if isinstance(v, (int, float))]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_result(self, result: dict) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(f"final.{k}", float(v), now, 0)
                                                    for k, v in _final_numbers(result).items()])

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _experiment(client, name: str) -> str:
    """The experiment's id, made if missing (two runs of a sweep may both try: one wins)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _final_numbers(result: dict) -> dict:
    numbers = {k: v for k, v in result.get("final", {}).items() if isinstance(v, (int, float))}
    for key in ("num_params", "train_time_s", "epochs"):
        if isinstance(result.get(key), (int, float)):
            numbers[key] = result[key]
    return numbers


class Trackers:
    """The loggers a run's config asks for (none: every call does nothing). ``close`` is
    called however the run ends (the training loop's closers); after ``finish`` it marks
    the trackers' runs finished, before it failed (or KILLED: stopped to be resumed)."""

    def __init__(self, cfg, run_dir: Path, main: bool, resumed: bool):
        self.loggers: list = []
        self.status = "FAILED"
        if not main or not (cfg.logging.wandb or cfg.logging.mlflow):
            return
        path = Path(run_dir) / IDS_FILE
        ids = read_json(path) if path.is_file() else {}
        try:
            if cfg.logging.wandb:
                self.loggers.append(_Wandb(cfg, Path(run_dir), ids, resumed))
            if cfg.logging.mlflow:
                self.loggers.append(_Mlflow(cfg, Path(run_dir), ids, resumed))
        except BaseException:
            self.close()
            raise
        finally:
            if ids:
                atomic_write_json(path, ids)

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def log_epoch(self, record: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log_epoch(record, step)

    def finish(self, result: dict) -> None:
        for logger in self.loggers:
            logger.log_result(result)
        self.status = "FINISHED"

    def stopped(self) -> None:
        """The run stops to be resumed (a checkpoint, no result)."""
        self.status = "KILLED"

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            try:
                logger.close(self.status)
            except Exception as err:  # a tracker that cannot close must not hide the run's own outcome
                warn(f"{type(logger).__name__.strip('_')} did not close: {err}")
