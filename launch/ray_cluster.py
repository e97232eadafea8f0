"""Connecting to Ray, or starting a local cluster, for qshard's executors and tests.

Everything local stays on loopback. Ray 2.x replaces a 127.0.0.1 address with the machine's
interface address (`resolve_ip_for_localhost`) and its processes listen on all interfaces,
unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` marks the machine single-node: then every Ray
process binds 127.0.0.1. `loopback_env()` gives the variables for `ray start` and child
processes; `pin_loopback()` applies them to this process (also after `import ray`).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from kernels.errors import QShardError

logger = logging.getLogger(__name__)

# NVLink multicast stays off on shared GPU hosts (it can take the host's GPUs out of service).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class RayClusterError(QShardError, RuntimeError):
    """Ray is missing, unreachable, or too small for the request; the message says which."""


def loopback_env() -> dict[str, str]:
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def pin_loopback() -> None:
    os.environ.update(loopback_env())
    import ray._private.ray_constants as ray_constants  # read at call time by ray's services

    ray_constants.ENABLE_RAY_CLUSTER = False


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise RayClusterError("the ray executor needs Ray: pip install 'ray[default]'") from e
    return ray


def _split(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _reachable(host: str, port: int, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _current_cluster_address() -> str | None:
    """What address="auto" will find: RAY_ADDRESS, the file `ray start` writes, or a running GCS."""
    try:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment("auto", None)
    except ConnectionError:
        return None
    except ImportError:  # another Ray version: the documented places only
        if os.environ.get("RAY_ADDRESS"):
            return os.environ["RAY_ADDRESS"]
        try:
            with open(os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")) as f:
                return f.read().strip() or None
        except OSError:
            return None


def connect(address: str | None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            temp_dir: str | None = None, log_to_driver: bool = True, min_local_cpus: int = 0):
    """Join a cluster (address "auto" or host:port) or start a local loopback one (address None
    or "local"); returns (ray module, whether this call started or joined Ray and must end it).

    A local cluster gets num_cpus logical CPUs, or when that is None max(min_local_cpus, this
    machine's cores): Ray's CPUs are only a count for scheduling, and the ranks share the cores
    anyway, so TP=3 on a 2-core machine needs no option."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    if address is None and os.environ.get("RAY_ADDRESS"):
        address = "auto"  # inside `ray job submit`: the job's cluster
    if address in (None, "local"):
        pin_loopback()
        temp_dir = temp_dir or os.path.join(tempfile.gettempdir(), f"qshard-ray-{os.getpid()}")
        if num_cpus is None:
            num_cpus = max(min_local_cpus, os.cpu_count() or 1)
        logger.info("starting a local Ray cluster on loopback (%d CPUs, temp dir %s)", num_cpus, temp_dir)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _temp_dir=temp_dir, object_store_memory=512 * 2**20, log_to_driver=log_to_driver,
                 configure_logging=False)
        return ray, True
    target = _current_cluster_address() if address == "auto" else address
    if target is None:
        raise RayClusterError("no running Ray cluster found for address='auto' (no RAY_ADDRESS and no "
                              "`ray start` cluster on this machine); start one with `ray start --head` or "
                              "let qshard start a local one (ray_address=None)")
    hostport = _split(target.removeprefix("ray://"))
    if hostport is None:
        raise RayClusterError(f"Ray address {target!r} is not host:port")
    host, port = hostport
    # ray.init retries an unreachable GCS for minutes: check the port first.
    if not _reachable(host, port):
        raise RayClusterError(f"the Ray cluster at {host}:{port} is not reachable (nothing listens there); "
                              f"is it running? (`ray status --address {host}:{port}`)")
    if host in LOOPBACK_HOSTS:
        pin_loopback()  # else Ray rewrites 127.0.0.1 to the interface address the GCS does not serve
    kwargs = {"_node_ip_address": "127.0.0.1"} if host in LOOPBACK_HOSTS else {}
    try:
        # "auto" stays "auto": only then does Ray pick up a local cluster's auth token by itself
        # (for an explicit address, set RAY_AUTH_MODE=token when the cluster uses tokens).
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False, **kwargs)
    except Exception as e:
        raise RayClusterError(f"could not join the Ray cluster at {target}: {type(e).__name__}: {e}") from e
    return ray, True
