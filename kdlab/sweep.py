"""Run a recipe's grid: in stage order, each run an ordinary (resumable) run dir.

Executors: ``local`` (N worker processes, the machine's cores split between them; one
in-process worker when N = 1) and ``ray`` (the same runs as Ray tasks with per-run CPU
and GPU resources, on a local Ray instance or a cluster at ``address``). A run whose
``result.json`` exists is skipped; an interrupted one resumes from its checkpoint. A
failed run does not stop the others; the runs that needed it as a teacher are skipped.

Before anything is written, the grid is deduplicated (a ``--set`` can make several runs
one config: it is trained once, and the sweep says how many collapsed) and every
dataset it needs is checked to be there. A run that another process is training (a
second sweep on the same directory) is waited for, with a message, never trained twice.
Local workers die with the sweep, SIGKILL included: each asks the kernel for SIGKILL
when its parent dies (Linux ``PR_SET_PDEATHSIG``) and also watches its parent's pid.
"""

from __future__ import annotations

import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from .errors import ConfigError, KdlabError, RunError, first_line
from .ray_cluster import check_gpus_per_node, check_ray_address, quiet_stderr
from .recipes import Recipe, expand
from .runs import RunLock, atomic_write_json, check_writable_dir, make_dirs, read_json


def _lock_messages(message: str) -> None:
    """A worker's log: silent but for waiting on another process's run."""
    if "waiting for" in message:
        print(f"kdlab: {message}", file=sys.stderr, flush=True)


def _train_config(config_json: dict, threads: int) -> dict:
    """Worker entry point (a separate process or a Ray task): train one config."""
    import torch

    from .config import Config
    from .train import train

    torch.set_num_threads(max(1, threads))
    return train(Config.model_validate(config_json), progress=False, log=_lock_messages, wait_for_lock=True)


def _train_config_processes(config_json: dict, threads: int, processes: int) -> dict:
    """Ray task entry point of a multi-GPU run: ``torchrun --standalone --nproc_per_node=N
    -m kdlab train`` on this node, whose GPUs Ray names in CUDA_VISIBLE_DEVICES (rank i on
    the i-th). The same code path as a run started with torchrun by hand; one node per run."""
    import subprocess
    import tempfile

    from .config import Config

    cfg = Config.model_validate(config_json)
    with tempfile.TemporaryDirectory(prefix="kdlab-run-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(cfg.to_yaml())
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "kdlab", "train", str(path), "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // processes))}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        ours = [line for line in done.stderr.splitlines() if line.startswith("kdlab: error: ")]
        tail = done.stderr.strip().splitlines()[-3:]
        raise RunError(ours[0][len("kdlab: error: "):] if ours else
                       f"torchrun with {processes} processes exited with {done.returncode}: {' | '.join(tail)}")
    return read_json(cfg.run_dir() / "result.json")


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends, however it ends (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        try:  # prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills us when the parent dies
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)

    def watch():  # elsewhere (and as a second guard): poll the parent's pid
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="kdlab-parent-watch").start()


def _init_worker(threads: int, parent_pid: int) -> None:
    import torch

    die_with_parent(parent_pid)
    torch.set_num_threads(max(1, threads))


def unique_runs(runs: list) -> tuple[list, int]:
    """The grid without repeated configs (same run dir), first occurrence kept, and how
    many collapsed into others."""
    seen = {}
    for run in runs:
        seen.setdefault(str(run.run_dir), run)
    return list(seen.values()), len(runs) - len(seen)


def check_data(runs: list) -> None:
    """Every dataset the grid reads is there (before anything is written)."""
    from .data import check_data_source

    checked = set()
    for run in runs:
        key = run.config.data.model_dump_json()
        if key not in checked:
            checked.add(key)
            check_data_source(run.config.data)


def run_sweep(recipe: Recipe, scale: str = "quick", out_dir: str | Path | None = None, *,
              executor: str = "local", workers: int = 1, threads: int | None = None, address: str | None = None,
              settings: list[str] | tuple[str, ...] = (), progress: bool = True, log=print) -> dict:
    """Train every run of ``recipe`` at ``scale`` under ``out_dir``; write ``sweep.json``.

    Local executor: ``workers`` processes with ``threads`` torch threads each (default:
    the cores split evenly; ``benchmarks/sweep_layout.py`` measures the layouts).
    ``settings`` are ``key=value`` overrides for every run (see ``recipes.expand``)."""
    # absolute, so that workers in other directories (Ray) find the same run dirs; the run
    # hash leaves out out_dir and teachers' parent dirs, so this changes no run's identity
    out_dir = Path(out_dir or Path("runs") / f"{recipe.id}-{scale}").resolve()
    grid = expand(recipe, scale, out_dir, settings)
    runs, collapsed = unique_runs(grid)
    _check_sweep(recipe, scale, runs, out_dir, executor, workers, threads, address)
    started = time.perf_counter()
    status: dict[str, str] = {}
    done = sum((r.run_dir / "result.json").is_file() for r in runs)
    if collapsed:
        log(f"{recipe.id} ({scale}): {len(grid)} grid entries are {len(runs)} distinct configs ({collapsed} identical "
            "to others, e.g. after --set): each distinct run is trained once")
    log(f"{recipe.id} ({scale}): {len(runs)} runs in {out_dir}, {done} finished already; "
        f"executor {executor}, {workers} worker(s)")
    bar = tqdm(total=len(runs), initial=done, disable=not progress, unit="run", desc=recipe.id, dynamic_ncols=True)
    submit, shutdown = _executor(executor, workers, address, recipe.scales[scale], threads)
    aborted = True
    try:
        for stage in dict.fromkeys(r.stage for r in runs):
            pending = _submit_stage([r for r in runs if r.stage == stage], status, submit, bar, log)
            _collect_stage(executor, pending, status, bar, log)
        aborted = False
    finally:
        shutdown(aborted)
        bar.close()
    wall = time.perf_counter() - started
    manifest = _manifest(recipe, scale, executor, workers, threads, settings, wall, grid, runs, collapsed, status)
    previous = read_json(out_dir / "sweep.json") if (out_dir / "sweep.json").is_file() else {}
    manifest["wall_time_total_s"] = previous.get("wall_time_total_s", 0.0) + wall
    make_dirs(out_dir, "--out")
    atomic_write_json(out_dir / "sweep.json", manifest)
    failed = sum(s == "failed" for s in status.values())
    log(f"{recipe.id} ({scale}): {sum(s == 'done' for s in status.values())}/{len(runs)} done, {failed} failed, "
        f"{wall:.0f} s")
    return manifest


def _check_sweep(recipe: Recipe, scale: str, runs: list, out_dir: Path, executor: str, workers: int,
                 threads: int | None, address: str | None) -> None:
    """The options, the output directory and every dataset the grid reads (before anything is written)."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if executor not in ("local", "ray"):
        raise ConfigError(f"unknown executor {executor!r}: use local or ray")
    if executor == "ray" and address:
        check_ray_address(address)
    check_writable_dir(out_dir, "--out")
    try:
        check_data(runs)
    except KdlabError as err:
        raise ConfigError(f"recipe {recipe.id} ({scale}): {err}") from None
    check_writable_dir(out_dir, "--out", probe=True)  # (everything checked: the runs write next)


def _submit_stage(stage_runs: list, status: dict, submit, bar, log) -> dict:
    """Submit a stage's runs (future -> run), but for finished runs and those whose
    teacher did not finish (skipped); say so when another process holds a run."""
    pending = {}
    for run in stage_runs:
        key = str(run.run_dir)
        if (run.run_dir / "result.json").is_file():
            status[key] = "done"
            continue
        needed = [("teacher", t) for t in run.teacher_of] + ([("start", run.starts_from)] if run.starts_from else [])
        failed = [(role, t) for role, t in needed if status.get(str(t.run_dir), "done") != "done"]
        if failed:
            status[key] = "skipped"
            role, earlier = failed[0]
            log(f"skip {run.describe()}: {'teacher' if role == 'teacher' else 'the run it starts from'} "
                f"{earlier.describe()} did not finish")
            bar.update(1)
            continue
        holder = RunLock.busy(run.run_dir)
        if holder is not None:
            log(f"{run.describe()} is being trained by {holder}: waiting for it rather than training it twice")
        pending[submit(run)] = run
    return pending


def _collect_stage(executor: str, pending: dict, status: dict, bar, log) -> None:
    """Wait for a stage's runs as they complete; a failed run is logged, not raised."""
    for future in _as_completed(executor, pending):
        run = pending[future]
        try:
            result = _result(executor, future)
            status[str(run.run_dir)] = "done"
            bar.set_postfix_str(f"{run.describe()} test_acc={result['final'].get('test_acc', float('nan')):.4f}")
        except KdlabError as err:
            status[str(run.run_dir)] = "failed"
            log(f"FAILED {run.describe()}: {err}")
        except Exception as err:  # a crash in one run must not lose the others
            status[str(run.run_dir)] = "failed"
            log(f"FAILED {run.describe()}: {type(err).__name__}: {err}")
        bar.update(1)


def _manifest(recipe: Recipe, scale: str, executor: str, workers: int, threads: int | None, settings, wall: float,
              grid: list, runs: list, collapsed: int, status: dict) -> dict:
    return {
        # the recipe snapshot in python mode keeps τ = inf (json writes it as Infinity)
        "recipe": recipe.id, "scale": scale, "recipe_spec": recipe.model_dump(), "executor": executor, "workers": workers,
        "threads": threads, "settings": list(settings),
        "wall_time_s": wall, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "distinct_runs": len(runs), "collapsed_runs": collapsed,
        "runs": [{"stage": r.stage, "labels": r.labels, "seed": r.seed, "run_dir": str(r.run_dir),
                  "status": status.get(str(r.run_dir), "done" if (r.run_dir / "result.json").is_file() else "pending")}
                 for r in grid],
    }


class _Inline:
    """One worker: the run trains in this process's main thread when its turn comes
    (readable tracebacks, and Ctrl-C stops it at once)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def run(self):
        import torch

        threads = torch.get_num_threads()
        try:
            return self.fn(*self.args)
        finally:
            torch.set_num_threads(threads)  # the worker's thread count is the run's, not the caller's


class _LocalPool:
    """N spawned worker processes (cores split). A worker that dies (killed, out of
    memory) breaks a ProcessPoolExecutor for good: its runs fail with a one-line error
    (they resume on the next sweep) and the next submission gets a fresh pool."""

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads
        self.pool = self._new()

    def _new(self):
        return cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_init_worker, initargs=(self.threads, os.getpid()))

    def submit(self, fn, *args):
        try:
            return self.pool.submit(fn, *args)
        except BrokenProcessPool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new()
            return self.pool.submit(fn, *args)

    def stop(self, aborted: bool) -> None:
        """Shut down; when the sweep is aborted (Ctrl-C, an error), kill the workers
        instead of waiting for their runs (each resumes from its last checkpoint)."""
        if not aborted:
            self.pool.shutdown(wait=True, cancel_futures=True)
            return
        workers = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.kill()
        for process in workers:
            process.join(timeout=10)


def _executor(kind: str, workers: int, address: str | None, scale_spec, threads: int | None = None):
    """(submit(run) -> future, shutdown(aborted)) for the chosen executor."""
    cores = os.cpu_count() or 1
    if kind == "local":
        threads = threads or max(1, cores // workers)
        if workers == 1:
            return (lambda run: _Inline(_train_config, run.config.model_dump(mode="json"), threads)), \
                (lambda aborted=False: None)
        pool = _LocalPool(workers, threads)
        return (lambda run: pool.submit(_train_config, run.config.model_dump(mode="json"), threads)), pool.stop
    try:
        import ray
    except ImportError:
        raise ConfigError("the ray executor needs Ray: pip install 'kdlab[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": address} if address else {"num_cpus": max(workers * scale_spec.cpus_per_run, 1)}
        try:
            with quiet_stderr(address is not None):  # a failing join retries for ~20 s, a line per second
                ray.init(log_to_driver=False, include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as err:
            where = f"the Ray cluster at {address}" if address else "a local Ray"
            raise ConfigError(f"could not start or join {where}: {first_line(err)}") from None
    processes = scale_spec.processes_per_run
    if processes > 1:  # N GPUs per run: one torchrun of N processes inside a task that holds them
        check_gpus_per_node(ray, scale_spec.gpus_per_run)
        task = ray.remote(num_cpus=scale_spec.cpus_per_run, num_gpus=scale_spec.gpus_per_run)(_train_config_processes)
        return (lambda run: task.remote(run.config.model_dump(mode="json"), scale_spec.cpus_per_run, processes)), \
            (lambda aborted=False: ray.shutdown() if started_here else None)
    # one process per run; gpus_per_run <= 1 lets several runs share a node's GPUs (or one GPU)
    task = ray.remote(num_cpus=scale_spec.cpus_per_run, num_gpus=scale_spec.gpus_per_run)(_train_config)
    return (lambda run: task.remote(run.config.model_dump(mode="json"), scale_spec.cpus_per_run)), \
        (lambda aborted=False: ray.shutdown() if started_here else None)


def _as_completed(kind: str, pending: dict):
    if kind == "local":
        if all(isinstance(f, _Inline) for f in pending):
            yield from list(pending)  # in submission order, each run when its turn comes
        else:
            yield from cf.as_completed(pending)
        return
    import ray

    remaining = list(pending)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        yield ready[0]


def _result(kind: str, future) -> dict:
    if kind == "local":
        if isinstance(future, _Inline):
            return future.run()
        try:
            return future.result()
        except BrokenProcessPool:
            raise RunError("its worker process died (killed, or out of memory); run the sweep again to resume "
                           "it from its last checkpoint") from None
    import ray

    try:
        return ray.get(future)
    except ray.exceptions.RayTaskError as err:
        cause = err.as_instanceof_cause()
        raise cause if isinstance(cause, KdlabError) else RuntimeError(str(err).splitlines()[0]) from None
