"""What a sweep's parent run records: the trials table, the best trial, the counts by state and the study's plots.

Every process of a sweep records it when its trials are done, from the study's state at that moment, so
the last one to finish leaves the complete record.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from pathlib import Path

import optuna
import pandas as pd
from mlflow.entities import LoggedModelOutput, Metric, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.time import get_current_time_millis
from optuna.trial import TrialState

from pipeline import constants as names
from pipeline.experiments.comparison import KEY_PARAMETERS, console_text, run_table
from pipeline.experiments.pruning import continued_trials, continues
from pipeline.experiments.runs import Ranking, logged_models_by_run, runs_frame
from pipeline.experiments.study import ERROR_ATTR, RUN_ID_ATTR, TRIAL_STATES, SharedStudy, study_lock

logger = logging.getLogger(__name__)

STATE_TAGS = {
    "finished": names.TAG_FINISHED_TRIALS, "pruned": names.TAG_PRUNED_TRIALS, "failed": names.TAG_FAILED_TRIALS,
}
# A pruned trial that a later trial continued (the row of the continuation has its run's outcome).
CONTINUED = "continued"


@dataclasses.dataclass(frozen=True)
class SweepSummary:
    """A sweep's trials as they stand.

    Args:
        parent_run_id: the parent run.
        table: one row per trial in trial order: trial (Optuna's number, from 0), state (`CONTINUED` for a paused
            trial that a later one is training or trained further), the trial it continues (if any), run, the
            trial's parameters, the run's final metrics (the ranking metric among them), best val_accuracy and its
            epoch, stop reason, error.
        best: the best finished trial's row (None while no trial has finished).
        running: how many trials are still running (in any process).
    """

    parent_run_id: str
    table: pd.DataFrame
    best: pd.Series | None
    running: int

    def count(self, state: str) -> int:
        return int((self.table["state"] == state).sum())

    def table_text(self) -> str:
        return console_text(self.table)


def summarize(client: MlflowClient, shared: SharedStudy, ranking: Ranking, experiment_id: str) -> SweepSummary:
    """The trials table: Optuna's trials joined to their MLflow runs (`mlflow.search_runs`)."""
    trials = shared.study.get_trials(deepcopy=False)
    # a paused trial is shown continued once a later trial is training it or trained it further: not when that
    # trial failed before its first epoch (e.g. the run could not be continued)
    continued = continued_trials([trial for trial in trials if trial.state != TrialState.WAITING
                                  and (trial.state != TrialState.FAIL or trial.intermediate_values)])
    rows = pd.DataFrame({
        "trial": [trial.number for trial in trials],
        "state": [CONTINUED if trial.number in continued else TRIAL_STATES[trial.state] for trial in trials],
        "continues": pd.array([continues(trial) for trial in trials], dtype="Int64"),
        "run_id": [trial.user_attrs.get(RUN_ID_ATTR, "") for trial in trials],
        "error": [trial.user_attrs.get(ERROR_ATTR, "") for trial in trials],
    })
    params = pd.DataFrame([trial.params for trial in trials], index=rows.index)
    runs = runs_frame(client, experiment_id, f"tags.mlflow.parentRunId = '{shared.parent_run_id}'")
    ranked = ranking.sort(runs) if not runs.empty else runs
    details = run_table(ranked).drop(columns=["run_name", *KEY_PARAMETERS], errors="ignore")  # trial params only
    if ranking.metric not in details:  # e.g. a per-epoch metric: its last value, the trial's objective
        column = f"metrics.{ranking.metric}"
        values = pd.to_numeric(ranked[column]) if column in ranked else float("nan")
        details.insert(details.columns.get_loc(names.TEST_ACCURACY), ranking.metric, values)
    details["rank"] = range(1, len(details) + 1)
    table = pd.concat([rows.drop(columns="error"), params], axis=1).merge(details, on="run_id", how="left")
    table["error"] = rows["error"]
    table = table[table["state"] != TRIAL_STATES[TrialState.WAITING]]
    finished = table[table["state"] == TRIAL_STATES[TrialState.COMPLETE]].sort_values("rank")
    best = finished.iloc[0] if not finished.empty else None
    running = int((table["state"] == TRIAL_STATES[TrialState.RUNNING]).sum())
    return SweepSummary(shared.parent_run_id, table.drop(columns="rank").reset_index(drop=True), best, running)


def record_summary(client: MlflowClient, summary: SweepSummary, shared: SharedStudy, ranking: Ranking) -> None:
    """Logs the summary to the parent: counts by state, the best trial and its metric, the table, the plots."""
    tags = [RunTag(tag, str(summary.count(state))) for state, tag in STATE_TAGS.items()]
    metrics = []
    if summary.best is not None:
        tags += [RunTag(names.TAG_BEST_RUN_ID, summary.best["run_id"]),
                 RunTag(names.TAG_BEST_TRIAL, str(summary.best["trial"]))]
        value = float(summary.best[ranking.metric])
        metrics.append(Metric(names.BEST_METRIC_PREFIX + ranking.metric, value, get_current_time_millis(), 0))
    client.log_batch(summary.parent_run_id, metrics=metrics, tags=tags)
    if summary.best is not None:
        # under the study's lock: processes that end together (a sweep shared by containers) would each find the
        # output missing and insert it, and all but one fail on the store's unique key
        with study_lock(shared):
            _log_best_model_output(client, summary.parent_run_id, summary.best["run_id"])
    with tempfile.TemporaryDirectory(prefix="mnist-sweep-") as directory:
        table = Path(directory) / names.SWEEP_TRIALS_FILE
        summary.table.to_csv(table, index=False)
        client.log_artifact(summary.parent_run_id, str(table))
        for plot in _study_plots(shared.study, Path(directory)):
            client.log_artifact(summary.parent_run_id, str(plot), names.PLOTS_DIR)


def _log_best_model_output(client: MlflowClient, parent_run_id: str, best_run_id: str) -> None:
    """Links the best trial's logged model to the parent as its output (MLflow 3 `log_outputs`), unless it
    already is: the UI then files the sweep with the runs that produced a model, and its page leads to it. A
    continued study whose best trial changes adds the new best."""
    parent = client.get_run(parent_run_id)
    models = logged_models_by_run(client, parent.info.experiment_id, best_run_id)
    model_id = models.get(best_run_id)
    if model_id is None:
        logger.warning("The best trial's run %s has no logged model to link to the sweep run", best_run_id)
        return
    outputs = parent.outputs.model_outputs if parent.outputs else []
    if any(output.model_id == model_id for output in outputs):
        return
    client.log_outputs(parent_run_id, [LoggedModelOutput(model_id=model_id, step=0)])


def _study_plots(study: optuna.Study, directory: Path) -> list[Path]:
    """Optuna's optimization history and parameter importances (matplotlib), where the trials allow them."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot
    from optuna.visualization import matplotlib as optuna_plots

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {names.SWEEP_HISTORY_PLOT: optuna_plots.plot_optimization_history}
    if len(finished) >= 2 and len({tuple(sorted(t.params.items())) for t in finished}) >= 2:
        plots[names.SWEEP_IMPORTANCE_PLOT] = optuna_plots.plot_param_importances
    written = []
    for file_name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = plot(study)
        except (ValueError, RuntimeError) as error:  # e.g. importances of parameters that never varied
            logger.info("No %s: %s", file_name, error)
            continue
        figure = axes.figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        figure.savefig(directory / file_name, dpi=80)
        pyplot.close(figure)
        written.append(directory / file_name)
    return written
