"""The cluster of a multi-worker training: TF_CONFIG, read and checked, and the peers, waited for.

TensorFlow's MultiWorkerMirroredStrategy reads the cluster from `TF_CONFIG` and then waits for every
worker without a deadline: a typo in TF_CONFIG or a worker that never starts makes every other
worker hang (measured with TF 2.21: still waiting after 10 minutes, deaf to SIGTERM). So both are
checked here first, in plain Python, before TensorFlow starts its collective ops:

1. `read_cluster` validates TF_CONFIG and says in one line what is wrong with it.
2. `wait_for_peers` waits, up to a deadline, until every other worker accepts a connection on its
   port, and names the ones that never did.

A container platform that starts the workers (the compose `cluster-worker` service, the Kubernetes
Job of deploy/kubernetes) does not write TF_CONFIG itself: it gives each worker its index and the
pattern of the workers' DNS names, and `platform_tf_config` makes the TF_CONFIG from them, the one
place where that is done (`python -m mlflow_project.cluster_worker train`).

Nothing here imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from typing import NoReturn

from pipeline.errors import ClusterConfigError, ClusterUnavailable

logger = logging.getLogger(__name__)

TF_CONFIG = "TF_CONFIG"
CHIEF = "chief"
WORKER = "worker"
TASK_TYPES = (CHIEF, WORKER)
TF_CONFIG_EXAMPLE = json.dumps(
    {"cluster": {WORKER: ["host0:2222", "host1:2222"]}, "task": {"type": WORKER, "index": 0}}
)
# What a platform gives each worker (`platform_tf_config`): its index (Kubernetes' Indexed Job sets
# JOB_COMPLETION_INDEX itself), the number of workers, their host names with `{index}` in place of the
# index, and the port every worker listens on.
WORKER_INDEX_VARIABLES = ("WORKER_INDEX", "JOB_COMPLETION_INDEX")
NUM_WORKERS_VARIABLE = "NUM_WORKERS"
WORKER_HOSTS_VARIABLE = "WORKER_HOSTS"
WORKER_PORT_VARIABLE = "WORKER_PORT"
DEFAULT_WORKER_PORT = 2222
# Seconds between two rounds of connection attempts while waiting for the peers.
POLL_INTERVAL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A multi-worker cluster as TF_CONFIG describes it, seen from one worker.

    Args:
        jobs: task type -> `host:port` of each of its tasks (`chief` holds at most one; `worker` at
            least one), as in TF_CONFIG's `cluster`.
        task_type: this worker's task type, `chief` or `worker`.
        task_index: this worker's index among the tasks of its type.
    """

    jobs: dict[str, tuple[str, ...]]
    task_type: str
    task_index: int

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every worker's address in TensorFlow's order: the chief task (if any), then the workers."""
        return self.jobs.get(CHIEF, ()) + self.jobs[WORKER]

    @property
    def worker_id(self) -> int:
        """This worker's position in `addresses` (TensorFlow's id in cluster)."""
        return len(self.jobs.get(CHIEF, ())) * (self.task_type == WORKER) + self.task_index

    @property
    def num_workers(self) -> int:
        return len(self.addresses)

    @property
    def is_chief(self) -> bool:
        """The `chief` task, or worker 0 when the cluster names no chief (TensorFlow's rule)."""
        return self.worker_id == 0

    @property
    def own_address(self) -> str:
        return self.addresses[self.worker_id]

    @property
    def peers(self) -> dict[int, str]:
        """The other workers, by position in `addresses`."""
        return {index: address for index, address in enumerate(self.addresses) if index != self.worker_id}

    def describe(self) -> str:
        return f"{self.task_type} {self.task_index} ({self.own_address}) of {self.num_workers} workers"


def read_cluster(environ: Mapping[str, str]) -> Cluster:
    """Reads and checks TF_CONFIG from `environ`.

    Raises:
        ClusterConfigError: TF_CONFIG is missing, not JSON, or does not describe a cluster of `chief`
            and `worker` tasks with this worker's task in it.
    """
    text = environ.get(TF_CONFIG, "").strip()
    if not text:
        _invalid("it is not set (strategy=multi_worker reads the cluster from it, on every worker)")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        _invalid(f"it is not JSON ({error})")
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        _invalid("it has no 'cluster' object")
    jobs = _read_jobs(config["cluster"])
    task = config.get("task")
    if not isinstance(task, dict):
        _invalid("it has no 'task' object")
    task_type, index = task.get("type"), task.get("index")
    if not isinstance(task_type, str) or task_type not in jobs:
        _invalid(f"task.type {task_type!r} is not one of the cluster's tasks ({', '.join(jobs)})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(jobs[task_type]):
        _invalid(f"task.index {index!r} is not an index of cluster.{task_type} (0..{len(jobs[task_type]) - 1})")
    return Cluster(jobs=jobs, task_type=task_type, task_index=index)


def _read_jobs(cluster: dict) -> dict[str, tuple[str, ...]]:
    unknown = sorted(set(cluster) - set(TASK_TYPES))
    if unknown:
        _invalid(f"cluster names {', '.join(map(repr, unknown))}; only 'chief' and 'worker' tasks are supported")
    jobs: dict[str, tuple[str, ...]] = {}
    for task_type in TASK_TYPES:
        addresses = cluster.get(task_type)
        if addresses is None:
            continue
        if not isinstance(addresses, list) or not addresses:
            _invalid(f"cluster.{task_type} must be a non-empty list of 'host:port' strings")
        for index, address in enumerate(addresses):
            if split_address(address) is None:
                _invalid(f"cluster.{task_type}[{index}]={address!r} is not 'host:port' (port 1..65535)")
        jobs[task_type] = tuple(addresses)
    if WORKER not in jobs:
        _invalid("cluster.worker is missing")
    if len(jobs.get(CHIEF, ())) > 1:
        _invalid("cluster.chief may hold one address only")
    everyone = [address for addresses in jobs.values() for address in addresses]
    if len(set(everyone)) != len(everyone):
        _invalid("an address appears twice in the cluster")
    return jobs


def split_address(address: object) -> tuple[str, int] | None:
    """'host:port' -> (host, port); '[::1]:2222' -> ('::1', 2222); None when it is not an address."""
    if not isinstance(address, str):
        return None
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        return None
    return host, int(port)


def _invalid(problem: str) -> NoReturn:
    raise ClusterConfigError(f"{TF_CONFIG} is invalid: {problem}; expected e.g. {TF_CONFIG_EXAMPLE}")


def platform_tf_config(environ: Mapping[str, str]) -> str:
    """The TF_CONFIG of one worker that a container platform started, from its environment:
    WORKER_INDEX (or JOB_COMPLETION_INDEX), NUM_WORKERS, WORKER_HOSTS (e.g. `cluster-worker-{index}`)
    and WORKER_PORT (default 2222). Worker 0 is the chief.

    Raises:
        ClusterConfigError: a variable is missing or not what it must be.
    """
    index_text = next((environ[name] for name in WORKER_INDEX_VARIABLES if environ.get(name, "").strip()), "")
    count_text = environ.get(NUM_WORKERS_VARIABLE, "").strip()
    pattern = environ.get(WORKER_HOSTS_VARIABLE, "").strip()
    port_text = environ.get(WORKER_PORT_VARIABLE, "").strip() or str(DEFAULT_WORKER_PORT)
    if not count_text.isdigit() or int(count_text) < 1:
        _platform_invalid(f"{NUM_WORKERS_VARIABLE}={count_text!r} is not a number of workers (1 or more)")
    count = int(count_text)
    if not index_text.isdigit() or int(index_text) >= count:
        _platform_invalid(f"{WORKER_INDEX_VARIABLES[0]}={index_text!r} is not an index of the {count} workers "
                          f"(0..{count - 1})")
    if "{index}" not in pattern:
        _platform_invalid(f"{WORKER_HOSTS_VARIABLE}={pattern!r} does not hold {{index}} where each worker's "
                          "index goes in its host name")
    workers = [f"{pattern.replace('{index}', str(index))}:{port_text}" for index in range(count)]
    text = json.dumps({"cluster": {WORKER: workers}, "task": {"type": WORKER, "index": int(index_text)}})
    read_cluster({TF_CONFIG: text})  # what the training will check: a bad port or host fails here
    return text


def _platform_invalid(problem: str) -> NoReturn:
    raise ClusterConfigError(
        f"the worker's environment does not describe its cluster: {problem}; expected e.g. WORKER_INDEX=0 "
        "NUM_WORKERS=2 WORKER_HOSTS=cluster-worker-{index} WORKER_PORT=2222"
    )


def wait_for_peers(cluster: Cluster, timeout: float) -> None:
    """Returns once every other worker accepts a TCP connection on its port.

    While it waits, this worker answers on its own port, so that workers started together find
    each other whatever their order; the port is free again when this returns, for TensorFlow.

    Args:
        cluster: the cluster, from `read_cluster`.
        timeout: seconds to wait for the slowest peer.

    Raises:
        ClusterConfigError: this worker's own port is taken on this machine.
        ClusterUnavailable: a peer did not answer within `timeout`.
    """
    deadline = time.monotonic() + timeout
    waiting = dict(cluster.peers)
    with _answering(cluster):
        while waiting:
            for index, address in list(waiting.items()):
                if _accepts_connection(address, min(2.0, max(deadline - time.monotonic(), 0.1))):
                    del waiting[index]
            if not waiting:
                break
            if time.monotonic() >= deadline:
                missing = ", ".join(f"worker {index} ({address})" for index, address in waiting.items())
                raise ClusterUnavailable(
                    f"multi_worker: {missing} did not answer within {timeout:g} s; check that every worker "
                    f"was started with the same {TF_CONFIG} cluster and that its port is reachable from "
                    f"{cluster.own_address}"
                )
            time.sleep(POLL_INTERVAL_SECONDS)
    logger.info("Worker %d of %d: all %d peers answer", cluster.worker_id, cluster.num_workers, len(cluster.peers))


def _accepts_connection(address: str, timeout: float) -> bool:
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # refused, timed out, or a name not resolvable yet (a pod not started)
        return False


@contextlib.contextmanager
def _answering(cluster: Cluster) -> Iterator[None]:
    """Accepts connections on this worker's own port while the block runs (and closes them)."""
    _, port = split_address(cluster.own_address)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", port))
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise ClusterConfigError(
                f"{TF_CONFIG} gives this worker ({cluster.describe()}) port {port}, which is already in use "
                "on this machine"
            ) from None
        raise
    listener.listen(64)
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection, contextlib.suppress(OSError):
                connection.settimeout(0.5)
                connection.recv(1)  # let the peer close first: the port keeps no TIME_WAIT of ours

    thread = threading.Thread(target=answer, name="cluster-preflight", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        listener.close()
