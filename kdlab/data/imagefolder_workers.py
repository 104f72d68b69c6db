"""The loader workers of an image folder (:mod:`kdlab.data.imagefolder`) die with the
run, SIGKILL included: each is a child of the run process and, from the moment its
dataset is unpickled, watches that process (Linux: a pidfd that a daemon thread waits
on; elsewhere: its parent pid, polled every second) and exits at once, and silently,
when it ends; a worker still importing torch then exits once it is done. Once no worker
holds the resource tracker's pipe, the tracker sees EOF and exits too (cleaning up the
dead run's semaphores, with a warning). A worker whose loader shuts down ends with
``os._exit``, as fork and forkserver children do.

A spawned worker finds ``_watch_run`` (named in the dataset's pickle) and
``_die_with_run`` (its ``worker_init_fn``) in this module, by name.
"""

from __future__ import annotations

import multiprocessing.util
import os
import select
import sys
import threading
import time


class _RunWatch:
    """In a loader worker: has the run process (``pid``, this worker's parent) ended?"""

    def __init__(self, pid: int):
        self.pid, self.pidfd = pid, None
        if os.getppid() != pid:  # the run ended while this worker was starting
            os._exit(0)
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                os._exit(0)
            except OSError:  # an old kernel, a sandbox: poll the parent pid instead
                pass
            if os.getppid() != pid:  # ended before the pidfd was opened (its pid may be another's now)
                os._exit(0)

    def ended(self, timeout: float = 0.0) -> bool:
        """Whether the run has ended, waiting up to ``timeout`` seconds for it to."""
        if self.pidfd is not None:  # readable once the process has exited (a zombie included)
            poll = select.poll()  # one per call: two threads may wait at once
            poll.register(self.pidfd, select.POLLIN)
            return bool(poll.poll(timeout * 1000))
        deadline = time.monotonic() + timeout
        while os.getppid() == self.pid:  # re-parented when the run ends
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return True


_watch: _RunWatch | None = None  # in a loader worker: its watch on the run


def _watch_run(run_pid: int) -> None:
    """In a loader worker (once): exit as soon as the run process ``run_pid`` ends, however
    it ends, and silently: what a thread would print about a pipe or connection the run's
    death broke (multiprocessing's resource sharer, the worker's own start when the run
    died while sending it its dataset) is not printed. Without this, the workers of a
    SIGKILLed run would wait for work forever."""
    global _watch
    if _watch is not None:
        return
    watch = _watch = _RunWatch(run_pid)

    def wait():
        while not watch.ended(3600.0):
            pass
        os._exit(0)

    threading.Thread(target=wait, daemon=True, name="kdlab-run-watch").start()

    def quiet(hook):
        def excepthook(*args):  # sys's (type, value, traceback) or threading's (args)
            if watch.ended(2.0):  # the error may come a moment before the run's end does
                os._exit(0)
            hook(*args)

        return excepthook

    sys.excepthook = quiet(sys.excepthook)  # uncaught errors, and the resource sharer thread's
    threading.excepthook = quiet(threading.excepthook)


class _WatchOnUnpickle:
    """Unpickled (in a loader worker being started) as the call ``_watch_run(pid)``."""

    def __init__(self, pid: int):
        self.pid = pid

    def __reduce__(self):
        return _watch_run, (self.pid,)


def _die_with_run(run_pid: int, worker_id: int) -> None:
    """The loader's ``worker_init_fn``: the watch on the run (set up already, as the
    dataset was unpickled), and the worker's end once its loop returns."""
    _watch_run(run_pid)
    multiprocessing.util.Finalize(None, _end_worker, exitpriority=-100)  # the last of the worker's finalizers


def _end_worker() -> None:
    """Once a worker's loop has returned (the loader shut down), end the process as fork
    and forkserver children end: ``os._exit``, not the interpreter's finalization, which
    kills daemon threads that still run (a queue's feeder thread pickling a batch at
    shutdown) in a way that can abort the process ("terminate called without an active
    exception") and have torch report a dead worker. After an exception, the usual path."""
    if sys.exc_info()[0] is None:  # called by multiprocessing's exit function, from a finally
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(0)
