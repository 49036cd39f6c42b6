"""A sweep: an Optuna study whose trials are full training runs nested under one MLflow parent run.

`run_sweep` opens (creates, joins or continues) the study, then runs trials until the study's budget
is reached: in this process, or in `workers` processes of its own that share the study. The same
command started on other machines with the same `study` and a shared `storage` joins the same study
and parent run. Each process records the parent's summary when its trials are done and, with a
database storage, no other process's trial still runs (a dead process's trial is failed once its
heartbeat is stale); the last one ends the parent (FINISHED when a trial finished, else FAILED). A
worker process that dies has its running trial failed (not retried): by the supervising sweep within a
second, or, with a database storage, by Optuna's heartbeat check when another process starts a trial or
waits for the others to end theirs. A sweep that is stopped
(Ctrl-C, SIGTERM) fails its running trials, stops its workers and fails theirs, and ends the parent
KILLED when no trial of the study still runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

from mlflow.entities import Param, RunTag
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_RUN_ID
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import constants as names
from pipeline.errors import first_line
from pipeline.experiments.runs import DEFAULT_EXPERIMENT_ID, Ranking
from pipeline.experiments.study import (
    SearchPlan,
    SharedStudy,
    StudyRequest,
    enqueue_grid,
    fail_trials_of,
    open_storage,
    open_study,
    settle_running_trials,
    shown_location,
    worker_id,
)
from pipeline.experiments.sweep_record import SweepSummary, record_summary, summarize
from pipeline.tracking.process_group import poll, wait_at_barrier
from pipeline.tracking.store import check_tracking_store, use_experiment

logger = logging.getLogger(__name__)

# For tests that force a race: a directory in which every sweep process, before it queues a grid, leaves
# a file `waiting-<pid>` and then waits (at most BARRIER_SECONDS) for a file `go`.
BARRIER_VARIABLE = "MNIST_PIPELINE_SWEEP_BARRIER"
BARRIER_SECONDS = 300.0

# How often a sweep looks for a worker that exited; how long a stopped worker gets to end its trial.
WORKER_POLL_SECONDS, WORKER_STOP_SECONDS = 0.5, 5.0

# A worker process's command: (worker number, study name, storage location) -> argv.
WorkerCommand = Callable[[int, str, str], list[str]]


@dataclasses.dataclass(frozen=True)
class SweepRequest:
    """A sweep as asked for.

    Args:
        options: the parsed SWEEP_PARAMETERS (logged to the parent as given).
        experiment_name: where a new sweep goes (default: MLFLOW_EXPERIMENT_NAME, else `Default`).
        worker_command: how to start one more process of this sweep (needed for `workers` > 1).
        worker_number: 0 for a sweep started by a user; N for the N-th worker a sweep started.
        source_tags: MLflow's source tags (names.SOURCE_TAGS) of a parent this process creates outside
            `mlflow run` (which sets its own); the trials copy the parent's.
    """

    options: Mapping[str, Any]
    experiment_name: str | None = None
    worker_command: WorkerCommand | None = None
    worker_number: int = 0
    source_tags: Mapping[str, str] = dataclasses.field(default_factory=dict)


def run_sweep(request: SweepRequest) -> SweepSummary:
    """Runs (its share of) a sweep's trials and records the parent's summary.

    Under `mlflow run` the run MLflow created (MLFLOW_RUN_ID, taken out of the environment so that the
    trials do not record into it) becomes the parent of a new study, or a nested child of the parent
    of a study it joins.

    Raises:
        ParameterError: a bad search space, budget, storage or study.
        TrackingUnavailable, UserInputError: what would fail every trial; the parent is FAILED.
    """
    options = request.options
    plan = SearchPlan.from_options(options)
    ranking = Ranking.from_options(options)
    check_tracking_store()
    client = MlflowClient()
    project_run_id = os.environ.pop(MLFLOW_RUN_ID.name, None)
    storage = open_storage(options["storage"], client.tracking_uri, client)
    study_request = StudyRequest(plan, plan.space_text(options), options["study"], request.worker_number,
                                 ranking.metric)
    shared = open_study(study_request, storage, lambda: _new_parent(client, request, project_run_id))
    parent = client.get_run(shared.parent_run_id)
    experiment_id = parent.info.experiment_id
    if project_run_id and project_run_id != shared.parent_run_id:  # `mlflow run` of a joining process
        client.log_batch(project_run_id, tags=[RunTag("mlflow.parentRunId", shared.parent_run_id),
                                               RunTag(names.TAG_RUN_TYPE, names.RUN_TYPE_SWEEP)])
    try:
        if parent.info.status != "RUNNING":  # a study continued: its parent runs again
            client.update_run(shared.parent_run_id, status="RUNNING")
        _log_parent_params(client, shared, options, plan)
        if plan.sampler == "grid" and request.worker_number == 0:
            wait_at_barrier(BARRIER_VARIABLE, BARRIER_SECONDS)
            enqueue_grid(shared, plan)
        if options["workers"] > 1 and request.worker_command is not None:
            _run_workers(client, shared, options["workers"], request.worker_command, experiment_id)
        else:  # only a process that trains imports TensorFlow (a supervising sweep saves its seconds)
            from pipeline.experiments.trials import TrialRunner

            TrialRunner(client, shared, plan, ranking, experiment_id).run()
        settle_running_trials(shared)  # other machines' trials: to their end, or failed when their process is gone
        summary = summarize(client, shared, ranking, experiment_id)
        record_summary(client, summary, shared, ranking)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: this process's trials are failed by now
        if request.worker_number == 0 and not _running_trials(shared):
            _end_parent(client, shared.parent_run_id, "KILLED")
        raise
    except BaseException:
        _end_parent(client, shared.parent_run_id, "FAILED")
        raise
    if summary.running == 0:
        client.set_terminated(shared.parent_run_id, "FINISHED" if summary.best is not None else "FAILED")
    return summary


def _new_parent(client: MlflowClient, request: SweepRequest, project_run_id: str | None) -> str:
    """The parent run of a new study: the run `mlflow run` created, or a new one."""
    if project_run_id:
        client.set_tag(project_run_id, names.TAG_RUN_TYPE, names.RUN_TYPE_SWEEP)
        client.update_run(project_run_id, name="sweep")  # not `mlflow run`'s random name: the UI's row says what it is
        return project_run_id
    experiment = use_experiment(request.experiment_name, client) or client.get_experiment(DEFAULT_EXPERIMENT_ID)
    return client.create_run(experiment.experiment_id, run_name="sweep",
                             tags={**request.source_tags, names.TAG_RUN_TYPE: names.RUN_TYPE_SWEEP}).info.run_id


def _log_parent_params(
    client: MlflowClient, shared: SharedStudy, options: Mapping[str, Any], plan: SearchPlan
) -> None:
    """The sweep's parameters (once: a joining process keeps the first ones): as given, with `sampler`,
    `pruner` and `trials` as the plan resolved them; empty ones (`storage`, `study` by default) are not
    params. The study's name and storage (a database URL without its password) are tags."""
    existing = client.get_run(shared.parent_run_id).data.params
    resolved = {"sampler": plan.sampler, "pruner": plan.pruner, "trials": plan.trials}
    values = {key: resolved.get(key, value) if value == "" else value for key, value in options.items()}
    client.log_batch(
        shared.parent_run_id,
        params=[Param(key, shown_location(str(value)) if key == "storage" else str(value))
                for key, value in values.items() if key not in existing and value != ""],
        tags=[RunTag(names.TAG_STUDY_NAME, shared.study.study_name),
              RunTag(names.TAG_STUDY_STORAGE, shown_location(shared.location))],
    )


def _run_workers(
    client: MlflowClient, shared: SharedStudy, workers: int, command: WorkerCommand, experiment_id: str
) -> None:
    """Starts `workers` processes on the study and waits for them; a worker that exits, whichever it is,
    has its running trial failed within WORKER_POLL_SECONDS. However this process stops, its workers
    are stopped (SIGTERM, SIGKILL after WORKER_STOP_SECONDS) and a trial they leave running is failed.
    Each worker gets an equal share of this machine's cores for TensorFlow."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    environment = {**os.environ, MLFLOW_EXPERIMENT_ID.name: experiment_id,
                   "TF_NUM_INTRAOP_THREADS": os.environ.get("TF_NUM_INTRAOP_THREADS", threads)}
    environment.pop(MLFLOW_RUN_ID.name, None)
    running: dict[int, subprocess.Popen] = {}
    try:
        for number in range(1, workers + 1):
            running[number] = subprocess.Popen(command(number, shared.study.study_name, shared.location),
                                               env=environment)
        while running:
            for number, process in list(running.items()):
                if poll(process) is not None:
                    _fail_trials_of_worker(client, shared, number, workers, process)
                    del running[number]
            if running:
                time.sleep(WORKER_POLL_SECONDS)
    finally:
        _stop_workers(client, shared, running, workers)


def _stop_workers(client: MlflowClient, shared: SharedStudy, running: dict[int, subprocess.Popen],
                  workers: int) -> None:
    """Stops the workers still running, and fails the trials they leave running."""
    for process in running.values():
        if poll(process) is None:
            process.terminate()
    deadline = time.monotonic() + WORKER_STOP_SECONDS
    for process in running.values():
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for number, process in running.items():
        _fail_trials_of_worker(client, shared, number, workers, process)


def _fail_trials_of_worker(
    client: MlflowClient, shared: SharedStudy, number: int, workers: int, process: subprocess.Popen
) -> None:
    """Fails the trials an exited worker left running (none when it ended them itself)."""
    why = f"its worker process ({number} of {workers}) exited with status {process.returncode}"
    try:
        failed = fail_trials_of(shared, client, worker_id(process.pid), why)
    except Exception as error:  # noqa: BLE001 - the store may be the thing that failed; the others go on
        logger.warning("Could not fail the trials of worker %d: %s", number, first_line(error, 160))
        return
    if process.returncode != 0 or failed:
        logger.warning("Worker %d exited with status %d%s", number, process.returncode,
                       f"; trials {', '.join(str(n) for n in failed)} FAILED" if failed else "")


def _running_trials(shared: SharedStudy) -> int:
    """How many trials of the study still run (in any process); 0 when the storage cannot say."""
    try:
        return len(shared.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    except Exception as error:  # noqa: BLE001 - the storage may be the thing that failed
        logger.warning("Could not read the study's running trials: %s", first_line(error, 160))
        return 0


def _end_parent(client: MlflowClient, parent_run_id: str, status: str) -> None:
    """Marks the parent ended after an error, without hiding that error if the store fails too."""
    try:
        client.set_terminated(parent_run_id, status)
    except Exception as error:  # noqa: BLE001 - the store may be the thing that failed
        logger.warning("Could not mark sweep run %s %s: %s", parent_run_id, status, first_line(error, 160))
