"""A grid sweep: one parent run, one nested child run per trial, the best trial recorded.

Each trial is a full training run (`run_training`, the whole run contract) created as a child of
the parent (MLflow's `mlflow.parentRunId`), so the UI shows the sweep as one expandable row. A
failing trial (a diverged loss, or anything else that goes wrong inside it) is FAILED and the sweep
goes on; what would fail every trial alike (bad data, an unreachable tracking server) stops it.
The parent records the trials table (`sweep_trials.csv`), the best trial and the number of failed
trials; it is tagged `run_type=sweep`, so it is never taken for a training run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import keras
import mlflow
from mlflow.entities import Experiment, Metric, Param, Run, RunTag
from mlflow.environment_variables import MLFLOW_RUN_ID
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis

from pipeline import constants as names
from pipeline.config import SWEEP_GRID_PARAMETERS, TrainingConfig
from pipeline.errors import TrackingUnavailable, UserInputError, first_line
from pipeline.experiments.runs import DEFAULT_EXPERIMENT_ID, Ranking
from pipeline.tracking import reporting
from pipeline.tracking.store import check_tracking_store, use_experiment
from pipeline.training.run import run_training

logger = logging.getLogger(__name__)

TRIAL_COLUMNS = ("trial", "run_id", "status", *SWEEP_GRID_PARAMETERS, names.TEST_ACCURACY, names.TEST_LOSS, "error")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One trial of the grid and how it ended.

    Args:
        number: 1-based position in the grid.
        config: its training configuration.
        run: its child run as stored at the end (None if it failed before a run existed).
        error: why it failed, in one line ("" when it finished).
    """

    number: int
    config: TrainingConfig
    run: Run | None
    error: str = ""

    @property
    def finished(self) -> bool:
        return self.run is not None and self.run.info.status == "FINISHED"

    def row(self) -> dict[str, str]:
        metrics = self.run.data.metrics if self.run else {}
        return {
            "trial": str(self.number),
            "run_id": self.run.info.run_id if self.run else "",
            "status": self.run.info.status if self.run else "FAILED",
            **{name: str(getattr(self.config, name)) for name in SWEEP_GRID_PARAMETERS},
            **{name: repr(metrics[name]) if name in metrics else "" for name in (names.TEST_ACCURACY, names.TEST_LOSS)},
            "error": self.error,
        }


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """A finished sweep.

    Args:
        parent_run_id: the parent run.
        experiment_id: where the parent and its trials are.
        trials: every trial, in grid order.
        best: the best finished trial by the ranking (None when every trial failed).
    """

    parent_run_id: str
    experiment_id: str
    trials: tuple[Trial, ...]
    best: Trial | None

    @property
    def failed(self) -> list[Trial]:
        return [trial for trial in self.trials if not trial.finished]

    def table_text(self) -> str:
        rows = [trial.row() for trial in self.trials]
        return reporting.text_table(TRIAL_COLUMNS, rows, rounded=(names.TEST_ACCURACY, names.TEST_LOSS))

    def table_csv(self) -> str:
        return reporting.csv_table(TRIAL_COLUMNS, (trial.row() for trial in self.trials))


def run_sweep(
    configs: Sequence[TrainingConfig],
    ranking: Ranking,
    sweep_params: Mapping[str, str],
    experiment_name: str | None = None,
) -> SweepResult:
    """Runs every trial as a child of one parent run and records the outcome in the parent.

    Args:
        configs: the trials, in order (`pipeline.config.sweep_grid`).
        ranking: how the best trial is chosen.
        sweep_params: the sweep's parameters as given, logged to the parent.
        experiment_name: where the sweep goes (default: MLFLOW_EXPERIMENT_NAME, else `Default`).
            Under `mlflow run` the parent is the run MLflow created (MLFLOW_RUN_ID), which is taken
            out of the environment, as `mlflow.start_run` does, so that the trials do not resume it.

    Raises:
        TrackingUnavailable, UserInputError: what would fail every trial; the parent is FAILED.
    """
    check_tracking_store()
    client = MlflowClient()
    experiment, parent = _parent_run(client, experiment_name, os.environ.pop(MLFLOW_RUN_ID.name, None))
    parent_run_id = parent.info.run_id
    try:
        existing = parent.data.params
        client.log_batch(
            parent_run_id,
            params=[Param(key, value) for key, value in sweep_params.items() if key not in existing],
            tags=[RunTag(names.TAG_RUN_TYPE, names.RUN_TYPE_SWEEP)],
        )
        trials = tuple(
            _run_trial(client, number, config, len(configs), parent_run_id, experiment.name)
            for number, config in enumerate(configs, start=1)
        )
        finished = [trial for trial in trials if trial.finished and ranking.has_metric(trial.run)]
        best = min(finished, key=lambda trial: ranking.key(trial.run)) if finished else None
        result = SweepResult(parent_run_id, experiment.experiment_id, trials, best)
        _record(client, result, ranking)
    except KeyboardInterrupt:
        _end_parent(client, parent_run_id, "KILLED")
        raise
    except BaseException:
        _end_parent(client, parent_run_id, "FAILED")
        raise
    client.set_terminated(parent_run_id, "FINISHED" if best else "FAILED")
    return result


def _end_parent(client: MlflowClient, parent_run_id: str, status: str) -> None:
    """Marks the parent ended after an error, without hiding that error if the store fails too."""
    try:
        client.set_terminated(parent_run_id, status)
    except Exception as error:  # noqa: BLE001 - the store may be the thing that failed
        logger.warning("Could not mark sweep run %s %s: %s", parent_run_id, status, first_line(error, 160))


def _parent_run(
    client: MlflowClient, experiment_name: str | None, project_run_id: str | None
) -> tuple[Experiment, Run]:
    """The sweep's experiment and parent run: the run `mlflow run` created, or a new one."""
    if project_run_id:
        run = client.get_run(project_run_id)
        return client.get_experiment(run.info.experiment_id), run
    experiment = use_experiment(experiment_name, client) or client.get_experiment(DEFAULT_EXPERIMENT_ID)
    run = client.create_run(experiment.experiment_id, run_name="sweep",
                            tags={names.TAG_RUN_TYPE: names.RUN_TYPE_SWEEP})
    return experiment, run


def _run_trial(
    client: MlflowClient, number: int, config: TrainingConfig, total: int, parent_run_id: str, experiment_name: str
) -> Trial:
    settings = ", ".join(f"{name}={getattr(config, name)}" for name in SWEEP_GRID_PARAMETERS)
    logger.info("Trial %d/%d: %s", number, total, settings)
    keras.backend.clear_session()  # each trial starts from a fresh Keras state, as a run of its own does
    before = mlflow.last_active_run()
    error = ""
    try:
        run_id = run_training(config, experiment_name=experiment_name, parent_run_id=parent_run_id).run_id
    except (UserInputError, TrackingUnavailable):
        raise
    except Exception as failure:  # noqa: BLE001 - a failing trial is recorded, and the sweep goes on
        error = " ".join(str(failure).split()) or type(failure).__name__
        logger.warning("Trial %d failed: %s", number, error)
        last = mlflow.last_active_run()
        started = last is not None and (before is None or last.info.run_id != before.info.run_id)
        run_id = last.info.run_id if started else None
        if started and last.info.status == "RUNNING":  # last_active_run() read it after its end
            client.set_terminated(run_id, "FAILED")
    if run_id is None:
        return Trial(number, config, None, error)
    client.set_tag(run_id, names.TAG_SWEEP_TRIAL, str(number))
    # MLflow draws run names from Python's random generator, which each trial seeds alike: name them.
    client.update_run(run_id, name=f"trial-{number}")
    return Trial(number, config, client.get_run(run_id), error)


def _record(client: MlflowClient, result: SweepResult, ranking: Ranking) -> None:
    """The parent's record: the trials table, the best trial, the number of failures."""
    tags = [RunTag(names.TAG_FAILED_TRIALS, str(len(result.failed)))]
    metrics = []
    if result.best is not None:
        tags += [
            RunTag(names.TAG_BEST_RUN_ID, result.best.run.info.run_id),
            RunTag(names.TAG_BEST_TRIAL, str(result.best.number)),
        ]
        value = result.best.run.data.metrics[ranking.metric]
        metrics.append(Metric(names.BEST_METRIC_PREFIX + ranking.metric, value, get_current_time_millis(), 0))
    client.log_batch(result.parent_run_id, metrics=metrics, tags=tags)
    with tempfile.TemporaryDirectory(prefix="mnist-sweep-") as directory:
        table = Path(directory) / names.SWEEP_TRIALS_FILE
        table.write_text(result.table_csv())
        client.log_artifact(result.parent_run_id, str(table))
