"""torchrun DDP on the CPU (gloo): the code path of multi-GPU runs, tested here.

Every run is a real ``torchrun --nproc_per_node=N -m kdlab train`` (``python -m
torch.distributed.run``). The model is an MLP without BatchNorm or dropout, where N
processes with the same global batch are mathematically one process: the per-epoch
losses, metrics and weights must agree to float rounding.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import config_with
from kdlab.errors import RunError
from kdlab.runs import read_metrics

TIME_KEYS = {"epoch_time_s", "images_per_s", "tokens_per_s"}
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
ENV.pop("KDLAB_TEST_KILL_IN_WRITE", None)


def _config(out_dir, **extra):
    data = {"out_dir": str(out_dir), "threads": 1,
            "data": {"name": "digits", "val_size": 200, "augment": "shift2"},
            "model": {"name": "mlp-64"},
            "optim": {"epochs": 3, "batch_size": 64, "lr": 0.05, "schedule": "cosine", "ema_decay": 0.9}}
    return config_with(data, **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cfg, tmp_path, processes: int, env=None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    path = tmp_path / f"config-{cfg.run_hash()}.yaml"
    path.write_text(cfg.to_yaml())
    if processes == 1:
        command = [sys.executable, "-m", "kdlab", "train", str(path), "--no-progress"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
                   "-m", "kdlab", "train", str(path), "--no-progress"]
    done = subprocess.run(command, cwd=tmp_path, env=env or ENV, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _metrics(run_dir):
    return [{k: v for k, v in m.items() if k not in TIME_KEYS} for m in read_metrics(run_dir)]


def _close(a: Path, b: Path, exact: bool = False) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma) == len(mb) == 3 and [m["epoch"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == (y[key] if exact else pytest.approx(y[key], rel=1e-5, abs=1e-6)), key
    for name in ("model.pt", "model_ema.pt"):
        wa, wb = (torch.load(d / name, weights_only=True) for d in (a, b))
        for key in wa:
            if exact:
                assert torch.equal(wa[key], wb[key]), key
            else:
                torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6)
    for split in ("train", "val", "test"):
        ea, eb = (np.load(d / f"eval_{split}.npz") for d in (a, b))
        assert np.array_equal(ea["labels"], eb["labels"])
        np.testing.assert_allclose(ea["logits"], eb["logits"], rtol=1e-4, atol=1e-5)


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    one = _config(tmp_path / "one")
    two = _config(tmp_path / "two")
    assert one.run_hash() == two.run_hash()  # the process count is not part of the run's identity
    _run(one, tmp_path, 1)
    done = _run(two, tmp_path, 2)
    assert done.stdout.count("test acc") == 1  # rank 0 speaks for the run
    _close(one.run_dir(), two.run_dir())
    run_dir = two.run_dir()
    written = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")} - {"tensorboard"}
    assert written == {"config.yaml", "meta.json", "metrics.jsonl", "model.pt", "model_ema.pt", "result.json",
                       "eval_train.npz", "eval_val.npz", "eval_test.npz"}  # one run dir, rank 0's
    result = json.loads((run_dir / "result.json").read_text())
    meta = json.loads((run_dir / "meta.json").read_text())
    assert result["world_size"] == meta["world_size"] == 2 and result["backend"] == "gloo"
    assert one.bf16 is None and result["bf16"] is False  # bf16 auto: float32 on the CPU (bf16 on CUDA)
    assert one.run_hash() == _config(tmp_path, bf16=False).run_hash() != _config(tmp_path, bf16=True).run_hash()
    assert meta["devices"] == ["cpu (1 threads)"] * 2


def test_killed_mid_epoch_with_two_processes_resumes_with_two_or_one(tmp_path):
    """Rank 0 SIGKILLed inside its 4th checkpoint write (mid-epoch: every 3 steps of 21):
    torchrun takes the run down, and it resumes — with 2 processes exactly as an
    uninterrupted 2-process run, with 1 process to float rounding."""
    whole = _config(tmp_path / "whole")
    _run(whole, tmp_path, 2)
    for resumed_with in (2, 1):
        cfg = _config(tmp_path / f"killed-{resumed_with}", checkpoint_every_steps=3)
        done = _run(cfg, tmp_path, 2, env=dict(ENV, KDLAB_TEST_KILL_IN_WRITE="checkpoint.pt:4"), expect_ok=False)
        assert done.returncode != 0 and "SIGKILL" in done.stderr + done.stdout
        # the survivor says so in one kdlab line (stopped by torchrun, or the lost peer), no traceback of its own
        ours = [line for line in done.stderr.splitlines() if line.startswith("kdlab: error:")]
        assert len(ours) == 1 and ours[0].startswith("kdlab: error: rank 1: ") and "resume" in ours[0], done.stderr
        assert done.stderr.count("Traceback") == 1 and "ChildFailedError" in done.stderr  # torchrun's own, alone
        state = torch.load(cfg.run_dir() / "checkpoint.pt", weights_only=True)
        assert state["step_in_epoch"] == 9 and state["epoch"] == 0 and state["partial"]["seen"] == 9 * 64
        done = _run(cfg, tmp_path, resumed_with)
        assert "resuming in epoch 1 after step 9" in done.stdout + done.stderr
        _close(whole.run_dir(), cfg.run_dir(), exact=resumed_with == 2)
        assert len(read_metrics(cfg.run_dir())) == 3


def test_a_problem_rank_0_finds_stops_every_rank_with_one_line(tmp_path):
    cfg = _config(tmp_path / "runs")
    cfg.run_dir().mkdir(parents=True)
    (cfg.run_dir() / "checkpoint.pt").write_bytes(b"not a checkpoint")
    done = _run(cfg, tmp_path, 2, expect_ok=False)
    assert done.returncode != 0
    assert "kdlab: error:" in done.stderr and "checkpoint.pt" in done.stderr
    assert "rank 1: rank 0 stopped the run" in done.stderr
    assert (cfg.run_dir() / "checkpoint.pt.corrupt").is_file()
    too_small = _config(tmp_path / "runs", optim={"batch_size": 1299})  # 1,300 samples: a last batch of 1
    done = _run(too_small, tmp_path, 2, expect_ok=False)
    assert "fewer than the 2 processes" in done.stderr
    assert not too_small.run_dir().exists()
    sync = _config(tmp_path / "runs", sync_batchnorm=True, model={"name": "wrn-10-1"})
    done = _run(sync, tmp_path, 2, expect_ok=False)
    assert "sync_batchnorm=true: torch's SyncBatchNorm runs on GPUs only" in done.stderr
    assert not sync.run_dir().exists()
    # one line per rank, and torchrun's own report shows it (the rank's error file) instead of a bare exit code
    assert done.stderr.count("kdlab: error: sync_batchnorm=true") >= 3, done.stderr  # each rank + the report
    assert "traceback : kdlab: error: sync_batchnorm=true" in done.stderr and done.stderr.count("Traceback") == 1


def test_a_lost_peer_under_torchrun_is_one_line_naming_it(monkeypatch, capsys):
    """What a surviving rank prints when a collective fails because the other process died
    (gloo's error, as it reaches kdlab), and when torchrun stops it with SIGTERM."""
    import signal

    import kdlab.cli as cli

    def lose_peer(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:36077")

    def terminated(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    for fn, code, fragments in ((lose_peer, 1, ("rank 0: lost rank 1 of this 2-process run (Connection closed by peer",
                                                 "run the same torchrun command again to resume")),
                                (terminated, 143, ("rank 0: stopped by SIGTERM", "torchrun"))):
        monkeypatch.setattr(cli, "_cmd_configs", fn)
        assert cli.main(["configs"]) == code
        err = capsys.readouterr().err
        assert err.startswith("kdlab: error: ") and err.count("\n") == 1, err
        assert all(f in err for f in fragments), err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    monkeypatch.setattr(cli, "_cmd_configs", lambda args: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not a lost peer: the traceback is kept
        cli.main(["configs"])


def test_the_ray_task_of_a_multi_gpu_run_is_a_torchrun(tmp_path):
    """What the Ray executor runs for gpus_per_run=N >= 2 (here on CPU, gloo): torchrun
    with N processes; its result, or its one-line error."""
    from kdlab.recipes import Scale
    from kdlab.sweep import _train_config_processes

    cfg = _config(tmp_path / "runs")
    result = _train_config_processes(cfg.model_dump(mode="json"), 2, 2)
    assert result["world_size"] == 2 and (cfg.run_dir() / "result.json").is_file()
    broken = _config(tmp_path / "runs", optim={"batch_size": 1299})
    with pytest.raises(RunError, match="fewer than the 2 processes"):
        _train_config_processes(broken.model_dump(mode="json"), 2, 2)
    assert [Scale(stages=[], gpus_per_run=g).processes_per_run for g in (0, 0.5, 1, 2, 8)] == [1, 1, 1, 2, 8]
    with pytest.raises(ValueError, match="whole GPUs"):
        Scale(stages=[], gpus_per_run=1.5)


def test_translation_over_two_processes_equals_one(tmp_path):
    """Token batches over 2 gloo processes: each rank takes part of every batch's sentences
    and weighs its loss by its share of the global batch's target tokens (a dropout-free
    Transformer, so the runs are the same computation): metrics and weights agree to
    rounding with one process, with gradient accumulation on."""
    pytest.importorskip("sentencepiece")
    from test_translation_run import write_corpus

    env = {**ENV, "KDLAB_CACHE": str(tmp_path / "cache")}

    def config(out):
        return config_with({"out_dir": str(out), "threads": 1, "name": "mt",
                            "data": {"name": "translation", "root": str(write_corpus(tmp_path / "text")),
                                     "vocab_size": 40, "max_tokens": 160, "calibration_tokens": 60},
                            "model": {"name": "transformer-1-16-2-drop0"},
                            "optim": {"optimizer": "adam", "lr": 0.01, "schedule": "inverse_sqrt",
                                      "warmup_steps": 10, "epochs": 2, "weight_decay": 0.0, "accumulate": 2},
                            "loss": {"smoothing": 0.1}, "decode": {"beam": 0}})

    one, two = config(tmp_path / "one"), config(tmp_path / "two")
    _run(one, tmp_path, 1, env)
    _run(two, tmp_path, 2, env)
    ma, mb = (_metrics(c.run_dir()) for c in (one, two))
    assert [m["epoch"] for m in mb] == [1, 2]
    for x, y in zip(ma, mb):
        for key in set(x) - {"tokens_per_s"}:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), key
    wa, wb = (torch.load(c.run_dir() / "model.pt", weights_only=True) for c in (one, two))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)
    result = json.loads((two.run_dir() / "result.json").read_text())
    assert result["world_size"] == 2 and len((two.run_dir() / "translations_test_greedy.txt").read_text().splitlines()) == 30

    # with dropout each process draws its own masks, and a checkpoint keeps every rank's
    # RNG: SIGKILLed in its 2nd checkpoint write and resumed, a 2-process run ends exactly
    # as an uninterrupted one
    def dropout(out, **extra):
        cfg = config(out)
        return config_with(cfg.model_dump(mode="json"), model={"name": "transformer-1-16-2"},
                           optim={**cfg.optim.model_dump(mode="json"), "accumulate": 1}, **extra)

    whole = dropout(tmp_path / "whole")
    _run(whole, tmp_path, 2, env)
    cut = dropout(tmp_path / "cut", checkpoint_every_steps=5)
    done = _run(cut, tmp_path, 2, dict(env, KDLAB_TEST_KILL_IN_WRITE="checkpoint.pt:2"), expect_ok=False)
    assert done.returncode != 0
    state = torch.load(cut.run_dir() / "checkpoint.pt", weights_only=False)
    assert state["step_in_epoch"] == 5 and len(state["rank_rng"]) == 2
    assert not torch.equal(state["rank_rng"][0][0], state["rank_rng"][1][0])  # two streams
    _run(cut, tmp_path, 2, env)
    assert _metrics(whole.run_dir()) == _metrics(cut.run_dir())
    wa, wb = (torch.load(c.run_dir() / "model.pt", weights_only=True) for c in (whole, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
