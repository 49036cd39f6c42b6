"""Sweep processes at the edges: several separately started `sweep` processes (pods) on one grid study,
forced to queue it at the same moment; workers killed, a sweep stopped by Ctrl-C or SIGTERM, then continued."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import psutil
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.study import JOURNAL_FILE
from pipeline.experiments.sweep import BARRIER_VARIABLE
from tests.conftest import create_database, drop_database
from tests.helpers import MNIST_SMALL, cli_options, new_sqlite_store, project_env, rest_of_lines, run_cli, stdout_lines

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
FIXED = {"dataset": str(MNIST_SMALL), "epochs": "1", "lr_patience": "1", "es_patience": "5"}
GRID = {"learning_rate": "0.01,0.003", "dropout": "0.1,0.3"}  # 4 points


@pytest.fixture
def study_database() -> str:
    """A PostgreSQL database of its own for Optuna (as a team gives the study next to MLflow's)."""
    name, uri = create_database("mnist_study")
    yield uri
    drop_database(name)


def _sweep_process(tmp_path: Path, uri: str, values: dict[str, str], experiment: str, **env: str) -> subprocess.Popen:
    """`python -m mlflow_project sweep ...` as a pod or a user starts it, output to files in tmp_path."""
    log = tmp_path / f"sweep-{time.monotonic_ns()}"
    return subprocess.Popen(
        [sys.executable, "-m", "mlflow_project", "sweep", "--experiment-name", experiment, *cli_options(values)],
        cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=uri, **env),
        stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"),  # noqa: SIM115 - closed with the process
    )


def _wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"not within {timeout} s: {what}")


def test_pods_started_together_train_each_grid_point_once(tmp_path, study_database):
    # Three identical pods (deploy/kubernetes/sweep/job.yaml with sampler=grid) held at a barrier just
    # before they queue the grid, then released together.
    uri = new_sqlite_store(tmp_path)
    MlflowClient(uri).create_experiment("pods", artifact_location=str(tmp_path / "mlruns" / "pods"))
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    values = FIXED | GRID | {"sampler": "grid", "study": "pods", "storage": study_database}
    pods = [_sweep_process(tmp_path, uri, values, "pods", **{BARRIER_VARIABLE: str(barrier)}) for _ in range(3)]
    try:
        _wait_for(lambda: len(list(barrier.glob("waiting-*"))) == 3 or any(p.poll() is not None for p in pods),
                  240, "every pod at the barrier")
        assert all(pod.poll() is None for pod in pods), [pod.returncode for pod in pods]
        (barrier / "go").touch()
        codes = [pod.wait(timeout=300) for pod in pods]
    finally:
        for pod in pods:
            pod.kill()
    errors = "".join(path.read_text()[-2000:] for path in tmp_path.glob("sweep-*.err"))
    assert codes == [0, 0, 0], errors

    study = optuna.load_study(study_name="pods", storage=study_database)
    trials = [(trial.state.name, trial.params.get("learning_rate"), trial.params.get("dropout"))
              for trial in study.trials]
    assert sorted(trials) == [("COMPLETE", 0.003, 0.1), ("COMPLETE", 0.003, 0.3), ("COMPLETE", 0.01, 0.1),
                              ("COMPLETE", 0.01, 0.3)], (  # each point trained once, nothing else queued
        trials, [trial.user_attrs.get("error") for trial in study.trials], errors)
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("pods").experiment_id
    [parent] = client.search_runs([experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.data.tags[names.TAG_SWEEP_TRIAL] for run in children) == ["0", "1", "2", "3"]
    assert all(run.info.status == "FINISHED" for run in children)
    assert parent.info.status == "FINISHED" and parent.data.tags[names.TAG_FINISHED_TRIALS] == "4"


def _journal_study(tmp_path: Path, name: str) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / JOURNAL_FILE)))
    return optuna.load_study(study_name=name, storage=storage)


def _workers_of(sweep: subprocess.Popen) -> dict[int, psutil.Process]:
    """The worker processes a sweep started, by worker number."""
    workers = {}
    for process in psutil.Process(sweep.pid).children():
        command = process.cmdline()
        if "--worker-number" in command:
            workers[int(command[command.index("--worker-number") + 1])] = process
    return workers


def _wait_for_lines(lines, *starts: str, timeout: float = 240) -> str:
    """Reads a process's output until a line starting with each of `starts` has been seen; returns it all."""
    seen, output, deadline = set(), [], time.monotonic() + timeout
    while len(seen) < len(starts):
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "".join(output)[-3000:]
        output.append(line)
        seen |= {start for start in starts if line.startswith(start)}
    return "".join(output)


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_worker_is_failed_within_seconds_while_the_other_still_runs(tmp_path):
    # Worker 2 is killed while worker 1 trains: the sweep used to wait for worker 1 first. The sweep goes on
    # with worker 1 and finishes; the killed worker's trial is one FAILED child run.
    values = FIXED | {"sampler": "random", "trials": "4", "pruner": "none", "learning_rate": "1e-3:1e-2:log",
                      "workers": "2", "epochs": "4", "study": "killed"}
    uri = new_sqlite_store(tmp_path)
    sweep = subprocess.Popen(
        [sys.executable, "-m", "mlflow_project", "sweep", *cli_options(values)], cwd=tmp_path,
        env=project_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = stdout_lines(sweep)
        _wait_for_lines(lines, "[worker 2] Epoch 1:")
        workers = _workers_of(sweep)
        # the sweep only supervises: TensorFlow is loaded by its workers, not by it
        assert not [m.path for m in psutil.Process(sweep.pid).memory_maps() if "tensorflow" in m.path]
        assert [m.path for m in workers[1].memory_maps() if "tensorflow" in m.path]
        workers[2].kill()
        victim = f"{socket.gethostname()}:{workers[2].pid}"

        def victim_trial_failed() -> bool:
            trials = [t for t in _journal_study(tmp_path, "killed").trials if t.user_attrs.get("worker") == victim]
            return bool(trials) and trials[0].state == optuna.trial.TrialState.FAIL

        _wait_for(victim_trial_failed, 10, "worker 2's trial FAILED")
        assert not _gone(workers[1])  # failed while the other worker still runs, not after it
        assert sweep.wait(timeout=300) == 0
        output = rest_of_lines(lines)
    finally:
        sweep.kill()
    assert "Worker 2 exited with status -9" in output, output[-3000:]
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("Default").experiment_id
    [parent] = client.search_runs([experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
    assert parent.info.status == "FINISHED" and parent.data.tags[names.TAG_FAILED_TRIALS] == "1"
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    failed = [run for run in children if run.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags[names.TAG_TRIAL_STATE] == "failed"
    assert len(children) >= 3 and all(run.info.status == "FINISHED" for run in children if run not in failed)


@pytest.mark.parametrize("stop", ["sigterm_to_the_sweep", "ctrl_c_to_its_group"])
def test_a_stopped_sweep_leaves_no_worker_and_no_running_trial_and_continues(tmp_path, stop):
    # `docker stop` or a deleted pod: SIGTERM to the sweep alone; Ctrl-C: SIGINT to its process group.
    values = FIXED | GRID | {"sampler": "grid", "workers": "2", "epochs": "3", "study": "stopped"}
    uri = new_sqlite_store(tmp_path)
    command = [sys.executable, "-m", "mlflow_project", "sweep", *cli_options(values)]
    sweep = subprocess.Popen(
        command, cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as an interactive shell starts it
    )
    try:
        lines = stdout_lines(sweep)
        _wait_for_lines(lines, "[worker 1] Epoch 1:", "[worker 2] Epoch 1:")
        workers = _workers_of(sweep)
        assert sorted(workers) == [1, 2]
        if stop == "sigterm_to_the_sweep":
            sweep.send_signal(signal.SIGTERM)
        else:
            os.killpg(sweep.pid, signal.SIGINT)
        _wait_for(lambda: all(_gone(worker) for worker in workers.values()), 30, "every worker gone")
        assert sweep.wait(timeout=30) != 0
        output = rest_of_lines(lines)
        assert "Traceback" not in output, output[-3000:]  # a stop, not an error (Optuna logs each stopped trial)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
    study = _journal_study(tmp_path, "stopped")
    # the two trials the workers were in fail; under load a worker may have finished one trial before
    states = sorted(trial.state.name for trial in study.trials if trial.state.name != "WAITING")
    assert states.count("FAIL") == 2 and set(states) <= {"COMPLETE", "FAIL"}, states
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("Default").experiment_id
    [parent] = client.search_runs([experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
    assert parent.info.status == "KILLED"
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    stopped = sorted(run.info.status for run in children if run.info.status != "FINISHED")
    assert stopped in (["FAILED", "FAILED"], ["FAILED", "KILLED"], ["KILLED", "KILLED"]), stopped
    assert len(children) == len(states)
    if stop == "sigterm_to_the_sweep":  # both stops leave the same states; continuing one of them is enough
        _continue_the_sweep(tmp_path, uri, values, "stopped", client, parent.info.run_id)


def _continue_the_sweep(tmp_path: Path, uri: str, values: dict[str, str], study_name: str, client: MlflowClient,
                        parent_run_id: str) -> None:
    """The same sweep command again, in one process (a joining process keeps the study and the parent's
    parameters): the rest of the grid trains, the failed points are not retried, the parent is FINISHED."""
    result = run_cli(["sweep", *cli_options(values | {"workers": "1"})], cwd=tmp_path, timeout=300,
                     MLFLOW_TRACKING_URI=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    study = _journal_study(tmp_path, study_name)
    assert sorted(trial.state.name for trial in study.trials) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert client.get_run(parent_run_id).info.status == "FINISHED"


def test_a_sigkilled_sweep_leaves_no_worker_and_no_running_trial_and_continues(tmp_path):
    # The sweep process itself is SIGKILLed (an OOM kill, `kill -9`): nothing of it runs to stop its workers.
    # Each worker asked Linux for SIGTERM when its parent dies, and fails its trial as a stopped sweep does.
    values = FIXED | GRID | {"sampler": "grid", "workers": "2", "epochs": "3", "study": "sigkilled"}
    uri = new_sqlite_store(tmp_path)
    sweep = subprocess.Popen(
        [sys.executable, "-m", "mlflow_project", "sweep", *cli_options(values)], cwd=tmp_path,
        env=project_env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # so that the clean-up below reaches any worker left behind
    )
    try:
        lines = stdout_lines(sweep)
        _wait_for_lines(lines, "[worker 1] Epoch 1:", "[worker 2] Epoch 1:")
        workers = _workers_of(sweep)
        assert sorted(workers) == [1, 2]
        running = {trial.number for trial in _journal_study(tmp_path, "sigkilled").trials
                   if trial.state == optuna.trial.TrialState.RUNNING}
        sweep.kill()
        killed = time.monotonic()
        sweep.wait(timeout=30)
        _wait_for(lambda: all(_gone(worker) for worker in workers.values()), 20, "every worker gone")
        gone_after = time.monotonic() - killed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sweep.pid, signal.SIGKILL)
    study = _journal_study(tmp_path, "sigkilled")
    states = {trial.number: trial.state.name for trial in study.trials}
    assert "RUNNING" not in states.values(), (states, gone_after)
    assert running and all(states[number] == "FAIL" for number in running), (running, states)  # not finished
    client = MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("Default").experiment_id
    [parent] = client.search_runs([experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert "RUNNING" not in [run.info.status for run in children]
    _continue_the_sweep(tmp_path, uri, values, "sigkilled", client, parent.info.run_id)
