"""Where a training runs: TensorFlow's own distribution strategies, chosen by the `strategy` parameter.

- `default`: no strategy; the training is exactly the single-device one.
- `mirrored`: `tf.distribute.MirroredStrategy` over every local device (the GPUs, else the CPUs, so
  logical CPU devices count), in one process.
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy`, one process per worker, the cluster
  from TF_CONFIG (see `pipeline.training.cluster`).

A training is planned first (`plan_distribution`: which strategy, is this worker the chief), and the
strategy is started only when the worker is ready to train (`DistributionPlan.start`): a
multi-worker strategy is a barrier that waits for every worker, so a worker must not enter it and
then fail on bad data. The global batch is `batch_size`, split across all replicas; the data is
sharded per worker by tf.data (AutoShardPolicy.DATA over identically shuffled datasets), so each
example is seen once per epoch across the cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from pipeline.callbacks.worker_timing import gather_per_worker
from pipeline.config import DEFAULT_STRATEGY, MIRRORED_STRATEGY, MULTI_WORKER_STRATEGY, TrainingConfig
from pipeline.errors import ClusterConfigError, ClusterUnavailable, ParameterError, first_line
from pipeline.training.cluster import Cluster, read_cluster, wait_for_peers

logger = logging.getLogger(__name__)

# Seconds a worker waits for the other workers to answer before it gives up.
PEER_TIMEOUT_SECONDS = 120.0
# What TensorFlow raises in a worker whose peer died or was cut off during training.
PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError)
_FAILED_TASK = re.compile(r"/job:(chief|worker)/replica:\d+/task:(\d+)")
_REMOTE_TASK = re.compile(r"remote target /job:(chief|worker)/replica:\d+/task:(\d+)")
_ABORT_REASON = re.compile(r"aborted by: (.+)")


@dataclasses.dataclass(frozen=True)
class DistributionPlan:
    """What the `strategy` parameter and TF_CONFIG ask for, before any of it is started.

    Args:
        name: the `strategy` parameter's value.
        cluster: the multi-worker cluster, or None for a single-process training.
    """

    name: str
    cluster: Cluster | None = None

    @property
    def is_chief(self) -> bool:
        """Whether this worker records the run (always, unless it is a non-chief multi-worker task)."""
        return self.cluster is None or self.cluster.is_chief

    def start(
        self, config: TrainingConfig, data_digest: str, peer_timeout: float = PEER_TIMEOUT_SECONDS
    ) -> Distribution:
        """Creates the strategy; for a multi-worker one, first waits for every peer to answer, then
        checks that all workers train the same thing (workers that disagree would wait forever).

        Args:
            config: this worker's training parameters.
            data_digest: the digest of this worker's data (`dataset` paths may differ per machine).
            peer_timeout: seconds to wait for the slowest peer.

        Raises:
            ClusterUnavailable: a peer did not answer within `peer_timeout` seconds.
            ClusterConfigError: another worker was started with other parameters or data.
            ParameterError: `batch_size` cannot be split evenly across the replicas.
        """
        distribution = self._start(peer_timeout)
        if distribution.cluster is not None:
            distribution.check_workers_agree(config, data_digest)
        if config.batch_size % distribution.num_replicas:
            raise ParameterError(
                "batch_size", config.batch_size,
                f"a multiple of the {distribution.num_replicas} replicas of strategy={self.name} (the global "
                "batch is split evenly across them)",
            )
        return distribution

    def _start(self, peer_timeout: float) -> Distribution:
        if self.name == DEFAULT_STRATEGY:
            return Distribution(self.name, strategy=None)
        if self.name == MIRRORED_STRATEGY:
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            return Distribution(self.name, tf.distribute.MirroredStrategy([device.name for device in devices]))
        wait_for_peers(self.cluster, peer_timeout)
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({job: list(addresses) for job, addresses in self.cluster.jobs.items()}),
            task_type=self.cluster.task_type,
            task_id=self.cluster.task_index,
            rpc_layer="grpc",
        )
        return Distribution(self.name, KerasMultiWorkerMirroredStrategy(cluster_resolver=resolver), self.cluster)


def plan_distribution(name: str, environ: Mapping[str, str]) -> DistributionPlan:
    """Plans a training for strategy `name`; for `multi_worker`, reads and checks TF_CONFIG.

    Raises:
        ClusterConfigError: `multi_worker` with a missing or invalid TF_CONFIG.
    """
    if name != MULTI_WORKER_STRATEGY:
        if environ.get("TF_CONFIG"):
            logger.warning("TF_CONFIG is set but strategy=%s: this process trains alone", name)
        return DistributionPlan(name)
    cluster = read_cluster(environ)
    logger.info("Multi-worker training: this is %s%s", cluster.describe(), " (chief)" if cluster.is_chief else "")
    return DistributionPlan(name, cluster)


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A started strategy, and what the training needs to know about it.

    Args:
        name: the `strategy` parameter's value.
        strategy: the tf.distribute strategy, or None for the default (single-device) training.
        cluster: the cluster of a multi-worker training, or None.
    """

    name: str
    strategy: tf.distribute.Strategy | None
    cluster: Cluster | None = None

    @property
    def num_workers(self) -> int:
        return self.cluster.num_workers if self.cluster else 1

    @property
    def worker_id(self) -> int:
        """This process' position among the workers (0 is the chief)."""
        return self.cluster.worker_id if self.cluster else 0

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync if self.strategy else 1

    def scope(self) -> contextlib.AbstractContextManager:
        """Where the model must be built and compiled."""
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def fit_inputs(
        self, splits: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], batch_size: int, seed: int
    ) -> dict[str, Any]:
        """The data arguments of `model.fit`.

        Without a strategy: the arrays, as Keras takes them. With one: tf.data datasets of global
        batches, shuffled with `seed` (the same order on every worker, new each epoch) and sharded
        per worker by data, so that the workers' shards partition each epoch.
        """
        x_train, y_train, x_val, y_val = splits
        if self.strategy is None:
            return {"x": x_train, "y": y_train, "batch_size": batch_size, "validation_data": (x_val, y_val)}
        return {
            "x": sharded_batches(x_train, y_train, batch_size, shuffle_seed=seed),
            "validation_data": sharded_batches(x_val, y_val, batch_size),
            "shuffle": False,  # the dataset shuffles itself, identically on every worker
        }

    def check_workers_agree(self, config: TrainingConfig, data_digest: str) -> None:
        """Raises ClusterConfigError when a worker's parameters or data differ from the chief's."""
        what = {**config.as_params(), "dataset": data_digest}
        fingerprint = int.from_bytes(hashlib.sha256(json.dumps(what).encode()).digest()[:7], "big")
        everyone = gather_per_worker(self.strategy, fingerprint, self.num_workers, dtype=tf.int64)
        # every worker may stop right after the check (disagreeing workers, a batch_size the replicas cannot split)
        self._wait_until_everyone_knows()
        differing = [str(worker) for worker, value in enumerate(everyone) if value != everyone[0]]
        if differing:
            raise ClusterConfigError(
                f"multi_worker: {'worker' if len(differing) == 1 else 'workers'} {', '.join(differing)} of "
                f"{self.num_workers} started with other parameters or data than worker 0; start every worker "
                "with the same ones"
            )

    def _wait_until_everyone_knows(self) -> None:
        """Returns once every worker holds the result of the last collective, before this one leaves: a peer may
        still be reading it from this worker (a CI run beside a training had worker 1 fail with TensorFlow's
        "Socket closed" when the chief stopped at once). A second collective is the barrier: no worker finishes it
        before every worker has started it. Its own failure is ignored: a peer that finished it first may be gone."""
        try:
            gather_per_worker(self.strategy, 0, self.num_workers, dtype=tf.int64)
        except tf.errors.OpError as error:
            logger.debug("a peer left during the last barrier: %s", first_line(error))

    def share_from_chief(self, payload: bytes | None) -> bytes | None:
        """The chief's `payload` on every worker (what the others pass is ignored), through two
        collectives: every worker must call it at the same point. Without a cluster, `payload` itself."""
        if self.cluster is None:
            return payload
        own_size = len(payload) if self.cluster.is_chief and payload is not None else -1
        size = int(gather_per_worker(self.strategy, own_size, self.num_workers, dtype=tf.int64)[0])
        if size <= 0:
            return None if size < 0 else b""
        words = -(-size // 4)  # sent as int32 words: the collectives take no bytes
        own = np.zeros(words * 4, dtype=np.uint8)
        if own_size >= 0:
            own[:size] = np.frombuffer(payload, dtype=np.uint8)
        per_replica = self.strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant(own.view(np.int32)[np.newaxis, :])
        )
        return self.strategy.gather(per_replica, axis=0).numpy()[0].tobytes()[:size]

    @contextlib.contextmanager
    def peer_failures(self) -> Iterator[None]:
        """Turns TensorFlow's error about a lost peer (dead, killed, cut off) into one line."""
        if self.cluster is None:
            yield
            return
        try:
            yield
        except PEER_FAILURES as error:
            raise ClusterUnavailable(
                f"multi_worker: lost {_lost_peer(error.message or str(error), self.cluster)} during training; "
                "the whole training stops: start every worker again with the chief's run id to continue it"
            ) from None


def _lost_peer(message: str, cluster: Cluster) -> str:
    """'worker 1 (host:port) (why)' from TensorFlow's error text, as far as it tells: the task the gRPC error came
    from ("remote target /job:..."), else the first task named that is another worker of the cluster (the text
    may name this worker's own task too, e.g. as the device of the aborted collective)."""
    reason = _ABORT_REASON.search(message)
    who = "contact with another worker"
    for task in [*_REMOTE_TASK.finditer(message), *_FAILED_TASK.finditer(message)]:
        task_type, index = task.group(1), int(task.group(2))
        own = (task_type, index) == (cluster.task_type, cluster.task_index)
        if not own and task_type in cluster.jobs and index < len(cluster.jobs[task_type]):
            who = f"{task_type} {index} ({cluster.jobs[task_type][index]})"
            break
    return f"{who} ({reason.group(1).strip()[:160] if reason else message.strip().splitlines()[0][:160]})"


def sharded_batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Global batches of (x, y), auto-sharded by data across workers; shuffled each epoch with
    `shuffle_seed` when given (every worker must use the same seed, or the shards would overlap)."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(x), seed=shuffle_seed, reshuffle_each_iteration=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.batch(batch_size).with_options(options).prefetch(tf.data.AUTOTUNE)


class KerasMultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose `reduce` accepts what Keras 3 passes it.

    Keras 3.15's TensorFlow trainer calls `strategy.reduce` with a nest (the first batch, to build
    the model symbolically) and, in multi-worker mode only, with `axis=0` on scalar step outputs;
    the multi-worker strategy refuses both, so `model.fit` fails before its first step
    (keras-team/keras#20585). This strategy reduces a nest element by element and a scalar across
    replicas only (as Keras does itself for a single worker); it is otherwise
    MultiWorkerMirroredStrategy.
    """

    def reduce(self, reduce_op: tf.distribute.ReduceOp | str, value: Any, axis: int | None) -> Any:
        def reduce_one(item: Any) -> tf.Tensor:
            local = self.experimental_local_results(item)[0]
            item_axis = None if tf.convert_to_tensor(local).shape.rank == 0 else axis
            return super(KerasMultiWorkerMirroredStrategy, self).reduce(reduce_op, item, item_axis)

        return tf.nest.map_structure(reduce_one, value)
