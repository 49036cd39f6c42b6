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

from mlflow.entities import Experiment, Run, RunTag
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import SWEEP_GRID_PARAMETERS
from pipeline.errors import ParameterError, RunSelectionError
from pipeline.experiments.runs import Ranking, training_runs
from pipeline.tracking import reporting
from pipeline.tracking.store import compare_runs_url

# The parameters a sweep varies are the ones worth seeing side by side.
KEY_PARAMETERS = SWEEP_GRID_PARAMETERS
FINAL_METRICS = (
    names.TEST_ACCURACY,
    names.TEST_LOSS,
    names.VAL_ACCURACY,
    names.VAL_LOSS,
    names.EPOCHS_COMPLETED,
)
PLOTTED_METRICS = (names.VAL_ACCURACY, names.VAL_LOSS, names.LEARNING_RATE)
RUN_COLUMNS = ("rank", "run_id", "run_name", "status")
COLUMNS = RUN_COLUMNS + KEY_PARAMETERS + FINAL_METRICS + (names.TAG_STOP_REASON,)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The compared runs, best first, and their table.

    Args:
        experiment: where the runs are.
        runs: the compared runs, best first by the ranking.
        rows: one row per run, keyed by COLUMNS, values as MLflow holds them (text).
        url: the MLflow UI compare view of exactly these runs.
    """

    experiment: Experiment
    runs: tuple[Run, ...]
    rows: tuple[dict[str, str], ...]
    url: str

    @property
    def run_ids(self) -> list[str]:
        return [run.info.run_id for run in self.runs]

    def table_text(self) -> str:
        """The table as aligned text for the console: run ids cut to 8 characters (the CSV and the
        compare view have them whole), metrics rounded to 4 decimals."""
        shown = [row | {"run_id": row["run_id"][:8]} for row in self.rows]
        rounded = [name for name in FINAL_METRICS if name != names.EPOCHS_COMPLETED]
        return reporting.text_table(COLUMNS, shown, rounded=rounded)

    def table_csv(self) -> str:
        return reporting.csv_table(COLUMNS, self.rows)


def compare_runs(
    client: MlflowClient, experiment: Experiment, filter_string: str, top: int, ranking: Ranking
) -> Comparison:
    """The experiment's `top` best training runs matching `filter_string` (any status), best first.

    Raises:
        RunSelectionError: no training run matches.
        ParameterError: the filter is not a valid MLflow search filter.
    """
    runs = ranking.best_first(training_runs(client, experiment.experiment_id, filter_string, finished_only=False))
    if not runs:
        matching = f" matching {filter_string!r}" if filter_string.strip() else ""
        raise RunSelectionError(f"experiment {experiment.name!r} has no training run{matching} to compare")
    chosen = tuple(runs[:top])
    rows = tuple(_row(rank, run) for rank, run in enumerate(chosen, start=1))
    url = compare_runs_url(experiment.experiment_id, [run.info.run_id for run in chosen], client.tracking_uri)
    return Comparison(experiment=experiment, runs=chosen, rows=rows, url=url)


def _row(rank: int, run: Run) -> dict[str, str]:
    row = {
        "rank": str(rank),
        "run_id": run.info.run_id,
        "run_name": run.info.run_name or "",
        "status": run.info.status,
    }
    row |= {name: run.data.params.get(name, "") for name in KEY_PARAMETERS}
    row |= {name: _metric_text(run, name) for name in FINAL_METRICS}
    row[names.TAG_STOP_REASON] = run.data.tags.get(names.TAG_STOP_REASON, "")
    return row


def _metric_text(run: Run, name: str) -> str:
    value = run.data.metrics.get(name)
    if value is None:
        return ""
    return str(int(value)) if name == names.EPOCHS_COMPLETED else repr(value)


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
    varying = [name for name in KEY_PARAMETERS if len({row[name] for row in comparison.rows}) > 1]
    histories = {}
    for row, run in zip(comparison.rows, comparison.runs, strict=True):
        settings = ", ".join(f"{name}={row[name]}" for name in varying)
        label = f"{row['rank']}. {row['run_name'] or run.info.run_id[:8]}" + (f" ({settings})" if settings else "")
        histories[label] = {
            metric: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
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
