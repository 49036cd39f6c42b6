"""Side by side: an experiment's best training runs as a table, an overlay plot and a UI link.

What the MLflow UI's compare view shows, as files a script can keep: the key parameters and final
metrics of each run (CSV), the per-epoch `val_accuracy`, `val_loss` and `learning_rate` of all runs
in one picture (PNG), and the URL that opens exactly these runs in the UI's compare view. A
comparison can be logged to a run of its own (`run_type=comparison`), which no later comparison,
sweep or registration takes for a training run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
from mlflow.entities import Experiment, RunTag
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.errors import ParameterError, RunSelectionError
from pipeline.experiments.runs import Ranking, runs_frame, training_runs_filter, user_filter_errors
from pipeline.search_space import SWEEP_GRID_PARAMETERS
from pipeline.tracking import reporting
from pipeline.tracking.store import compare_runs_url

# The parameters a sweep varies are the ones worth seeing side by side.
KEY_PARAMETERS = SWEEP_GRID_PARAMETERS
FINAL_METRICS = (
    names.TEST_ACCURACY,
    names.TEST_LOSS,
    names.VAL_ACCURACY,
    names.VAL_LOSS,
    names.BEST_VAL_ACCURACY,  # the best epoch's, beside the last epoch's val_accuracy
)
WHOLE_NUMBERS = (names.TAG_BEST_EPOCH, names.EPOCHS_COMPLETED)
PLOTTED_METRICS = (names.VAL_ACCURACY, names.VAL_LOSS, names.LEARNING_RATE)
COLUMNS = ("rank", "run_id", "run_name", "status", *KEY_PARAMETERS, *FINAL_METRICS, *WHOLE_NUMBERS,
           names.TAG_STOP_REASON)


def run_table(frame: pd.DataFrame) -> pd.DataFrame:
    """A `mlflow.search_runs` DataFrame as the table people read: key parameters, final metrics, the best
    val_accuracy with its epoch, and why training stopped; missing values empty."""
    def column(name: str) -> pd.Series:
        return frame[name] if name in frame else pd.Series([None] * len(frame), index=frame.index, dtype=object)

    table = pd.DataFrame({
        "run_id": frame["run_id"],
        "run_name": column("tags.mlflow.runName"),
        "status": frame["status"],
        **{name: column(f"params.{name}") for name in KEY_PARAMETERS},
        **{name: pd.to_numeric(column(f"metrics.{name}")) for name in FINAL_METRICS},
        names.TAG_BEST_EPOCH: pd.to_numeric(column(f"tags.{names.TAG_BEST_EPOCH}")).astype("Int64"),
        names.EPOCHS_COMPLETED: pd.to_numeric(column(f"metrics.{names.EPOCHS_COMPLETED}")).astype("Int64"),
        names.TAG_STOP_REASON: column(f"tags.{names.TAG_STOP_REASON}"),
    })
    return table


def console_text(table: pd.DataFrame) -> str:
    """A table for the console: run ids cut to 8 characters (the CSV has them whole), metrics to 4
    decimals, other numbers (a trial's learning rate) to 4 significant digits."""
    shown = table.assign(run_id=table["run_id"].str[:8])
    metrics = {name: "{:.4f}".format for name in FINAL_METRICS if name in shown}
    return shown.to_string(index=False, na_rep="", float_format="{:.4g}".format, formatters=metrics)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The compared runs, best first.

    Args:
        experiment: where the runs are.
        table: one row per run, best first, COLUMNS.
        url: the MLflow UI compare view of exactly these runs.
    """

    experiment: Experiment
    table: pd.DataFrame
    url: str

    @property
    def run_ids(self) -> list[str]:
        return list(self.table["run_id"])

    def table_text(self) -> str:
        return console_text(self.table)

    def table_csv(self) -> str:
        return self.table.to_csv(index=False)


def compare_runs(
    client: MlflowClient, experiment: Experiment, filter_string: str, top: int, ranking: Ranking
) -> Comparison:
    """The experiment's `top` best training runs matching `filter_string` (any status), best first.

    Raises:
        RunSelectionError: no training run matches.
        ParameterError: the filter is not a valid MLflow search filter.
    """
    with user_filter_errors(filter_string):
        frame = runs_frame(client, experiment.experiment_id, training_runs_filter(filter_string, finished_only=False))
    if frame.empty:
        matching = f" matching {filter_string!r}" if filter_string.strip() else ""
        raise RunSelectionError(f"experiment {experiment.name!r} has no training run{matching} to compare")
    chosen = ranking.sort(frame).head(top)
    table = run_table(chosen)
    table.insert(0, "rank", range(1, len(table) + 1))
    url = compare_runs_url(experiment.experiment_id, list(table["run_id"]), client.tracking_uri)
    return Comparison(experiment=experiment, table=table, url=url)


def write_outputs(client: MlflowClient, comparison: Comparison, directory: Path) -> tuple[Path, Path]:
    """Writes the table (CSV) and the overlay plot (PNG) into `directory`; returns their paths.

    Raises:
        ParameterError: `directory` cannot be created or written.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ParameterError("output_dir", str(directory), f"a writable directory ({error.strerror})") from None
    table = directory / names.COMPARISON_TABLE_FILE
    table.write_text(comparison.table_csv())
    plot = directory / names.COMPARISON_PLOT_FILE
    reporting.plot_run_overlay(_histories(client, comparison), PLOTTED_METRICS, plot)
    return table, plot


def _histories(client: MlflowClient, comparison: Comparison) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """label -> metric -> (epoch, value); a label names the run and the key parameters that differ."""
    table = comparison.table
    varying = [name for name in KEY_PARAMETERS if table[name].nunique(dropna=False) > 1]
    histories = {}
    for row in table.itertuples(index=False):
        row = row._asdict()
        settings = ", ".join(f"{name}={row[name]}" for name in varying)
        label = f"{row['rank']}. {row['run_name'] or row['run_id'][:8]}" + (f" ({settings})" if settings else "")
        histories[label] = {
            metric: sorted((m.step, m.value) for m in client.get_metric_history(row["run_id"], metric))
            for metric in PLOTTED_METRICS
        }
    return histories


def log_comparison(
    client: MlflowClient, comparison: Comparison, files: tuple[Path, ...], run_id: str | None = None
) -> str:
    """Logs the outputs to a comparison run and returns its id: `run_id` (the run `mlflow run`
    created, which `mlflow run` ends), or a new FINISHED run in the compared experiment. The run is
    tagged `run_type=comparison` and lists the compared runs."""
    own_run = run_id is None
    if own_run:
        run_id = client.create_run(
            comparison.experiment.experiment_id, run_name="comparison",
            tags={names.TAG_RUN_TYPE: names.RUN_TYPE_COMPARISON},
        ).info.run_id
    try:
        client.log_batch(run_id, tags=[  # run_type is set: by create_run above, or by open_workspace
            RunTag(names.TAG_COMPARED_RUNS, ",".join(comparison.run_ids)),
            RunTag(names.TAG_COMPARE_URL, comparison.url),
        ])
        for path in files:
            client.log_artifact(run_id, str(path))
    except BaseException:
        if own_run:
            client.set_terminated(run_id, "FAILED")
        raise
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    return run_id
