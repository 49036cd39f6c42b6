"""The cluster on the team stack, for real: separate containers on the compose network as the machines of
a `multi_worker` training and of a shared sweep, started from the host with the documented commands
(`make cluster-train`, `make cluster-sweep`; docs/scaling-out.md, "A cluster on the team stack") and
checked in the stack's tracking server through the proxy, as test_compose_stack.py does.

Marker `compose`, run by `make test-compose`, with the same engine, images and MNIST_COMPOSE_EXTRA_FILES as
test_compose_stack.py (whose stack helpers this module uses, on a stack of its own). The tests share one
stack and run in file order.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from pipeline import constants as names
from pipeline.config import TrainingConfig
from tests.helpers import MNIST_SMALL, PROJECT_DIR, rest_of_lines, stdout_lines
from tests.run_contract import CALLBACKS, assert_run_contract
from tests.test_compose_stack import (
    EXPERIMENT,
    EXTRA_FILES,
    PROJECT_NAME,
    Stack,
    running_stack,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1800)]

DISTRIBUTED_CALLBACKS = CALLBACKS.replace("BatchTiming,", "BatchTiming,WorkerTiming,")
DATASET = str(MNIST_SMALL.resolve())  # mounted into every container at the same path
# The docs promise: a lost worker stops the others within this many seconds.
LOST_WORKER_SECONDS = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("compose-cluster"), "cluster") as running:
        yield running


def _make_command(stack: Stack, target: str, **variables: str) -> tuple[list[str], dict[str, str]]:
    """`make TARGET VARIABLE=value ...` as docs/scaling-out.md shows it, pointed at this test's stack."""
    compose = ["docker", "compose", "--project-name", PROJECT_NAME, "--project-directory", str(PROJECT_DIR),
               "--env-file", str(stack.env_file), "--file", str(PROJECT_DIR / "docker-compose.yml")]
    for extra in filter(None, os.environ.get(EXTRA_FILES, "").split(":")):
        compose += ["--file", extra]
    command = ["make", "--no-print-directory", target, *(f"{name}={value}" for name, value in variables.items()),
               f"COMPOSE={' '.join(compose)}"]
    environment = {k: v for k, v in os.environ.items() if k not in stack.settings}  # only the .env file speaks
    return command, environment


def _make(stack: Stack, target: str, timeout: float = 900, **variables: str) -> subprocess.CompletedProcess:
    command, environment = _make_command(stack, target, **variables)
    return subprocess.run(command, cwd=PROJECT_DIR, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def _chief_run_id(output: str) -> str:
    [run_id] = re.findall(r"^\[worker 0\] Run (\w+): test_accuracy=", output, flags=re.MULTILINE)
    return run_id


def _cluster_containers(stack: Stack, service: str) -> list:
    return stack.engine.containers.list(filters={"label": [f"com.docker.compose.project={PROJECT_NAME}",
                                                           f"com.docker.compose.service={service}"]})


def _training_config(**values: str) -> TrainingConfig:
    return TrainingConfig.from_values({"strategy": "multi_worker", "dataset": DATASET} | values)


@pytest.fixture(scope="module")
def cluster_training(stack: Stack) -> subprocess.CompletedProcess:
    """The documented command: two worker containers, three epochs, the local data mounted."""
    result = _make(stack, "cluster-train", WORKERS="2", EPOCHS="3", DATASET=DATASET)
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-3000:])
    return result


def test_two_containers_train_one_run_with_the_whole_contract_on_the_stacks_server(stack, cluster_training, tmp_path):
    output = cluster_training.stdout
    # each worker's TF_CONFIG names both containers by their compose DNS names
    for index in range(2):
        assert re.search(rf'^\[worker {index}\] TF_CONFIG=.*"cluster-worker-0:2222", "cluster-worker-1:2222".*'
                         rf'"index": {index}', output, re.MULTILINE), output
    assert "[worker 1] Worker 1 of 2: trained 3 epochs; the chief (worker 0) records the run" in output
    run_id = _chief_run_id(output)
    client = stack.client()
    config = _training_config(epochs="3")
    derived = {names.PARAM_NUM_REPLICAS: "2", names.PARAM_NUM_WORKERS: "2"}
    assert_run_contract(client, run_id, config, tmp_path, derived_params=derived, callbacks=DISTRIBUTED_CALLBACKS)
    run = client.get_run(run_id)
    # one run, recorded with the training account into the stack's experiment
    assert run.info.user_id == stack.training[0]
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert run.info.experiment_id == experiment.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    # the workers are gone: nothing of the cluster is left running
    assert _cluster_containers(stack, "cluster-worker") == []


@pytest.mark.timeout(1200)
def test_a_killed_worker_stops_the_other_in_one_line_and_the_same_command_continues_the_run(stack, tmp_path):
    epochs = 12
    variables = dict(WORKERS="2", EPOCHS=str(epochs), DATASET=DATASET,
                     ARGS="--target-accuracy 0 --es-patience 50 --lr-patience 50 --batch-size 32")
    command, environment = _make_command(stack, "cluster-train", **variables)
    process = subprocess.Popen(command, cwd=PROJECT_DIR, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines, seen = stdout_lines(process), []
    try:
        deadline = time.monotonic() + 600
        while not any(line.startswith("[worker 1] Epoch 3:") for line in seen):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "".join(seen)[-4000:]
            seen.append(line)
        [worker] = [container for container in _cluster_containers(stack, "cluster-worker")
                    if "WORKER_INDEX=1" in container.attrs["Config"]["Env"]]
        worker.kill()
        killed = time.monotonic()
        process.wait(timeout=LOST_WORKER_SECONDS + 60)
        stopped = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest_of_lines(lines)
    assert process.returncode != 0
    assert stopped < LOST_WORKER_SECONDS, stopped
    errors = [line for line in output.splitlines() if line.startswith("[worker 0] error: ")]
    assert len(errors) == 1, output[-4000:]
    assert re.search(r"lost worker 1 \(cluster-worker-1:2222\) \(.+\) during training", errors[0]), errors
    client = stack.client()
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                              filter_string=f"params.epochs = '{epochs}'")
    [run] = runs
    run_id = run.info.run_id
    assert run.info.status == "FAILED"
    before = [m.value for m in client.get_metric_history(run_id, names.LOSS)]
    assert 2 <= len(before) < epochs

    # the same command with the run id
    result = _make(stack, "cluster-train", RUN_ID=run_id, **variables)
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-3000:])
    assert _chief_run_id(result.stdout) == run_id
    assert f"[worker 1] Worker 1 of 2: trained {epochs - len(before)} epochs" in result.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[names.TAG_RESUMED_FROM_EPOCH] == str(len(before))
    for key in names.EPOCH_METRICS:
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(epochs)), key
    loss = [m.value for m in client.get_metric_history(run_id, names.LOSS)]
    assert loss[:len(before)] == before
    assert loss[len(before)] < (before[0] + before[-1]) / 2, loss  # goes on, not back to the first epoch's loss
    config = _training_config(epochs=str(epochs), target_accuracy="0", es_patience="50", lr_patience="50",
                              batch_size="32")
    derived = {names.PARAM_NUM_REPLICAS: "2", names.PARAM_NUM_WORKERS: "2", names.PARAM_STEPS_PER_EPOCH: "38"}
    assert_run_contract(client, run_id, config, tmp_path, derived_params=derived, callbacks=DISTRIBUTED_CALLBACKS)


GRID = {"learning_rate": ("0.0003", "0.001", "0.003"), "dropout": ("0.0", "0.2", "0.4")}  # the Makefile's SEARCH


def _sweep_runs(stack: Stack, parent_run_id: str) -> tuple:
    client = stack.client()
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return parent, children


def _assert_nothing_shows_the_database_password(stack: Stack, output: str, runs: list) -> None:
    password = stack.settings["POSTGRES_PASSWORD"]
    assert password not in output
    for run in runs:
        assert password not in repr(run.data.params) + repr(run.data.tags)


def test_three_sweep_containers_train_every_grid_point_once_under_one_parent(stack):
    result = _make(stack, "cluster-sweep", WORKERS="3", EPOCHS="2", DATASET=DATASET, STUDY="grid-1")
    output = result.stdout + result.stderr
    # a container that failed early said why long before the others' tables: its error lines first
    errors = "\n".join(line for line in output.splitlines() if "error" in line.lower())
    assert result.returncode == 0, errors[-3000:] + "\n...\n" + output[-3000:]
    # every container joined the one study and its parent, and ends with the whole table
    parents = {index: re.findall(rf"^\[sweep {index}\] Sweep run (\w+): 9 trials \(9 finished, 0 pruned, 0 failed\)$",
                                 output, re.MULTILINE) for index in range(3)}
    assert [len(found) for found in parents.values()] == [1, 1, 1], output[-5000:]
    [parent_run_id] = {found[0] for found in parents.values()}
    parent, children = _sweep_runs(stack, parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[names.TAG_RUN_TYPE] == names.RUN_TYPE_SWEEP
    points = sorted((float(run.data.params["learning_rate"]), float(run.data.params["dropout"])) for run in children)
    assert points == sorted((float(lr), float(d)) for lr in GRID["learning_rate"] for d in GRID["dropout"])
    assert {run.info.status for run in children} == {"FINISHED"}
    # the study lives in the stack's PostgreSQL; its URL is shown without the password
    assert parent.data.tags[names.TAG_STUDY_STORAGE].endswith("@postgres:5432/optuna")
    assert "***" in parent.data.tags[names.TAG_STUDY_STORAGE]
    _assert_nothing_shows_the_database_password(stack, output, [parent, *children])
    client = stack.client()
    sweeps = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
    assert [run.info.run_id for run in sweeps] == [parent_run_id]  # one parent, however many containers


@pytest.mark.timeout(1200)
def test_a_killed_sweep_container_fails_its_trial_and_the_others_finish_the_parent(stack):
    search = "--learning-rate 0.001,0.003 --dropout 0.0,0.2,0.4"
    command, environment = _make_command(stack, "cluster-sweep", WORKERS="3", EPOCHS="6", DATASET=DATASET,
                                         STUDY="kill-1", SEARCH=search, ARGS="--target-accuracy 0 --es-patience 50")
    process = subprocess.Popen(command, cwd=PROJECT_DIR, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    lines, seen = stdout_lines(process), []
    try:
        deadline = time.monotonic() + 600
        # mid-trial: a container whose trial has its run and has trained an epoch
        while not (training := re.match(r"\[sweep (\d)\] Epoch 1:", seen[-1] if seen else "")):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "".join(seen)[-4000:]
            seen.append(line)
        prefix = f"[sweep {training.group(1)}] "
        [*_, started] = [line for line in seen if line.startswith(f"{prefix}Trial ") and " (" in line]
        killed_trial = int(re.match(r"Trial (\d+) \(", started.removeprefix(prefix)).group(1))
        [container] = [c for c in _cluster_containers(stack, "cluster-sweep")
                       if started.removeprefix(prefix).strip() in c.logs().decode()]
        container.kill()
        process.wait(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest_of_lines(lines)
    assert process.returncode != 0  # the killed container's status
    parents = set(re.findall(r"^\[sweep \d\] Sweep run (\w+): 6 trials \(5 finished, 0 pruned, 1 failed\)$", output,
                             re.MULTILINE))
    assert len(parents) == 1, output[-5000:]
    parent, children = _sweep_runs(stack, parents.pop())
    assert parent.info.status == "FINISHED"
    statuses = {int(run.data.tags[names.TAG_SWEEP_TRIAL]): run.info.status for run in children}
    assert statuses == {number: "FAILED" if number == killed_trial else "FINISHED" for number in range(6)}
    _assert_nothing_shows_the_database_password(stack, output, [parent, *children])
