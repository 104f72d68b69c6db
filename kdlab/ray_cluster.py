"""Ray clusters for the sweep's ray executor: an address checked before Ray retries it,
Ray's C++ log lines held back while joining, the largest node's GPUs."""

from __future__ import annotations

import contextlib
import os
import sys

from .errors import ConfigError


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A Ray cluster address (``HOST:PORT`` of its GCS, ``ray://HOST:PORT`` of a Ray
    client server) answers a TCP connection within ``timeout_s``: a one-line error
    otherwise, before Ray spends ~20 s retrying. ``auto`` is left to Ray."""
    import socket

    if address in ("auto", "local"):
        return
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--address {address!r}: give the cluster as HOST:PORT (its GCS, e.g. 10.0.0.5:6379) or "
                          "ray://HOST:PORT (a Ray client server), or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({reason} within {timeout_s:g} s); "
                          "check the address and that `ray start --head` runs on that machine") from None


@contextlib.contextmanager
def quiet_stderr(enabled: bool):
    """Hold back what is written to file descriptor 2 (Ray's C++ core logs there) while
    joining a cluster; shown if the join succeeds, dropped if it fails (the error says why)."""
    if not enabled:
        yield
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            raise
        else:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
        finally:
            os.close(saved)


def check_gpus_per_node(ray, gpus: float) -> None:
    """A multi-GPU run needs one node with that many GPUs (torchrun --standalone)."""
    most = max((node.get("Resources", {}).get("GPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if most < gpus:
        raise ConfigError(f"gpus_per_run={gpus:g}: each run is one torchrun on one node, and the largest node of "
                          f"this Ray cluster has {most:g} GPU(s)")
