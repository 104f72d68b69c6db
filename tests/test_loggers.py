"""W&B and MLflow loggers (kdlab/loggers.py), read back by each library's own reader:
MLflow's client on the run's SQLite store, W&B's protobuf records from its offline files."""

import json
import struct
import sys
from pathlib import Path

import pytest

from conftest import config_with
from kdlab.cli import main
from kdlab.runs import read_json, read_metrics
from kdlab.train import train

QUIET = {"progress": False, "log": lambda *a: None}
STEPS = 11  # optimizer steps an epoch: 1,300 training digits / 128


def _digits(out_dir, **extra):
    base = {"out_dir": str(out_dir), "threads": 1, "tensorboard": False, "data": {"name": "digits", "val_size": 200},
            "model": {"name": "mlp-32"}, "optim": {"epochs": 4, "batch_size": 128, "lr": 0.05},
            "loss": {"smoothing": 0.1}}
    return config_with(base, **extra)


def _numbers(record: dict) -> dict:
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}


# --- MLflow ---------------------------------------------------------------------------------

def test_mlflow_records_config_epochs_and_result_and_a_resume_continues_its_run(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _digits(tmp_path, logging={"mlflow": True})
    assert cfg.run_hash() == _digits(tmp_path).run_hash()  # not part of the run's identity
    assert train(cfg, stop_after_epoch=2, **QUIET) is None
    run_dir = cfg.run_dir()
    ids = read_json(run_dir / "loggers.json")["mlflow"]
    assert ids["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    assert client.get_run(ids["run_id"]).info.status == "KILLED"  # stopped, to be resumed
    result = train(cfg, **QUIET)
    assert read_json(run_dir / "loggers.json")["mlflow"] == ids  # the same MLflow run, continued
    (experiment,) = [e for e in client.search_experiments() if e.name == "kdlab"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == ids["run_id"] and run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["optim.lr"] == "0.05" and run.data.params["loss.smoothing"] == "0.1"
    assert run.data.params["model.name"] == "mlp-32" and "data.name" in run.data.params
    assert run.data.tags["kdlab.hash"] == cfg.run_hash() and run.data.tags["kdlab.objective"] == "LS ε=0.1"
    metrics = read_metrics(run_dir)
    for key in ("train_loss", "train_ls", "val_acc", "lr"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [m["epoch"] * STEPS for m in metrics], key  # each epoch once
        assert [m.value for m in history] == pytest.approx([m[key] for m in metrics], rel=1e-9), key
    assert run.data.metrics["final.test_acc"] == pytest.approx(result["final"]["test_acc"])
    assert run.data.metrics["final.num_params"] == result["num_params"]


def test_a_failing_run_marks_its_mlflow_run_failed(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _digits(tmp_path, logging={"mlflow": True}, optim={"lr": 1e30, "epochs": 2})  # the loss overflows
    with pytest.raises(Exception, match="training loss became"):
        train(cfg, **QUIET)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("kdlab").experiment_id])
    assert run.info.status == "FAILED"


# --- W&B -------------------------------------------------------------------------------------

def _wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-ID.wandb``): its 7-byte header, then
    32 KiB blocks of chunks (crc32 + length + type, the LevelDB log layout), each record a
    ``wandb_internal_pb2.Record`` — W&B's own message, parsed by its own protobuf class."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    records, pending, position, block = [], b"", 7, 32768
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # (a block's tail too short for a header is padding)
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_files_hold_the_config_epochs_and_summary_and_a_resume_keeps_the_run_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _digits(tmp_path, logging={"wandb": True, "wandb_tags": ["mine"]})
    assert train(cfg, stop_after_epoch=2, **QUIET) is None
    result = train(cfg, **QUIET)
    run_dir = cfg.run_dir()
    run_id = read_json(run_dir / "loggers.json")["wandb"]
    logs = sorted((run_dir / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert len(logs) == 2  # the first process's and the resumed one's, under one run id (`wandb sync` merges them)
    history, config, summary, tags = {}, {}, {}, set()
    for log in logs:
        for record in _wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id and record.run.display_name == run_dir.name
                tags.update(record.run.tags)
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                history[items["_step"]] = items
            elif kind == "summary":
                summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.summary.update})
    assert config["optim"]["lr"] == 0.05 and config["loss"]["smoothing"] == 0.1
    assert config["kdlab"]["kdlab.hash"] == cfg.run_hash()
    assert {"mlp-32", "digits", "mine"} <= tags
    metrics = read_metrics(run_dir)
    assert sorted(history) == [m["epoch"] * STEPS for m in metrics]
    for m in metrics:
        logged = history[m["epoch"] * STEPS]
        for key in ("train_loss", "train_ls", "val_acc", "lr"):
            assert logged[key] == pytest.approx(m[key], rel=1e-9), key
    assert summary["final/test_acc"] == pytest.approx(result["final"]["test_acc"])


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_a_logger_that_is_not_installed_is_one_line_before_any_run_dir(tmp_path, capsys, monkeypatch, logger):
    monkeypatch.setitem(sys.modules, logger, None)  # as if not installed
    argv = ["train", "--no-progress", "data.name=digits", "model.name=mlp-16", "optim.epochs=1",
            f"out_dir={tmp_path / 'out'}", f"logging.{logger}=true"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kdlab: error: logging.{logger}=true needs {logger}: pip install 'kdlab[{logger}]'")
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_misspelt_logging_key_is_one_line_with_a_close_match(tmp_path, capsys):
    assert main(["train", "--no-progress", "data.name=digits", f"out_dir={tmp_path}", "logging.mlfow=true"]) == 2
    err = capsys.readouterr().err
    assert "logging.mlfow" in err and "logging.mlflow" in err and err.count("\n") == 1
