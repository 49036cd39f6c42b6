"""Distributed training, with real processes on loopback: `mirrored` over two logical CPUs,
`multi_worker` with two worker processes, one MLflow run per training, bounded failures."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from mlflow_project.cli import cli
from mlflow_project.common import import_tensorflow_quietly
from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.tracking.store import prepare_sqlite_store
from pipeline.training.data import load_dataset
from pipeline.training.run import run_training
from tests.helpers import MNIST_SMALL, cli_options, free_ports, new_sqlite_store, project_env, stdout_lines, tf_config
from tests.run_contract import CALLBACKS, assert_run_contract, small_config

EPOCHS = "3"
DISTRIBUTED_CALLBACKS = CALLBACKS.replace("BatchTiming,", "BatchTiming,WorkerTiming,")

# Training with MirroredStrategy over two logical CPU devices. They must be configured before
# TensorFlow initializes its devices, so this runs in a fresh process, not in pytest's. The same process
# proves that a training never needs matplotlib (the plots are drawn by a child process, PlotProcess): it is
# made unimportable there (Keras 3 itself imports matplotlib.pyplot when it can, and does without it), and the
# run contract requires both plots.
MIRRORED_SCRIPT = """
import sys
sys.modules["matplotlib"] = None  # any import of matplotlib now raises ImportError
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.config import TrainingConfig
from pipeline.training.run import run_training

result = run_training(TrainingConfig.from_values(dict(arg.split("=", 1) for arg in sys.argv[1:])))
print("RUN", result.run_id)
"""

# One epoch of the training input pipeline on one worker of a 2-worker cluster: the example ids it saw.
SHARD_SCRIPT = """
import json, os
import numpy as np
from pipeline.config import TrainingConfig
from pipeline.training.distribution import plan_distribution, sharded_batches

plan = plan_distribution("multi_worker", os.environ)
distribution = plan.start(TrainingConfig.from_values({"batch_size": "8"}), "ids", peer_timeout=60)
ids = np.arange(100, dtype=np.float32).reshape(-1, 1)
dataset = distribution.strategy.experimental_distribute_dataset(sharded_batches(ids, ids, 8, shuffle_seed=7))
epochs = []
for _ in range(2):
    seen = []
    for x, _ in dataset:
        for local in distribution.strategy.experimental_local_results(x):
            seen += local.numpy().ravel().astype(int).tolist()
    epochs.append(seen)
print(json.dumps(epochs))
"""


def _config(**values: str) -> TrainingConfig:
    return small_config(**({"epochs": EPOCHS} | values))


def _train_args(config: TrainingConfig) -> list[str]:
    return ["train", *cli_options(config.as_params())]


def _start_workers(
    configs: list[TrainingConfig], root: Path, chief_store: str, extra: tuple[str, ...] | list[str] = ()
) -> tuple[list[subprocess.Popen], list[Path], list[int]]:
    """Two `python -m mlflow_project train` workers on 127.0.0.1 (worker i trains `configs[i]`), each in
    its own directory, with `extra` arguments; only the chief gets a usable tracking store: the other one is
    pointed at a port where nothing answers."""
    ports = free_ports(3)
    workers, dirs = [], []
    for index, store in enumerate([chief_store, f"http://127.0.0.1:{ports[2]}"]):
        directory = root / f"worker{index}"
        directory.mkdir(parents=True)
        worker_env = project_env(TF_CONFIG=tf_config(ports[:2], index), MLFLOW_TRACKING_URI=store)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "mlflow_project", *_train_args(configs[index]), *extra], cwd=directory,
            env=worker_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
        dirs.append(directory)
    return workers, dirs, ports[:2]


def _finish(processes: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    """Each process' exit code, stdout and stderr; any still running after `timeout` is killed."""
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            results.append((process.returncode, out, err))
    finally:
        _kill(processes)
    return results


def _kill(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()  # not SIGTERM: a worker waiting in TensorFlow's collective ops ignores it
            process.communicate(timeout=60)


def _wait_for_line(process: subprocess.Popen, prefix: str, timeout: float) -> None:
    """Returns once the process printed a line starting with `prefix`; fails after `timeout` seconds or
    when its output ends first. Its stdout is read in a thread (also afterwards, so it never blocks on
    a full pipe); the process' stdout must not be read elsewhere."""
    lines = stdout_lines(process)
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            line = ""  # never read from a pipe: lines end with a newline
        if line == "":
            pytest.fail(f"no line starting with {prefix!r} within {timeout:g} s; printed: {''.join(seen)[-2000:]}")
        if line is None:
            pytest.fail(f"the output ended before a line starting with {prefix!r}; printed: {''.join(seen)[-2000:]}")
        seen.append(line)
        if line.startswith(prefix):
            return


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and stderr.rstrip().endswith(ours[0]), stderr
    return ours[0]


def _only_run(client: MlflowClient):
    [run] = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """A `default` (single-device) training of the same config: what the distributed ones must match."""
    directory = tmp_path_factory.mktemp("default")
    uri = new_sqlite_store(directory)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(directory)
        mlflow.set_tracking_uri(uri)
        try:
            result = run_training(_config(), experiment_name="reference")
            probabilities = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model").predict(
                load_dataset(str(MNIST_SMALL)).x_test
            )
        finally:
            mlflow.set_tracking_uri(None)
    return {"test_accuracy": result.test_accuracy, "probabilities": probabilities}


def _assert_predicts_like(reference: dict, run_id: str) -> None:
    """Same quality as the single-device model, on the same test images (not the same numbers:
    the per-replica batches change the rounding)."""
    dataset = load_dataset(str(MNIST_SMALL))
    probabilities = mlflow.pyfunc.load_model(f"runs:/{run_id}/model").predict(dataset.x_test)
    labels = dataset.y_test.argmax(axis=1)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
    assert accuracy > 0.75 and abs(accuracy - reference["test_accuracy"]) <= 0.05, (accuracy, reference)
    agreement = float(np.mean(probabilities.argmax(axis=1) == reference["probabilities"].argmax(axis=1)))
    assert agreement >= 0.85, agreement


def _assert_worker_timing(client: MlflowClient, run_id: str, workdir: Path, num_workers: int) -> None:
    completed = int(client.get_run(run_id).data.metrics[names.EPOCHS_COMPLETED])
    slowest = client.get_metric_history(run_id, names.SLOWEST_WORKER_EPOCH_SECONDS)
    own = client.get_metric_history(run_id, names.EPOCH_SECONDS)
    assert [m.step for m in slowest] == list(range(completed))
    assert all(s.value >= o.value * (1 - 1e-6) for s, o in zip(slowest, own, strict=True))  # the chief is one of them
    timing = json.loads(Path(client.download_artifacts(run_id, names.WORKER_TIMING_FILE, str(workdir))).read_text())
    assert [row["epoch"] for row in timing] == list(range(completed))
    assert all(len(row["seconds"]) == num_workers for row in timing)
    assert [max(row["seconds"]) for row in timing] == pytest.approx([m.value for m in slowest], rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(600)  # its own bounds on the processes it waits for add up to more than 300 s
def test_mirrored_over_two_logical_cpus_without_matplotlib_records_two_replicas_and_learns_like_default(
    sqlite_store, tmp_path, reference
):
    config = _config(strategy="mirrored")
    values = [f"{name}={value}" for name, value in config.as_params().items()]
    result = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, *values], cwd=tmp_path,
        env=project_env(MLFLOW_TRACKING_URI=sqlite_store), capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = result.stdout.split("RUN ")[-1].strip()
    client = MlflowClient()
    derived = {names.PARAM_NUM_REPLICAS: "2", names.PARAM_NUM_WORKERS: "1"}
    assert_run_contract(
        client, run_id, config, tmp_path / "check", derived_params=derived, callbacks=DISTRIBUTED_CALLBACKS
    )
    _assert_worker_timing(client, run_id, tmp_path / "timing", num_workers=1)
    _assert_predicts_like(reference, run_id)


@pytest.mark.slow
@pytest.mark.timeout(600)  # its own bounds on the processes it waits for add up to more than 300 s
def test_two_workers_train_one_run_recorded_by_the_chief_alone(sqlite_store, tmp_path, reference):
    config = _config(strategy="multi_worker")
    workers, dirs, _ = _start_workers([config, config], tmp_path / "workers", sqlite_store)
    (chief_code, chief_out, chief_err), (worker_code, worker_out, worker_err) = _finish(workers)
    assert chief_code == 0, chief_err[-3000:]
    assert worker_code == 0, worker_err[-3000:]
    # no error of ours (one line starting "error: "); TensorFlow's own gRPC log may say "last error: ..."
    # when the chief has already gone, as it does under load
    assert "Traceback" not in worker_err
    assert [line for line in worker_err.splitlines() if line.startswith("error: ")] == [], worker_err[-3000:]
    assert f"Worker 1 of 2: trained {EPOCHS} epochs; the chief (worker 0) records the run" in worker_out
    assert list(dirs[1].iterdir()) == []  # the worker left nothing behind and never reached a store

    client = MlflowClient()
    run = _only_run(client)  # exactly one run, whatever the number of workers
    assert f"Run {run.info.run_id}: " in chief_out
    derived = {names.PARAM_NUM_REPLICAS: "2", names.PARAM_NUM_WORKERS: "2"}
    assert_run_contract(
        client, run.info.run_id, config, tmp_path / "check", derived_params=derived, callbacks=DISTRIBUTED_CALLBACKS
    )
    assert run.data.params["strategy"] == "multi_worker"
    _assert_worker_timing(client, run.info.run_id, tmp_path / "timing", num_workers=2)
    _assert_predicts_like(reference, run.info.run_id)


@pytest.mark.slow
def test_each_example_is_seen_once_per_epoch_across_the_workers(tmp_path):
    ports = free_ports(2)
    shards = _finish([
        subprocess.Popen(
            [sys.executable, "-c", SHARD_SCRIPT], cwd=tmp_path, env=project_env(TF_CONFIG=tf_config(ports, index)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for index in range(2)
    ], timeout=120)
    assert all(code == 0 for code, _, _ in shards), [err[-2000:] for _, _, err in shards]
    seen = [json.loads(out.splitlines()[-1]) for _, out, _ in shards]  # worker -> epoch -> ids
    for epoch in range(2):
        first, second = seen[0][epoch], seen[1][epoch]
        assert len(first) == len(second) == 50
        assert sorted(first + second) == list(range(100))  # a partition: each example once
    assert seen[0][0] != seen[0][1]  # reshuffled each epoch
    assert seen[0][0] != sorted(seen[0][0])


def test_a_worker_that_never_comes_gives_one_line_in_bounded_time_and_no_run(sqlite_store):
    # In pytest's process: the wait fails before TensorFlow starts any collective op. TensorFlow is
    # imported and the store created before the clock starts: what is bounded is the wait, not an
    # import or a database migration on a loaded machine.
    import_tensorflow_quietly()
    prepare_sqlite_store(sqlite_store)
    ports = free_ports(2)
    started = time.monotonic()
    result = CliRunner().invoke(cli, _train_args(_config(strategy="multi_worker")), env={
        "TF_CONFIG": tf_config(ports, 0), "MNIST_PIPELINE_PEER_TIMEOUT": "3", "MLFLOW_RUN_ID": "",
    })
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    # the timeout, and slack for a loaded machine (CI with a training beside it: 45.8 s, store included);
    # without the timeout TensorFlow waits for the worker for good
    assert 3 <= time.monotonic() - started < 3 + 60
    line = _one_line_error(result.stderr)
    assert f"worker 1 (127.0.0.1:{ports[1]}) did not answer within 3 s" in line
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_invalid_tf_config_gives_one_line_and_exit_2(tmp_path):
    bad = json.dumps({"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "worker", "index": 1}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(cli, _train_args(_config(strategy="multi_worker")), env={
        "TF_CONFIG": bad, "MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": "",
    })
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    line = _one_line_error(result.stderr)
    assert "TF_CONFIG is invalid: task.index 1 is not an index of cluster.worker (0..0)" in line
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_workers_started_with_other_parameters_stop_in_one_line_before_any_run(sqlite_store, tmp_path):
    configs = [_config(strategy="multi_worker"), _config(strategy="multi_worker", epochs="4")]
    workers, _, _ = _start_workers(configs, tmp_path / "workers", sqlite_store)
    for code, _, err in _finish(workers, timeout=120):
        assert code == 2, err[-3000:]
        assert "worker 1 of 2 started with other parameters or data than worker 0" in _one_line_error(err)
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


@pytest.mark.slow
@pytest.mark.timeout(900)  # two multi-worker trainings, each bounded below
def test_a_run_that_lost_a_worker_continues_in_the_same_run_on_every_worker(sqlite_store, tmp_path):
    """A worker lost during training stops the chief within a minute, in one line, and the run is FAILED.
    Then Keras' BackupAndRestore across workers: the chief's saved state goes to every worker, all of them go on
    from the epoch after it, and the run holds each epoch once, its curve going on (not starting over)."""
    epochs = 8
    config = _config(strategy="multi_worker", epochs=str(epochs), target_accuracy="0", es_patience="50",
                     lr_patience="50")
    workers, _, ports = _start_workers([config, config], tmp_path / "first", sqlite_store)
    try:
        _wait_for_line(workers[1], "Epoch 3:", timeout=240)
        workers[1].kill()
        workers[1].wait(timeout=60)
        killed = time.monotonic()
        [(code, _, err)] = _finish(workers[:1], timeout=120)
    finally:
        _kill(workers)
    assert code == 1 and f"lost worker 1 (127.0.0.1:{ports[1]})" in _one_line_error(err)
    assert time.monotonic() - killed < 60
    client = MlflowClient()
    run_id = _only_run(client).info.run_id
    assert client.get_run(run_id).info.status == "FAILED"
    before = [m.value for m in client.get_metric_history(run_id, names.LOSS)]
    assert 2 <= len(before) < epochs

    workers, _, _ = _start_workers([config, config], tmp_path / "again", sqlite_store, ["--run-id", run_id])
    (chief_code, chief_out, chief_err), (worker_code, worker_out, worker_err) = _finish(workers)
    assert (chief_code, worker_code) == (0, 0), (chief_err[-3000:], worker_err[-3000:])
    assert f"Run {run_id}: " in chief_out
    assert f"Worker 1 of 2: trained {epochs - len(before)} epochs" in worker_out
    run = _only_run(client)
    assert (run.info.run_id, run.info.status) == (run_id, "FINISHED")
    assert run.data.tags[names.TAG_RESUMED_FROM_EPOCH] == str(len(before))
    for key in names.EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(epochs)), key
    loss = [m.value for m in client.get_metric_history(run_id, names.LOSS)]
    assert loss[:len(before)] == before
    # the curve goes on from the restored weights: a new start would be back at the first epoch's loss
    assert loss[len(before)] < (before[0] + before[-1]) / 2, loss
