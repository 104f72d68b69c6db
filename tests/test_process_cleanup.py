"""Every process an image-folder run starts dies with it, SIGKILL included: its loader
workers and multiprocessing's resource tracker, also under a killed sweep; and the
killed run prints no traceback.

Real ``kdlab`` processes, real SIGKILLs. The processes to check are the killed one's
descendants just before the kill (found in /proc: after the kill they are re-parented),
each known by (pid, start time), so that a reused pid is not taken for a survivor.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import process_alive, process_descendants, write_image_folder

pytest.importorskip("PIL")
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc to find the processes")

ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
ENV.pop("KDLAB_TEST_KILL_IN_WRITE", None)
GONE_WITHIN = 15.0  # seconds; a worker killed while it imports torch ends once the import is done


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "digits", train_per_class=15, val_per_class=5)


def _survivors(processes: dict) -> dict:
    """Those of ``processes`` still alive after at most GONE_WITHIN seconds."""
    deadline = time.monotonic() + GONE_WITHIN
    while True:
        alive = {pid: info for pid, info in processes.items() if process_alive(pid, info[0])}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _kill(process: subprocess.Popen, when, stderr_path: Path) -> tuple[dict, str]:
    """SIGKILL ``process`` once ``when(descendants)`` is true; (descendants just before the
    kill, the killed process's stderr once they are gone or GONE_WITHIN has passed)."""
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, f"ended before the kill: {stderr_path.read_text()}"
        assert time.monotonic() < deadline, f"the kill point never came: {stderr_path.read_text()}"
        descendants = process_descendants(process.pid)
        if when(descendants):
            break
        time.sleep(0.02)
    descendants = process_descendants(process.pid)  # the freshest snapshot
    process.send_signal(signal.SIGKILL)
    process.wait()
    survivors = _survivors(descendants)
    for pid, (start, _) in survivors.items():  # leave nothing behind, even when failing
        if process_alive(pid, start):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"outlived the killed process: {survivors}"
    return descendants, stderr_path.read_text()


def _workers(descendants: dict) -> list[int]:
    """multiprocessing's processes but its resource tracker: loader workers (a sweep's
    workers, a forkserver if there is one), once they have exec'd Python."""
    return [pid for pid, (_, command) in descendants.items()
            if "multiprocessing" in command and "resource_tracker" not in command]


def _tracker(descendants: dict) -> list[int]:
    return [pid for pid, (_, command) in descendants.items() if "resource_tracker" in command]


def _training(metrics_glob, runs: int, delay: float):
    """A kill point: ``runs`` metrics.jsonl files have a line, then ``delay`` seconds more."""
    since = []

    def when(_):
        if sum(1 for m in metrics_glob() if m.stat().st_size) < runs:
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= delay

    return when


def _train_args(folder: Path, out: Path) -> list[str]:
    return ["data.name=imagefolder", f"data.root={folder}", "data.image_size=16", "data.val_size=12",
            "data.loader_workers=2", "model.name=mlp-16", "optim.epochs=1000", "optim.batch_size=8", "optim.lr=0.02",
            "threads=1", f"out_dir={out}"]


@pytest.mark.parametrize("point", ["loader-start", "training-1s", "training-2.5s"])
def test_a_sigkilled_imagefolder_run_leaves_no_process_and_no_traceback(folder, tmp_path, point):
    out = tmp_path / "runs"
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:  # a file, not a pipe: a survivor would hold a pipe open
        process = subprocess.Popen([sys.executable, "-m", "kdlab", "train", "--no-progress", *_train_args(folder, out)],
                                   cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    if point == "loader-start":  # a worker has started (is still importing, most likely): kill now
        when = lambda descendants: bool(_workers(descendants))  # noqa: E731
    else:
        when = _training(lambda: out.glob("*/metrics.jsonl"), 1, float(point.split("-")[1].rstrip("s")))
    descendants, err = _kill(process, when, stderr_path)
    assert _workers(descendants) and _tracker(descendants), descendants  # the processes in question were there
    if point != "loader-start":
        assert len(_workers(descendants)) >= 2, descendants
    assert "Traceback" not in err, err


def test_a_sigkilled_sweep_of_imagefolder_runs_leaves_no_process_and_no_traceback(folder, tmp_path):
    recipe = {"id": "tiny-cleanup", "title": "kill an image-folder sweep", "source": "tests",
              "scales": {"quick": {"seeds": [0, 1],
                                   "base": {"threads": 1,
                                            "data": {"name": "imagefolder", "root": str(folder), "image_size": 16,
                                                     "val_size": 12, "loader_workers": 2},
                                            "model": {"name": "mlp-16"},
                                            "optim": {"epochs": 1000, "batch_size": 8, "lr": 0.02}},
                                   "stages": [{"name": "net"}]}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "sweep"
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "kdlab", "sweep", str(path), "--workers", "2",
                                    "--out", str(out), "--no-progress"],
                                   cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    descendants, err = _kill(process, _training(lambda: out.glob("*/metrics.jsonl"), 2, 0.5), stderr_path)
    # two sweep workers and, under each, two loader workers; and a resource tracker
    assert len(_workers(descendants)) >= 6 and _tracker(descendants), descendants
    assert "Traceback" not in err, err


def test_a_sigkilled_run_logging_to_wandb_leaves_no_wandb_service(tmp_path):
    """W&B runs its own service (wandb-core, and its system monitor wandb-symon) as children
    of the run: they go with it."""
    pytest.importorskip("wandb")
    out = tmp_path / "runs"
    stderr_path = tmp_path / "stderr.txt"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "kdlab", "train", "--no-progress", "data.name=digits",
                                    "model.name=wrn-10-1", "optim.epochs=1000", "threads=1", f"out_dir={out}",
                                    "logging.wandb=true"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
    when = _training(lambda: out.glob("*/metrics.jsonl"), 1, 0.5)
    descendants, err = _kill(process, when, stderr_path)
    assert any("wandb-core" in command for _, command in descendants.values()), descendants
    assert "Traceback" not in err, err
