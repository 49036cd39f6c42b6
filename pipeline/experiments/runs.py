"""An experiment's training runs: which experiment, which runs count, and how they rank.

`register`, `compare` and `sweep` all pick runs the same way. A run counts as a training run only
by its tag `run_type=training` (set by `run_training`), so the runs of the other entry points
(registration, comparison, sweep parents) are never compared or registered. Ranking is a total
order, so every process that ranks the same runs picks the same best one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import mlflow
import pandas as pd
from mlflow.entities import Experiment, LoggedModelStatus, Run, ViewType
from mlflow.environment_variables import MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from mlflow.store.entities.paged_list import PagedList
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import COMPARE_PARAMETERS, RANKING_PARAMETERS, parse_parameters
from pipeline.errors import ParameterError, RunSelectionError
from pipeline.tracking.store import check_tracking_store

T = TypeVar("T")

DEFAULT_EXPERIMENT_ID = "0"
TRAINING_RUNS_FILTER = f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_TRAINING}'"
FINISHED = "FINISHED"


@dataclasses.dataclass(frozen=True)
class Ranking:
    """How runs are ordered, best first.

    Ties on the metric go to the lower `test_loss`, then to the earlier run (start time, then run
    id). Runs without the metric (or with a NaN) come last.

    Args:
        metric: the metric compared (the run's latest value of it).
        mode: `max` when a higher value is better, `min` when a lower one is.
    """

    metric: str = names.TEST_ACCURACY
    mode: str = "max"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Ranking:
        """The ranking of parsed RANKING_PARAMETERS (`metric`, `mode`)."""
        return cls(options["metric"], options["mode"])

    def key(self, run: Run) -> tuple[float, float, int, str]:
        metrics = run.data.metrics
        return self._key(metrics.get(self.metric), metrics.get(names.TEST_LOSS), run.info.start_time, run.info.run_id)

    def _key(self, value: float | None, loss: float | None, start_ms: int | None, run_id: str) -> tuple:
        value, loss = _finite(value), _finite(loss)
        primary = math.inf if value is None else (-value if self.mode == "max" else value)
        return (primary, math.inf if loss is None else loss, start_ms or 0, run_id)

    def sort(self, frame: pd.DataFrame) -> pd.DataFrame:
        """A `mlflow.search_runs` DataFrame, best first (the same order as `best_first` on runs)."""
        def column(name: str) -> list:
            return list(frame[name]) if name in frame else [None] * len(frame)

        starts = [None if pd.isna(t) else int(t.timestamp() * 1000) for t in column("start_time")]
        keys = [
            self._key(_number(value), _number(loss), start, run_id)
            for value, loss, start, run_id in zip(
                column(f"metrics.{self.metric}"), column(f"metrics.{names.TEST_LOSS}"), starts, frame["run_id"],
                strict=True,
            )
        ]
        order = sorted(range(len(frame)), key=keys.__getitem__)
        return frame.iloc[order].reset_index(drop=True)

    def best_first(self, runs: Iterable[Run]) -> list[Run]:
        return sorted(runs, key=self.key)

    def has_metric(self, run: Run) -> bool:
        return _finite(run.data.metrics.get(self.metric)) is not None

    def describe(self, run: Run) -> str:
        """'test_accuracy=0.9612, test_loss=0.1301' for messages."""
        shown = dict.fromkeys((self.metric, names.TEST_LOSS))
        return ", ".join(f"{metric}={_format(run.data.metrics.get(metric))}" for metric in shown)

    @property
    def rule_text(self) -> str:
        """The ranking as stored in a registered model's tag `champion_rule`: 'test_accuracy max'."""
        return f"{self.metric} {self.mode}"

    @classmethod
    def from_rule_text(cls, text: str) -> Ranking | None:
        """The ranking of a `rule_text`; None for a text that is not one (a tag edited by hand)."""
        metric, _, mode = text.strip().rpartition(" ")
        try:
            return cls.from_options(parse_parameters(RANKING_PARAMETERS, {"metric": metric, "mode": mode}))
        except ParameterError:
            return None

    def in_words(self) -> str:
        """'test_accuracy, higher is better' for messages."""
        return f"{self.metric}, {'higher' if self.mode == 'max' else 'lower'} is better"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _number(value: object) -> float | None:
    """A DataFrame cell as a float, None for a missing value."""
    return None if value is None or pd.isna(value) else float(value)


def _format(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def resolve_experiment(client: MlflowClient, name: str | None = None) -> Experiment:
    """The experiment to act on: `name` when given, else the current one (MLFLOW_EXPERIMENT_ID,
    set by `mlflow run`; else MLFLOW_EXPERIMENT_NAME; else MLflow's `Default`).

    Raises:
        RunSelectionError: the experiment does not exist.
    """
    if name:
        experiment = client.get_experiment_by_name(name)
    elif experiment_id := MLFLOW_EXPERIMENT_ID.get():
        experiment = client.get_experiment(experiment_id)
    elif env_name := MLFLOW_EXPERIMENT_NAME.get():
        experiment = client.get_experiment_by_name(env_name)
        name = env_name
    else:
        experiment = client.get_experiment(DEFAULT_EXPERIMENT_ID)
    if experiment is None:
        raise RunSelectionError(f"experiment {name!r} does not exist in {client.tracking_uri}")
    return experiment


def training_runs_filter(filter_string: str = "", finished_only: bool = True) -> str:
    """The MLflow search filter of an experiment's training runs, narrowed by `filter_string`."""
    conditions = [TRAINING_RUNS_FILTER]
    if finished_only:
        conditions.append(f"attributes.status = '{FINISHED}'")
    if filter_string.strip():
        conditions.append(filter_string.strip())
    return " and ".join(conditions)


@contextlib.contextmanager
def user_filter_errors(filter_string: str) -> Iterator[None]:
    """An MLflow search filter that MLflow refuses becomes the one-line `filter` error."""
    try:
        yield
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(INVALID_PARAMETER_VALUE):
            raise
        filter_spec = next(spec for spec in COMPARE_PARAMETERS if spec.name == "filter")
        raise ParameterError("filter", filter_string, filter_spec.allowed) from None


def training_runs(
    client: MlflowClient, experiment_id: str, filter_string: str = "", finished_only: bool = True
) -> list[Run]:
    """The experiment's training runs (not deleted), optionally narrowed by an MLflow search filter.

    Raises:
        ParameterError: `filter_string` is not a valid MLflow search filter.
    """
    with user_filter_errors(filter_string):
        return list(_search_runs(client, experiment_id, training_runs_filter(filter_string, finished_only)))


def runs_frame(client: MlflowClient, experiment_id: str, filter_string: str) -> pd.DataFrame:
    """`mlflow.search_runs` (every page, as a DataFrame) on `client`'s store: the active runs matching
    `filter_string`."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)  # mlflow.search_runs reads the fluent API's store
    try:
        return mlflow.search_runs([experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY)
    finally:
        mlflow.set_tracking_uri(previous)


def all_pages(search: Callable[[str | None], PagedList[T]]) -> Iterator[T]:
    """Every result of an MLflow search, page after page: `search(page_token)` returns one page."""
    page_token = None
    while True:
        page = search(page_token)
        yield from page
        if not page.token:
            return
        page_token = page.token


def _search_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> Iterator[Run]:
    return all_pages(lambda token: client.search_runs(
        [experiment_id], filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
    ))


def logged_models_by_run(client: MlflowClient, experiment_id: str, run_id: str | None = None) -> dict[str, str]:
    """run id -> id of the READY logged model `model` it produced (MLflow 3 LoggedModels); only
    `run_id`'s when given."""
    filter_string = f"name = '{names.MODEL_NAME}'" + (f" and source_run_id = '{run_id}'" if run_id else "")
    found: dict[str, str] = {}
    models = all_pages(lambda token: client.search_logged_models(
        [experiment_id], filter_string=filter_string, page_token=token
    ))
    for model in models:
        if model.source_run_id and model.status == LoggedModelStatus.READY:
            found.setdefault(model.source_run_id, model.model_id)
    return found


def best_registrable_run(client: MlflowClient, experiment: Experiment, ranking: Ranking) -> tuple[Run, str]:
    """The best FINISHED training run that has a logged model and the ranking metric, and the id
    of that logged model.

    Raises:
        RunSelectionError: no run qualifies; the message says which condition nothing met.
    """
    runs = training_runs(client, experiment.experiment_id)
    where = f"experiment {experiment.name!r}"
    if not runs:
        raise RunSelectionError(
            f"{where} has no finished training run (tag {names.TAG_RUN_TYPE}={names.RUN_TYPE_TRAINING}); "
            "train one first: mlflow run ."
        )
    models = logged_models_by_run(client, experiment.experiment_id)
    with_model = [run for run in runs if run.info.run_id in models]
    if not with_model:
        raise RunSelectionError(
            f"none of the {len(runs)} finished training runs of {where} has a logged model "
            f"'{names.MODEL_NAME}'"
        )
    ranked = [run for run in ranking.best_first(with_model) if ranking.has_metric(run)]
    if not ranked:
        raise RunSelectionError(
            f"none of the {len(with_model)} finished training runs with a model in {where} has "
            f"the metric {ranking.metric!r}"
        )
    return ranked[0], models[ranked[0].info.run_id]


@dataclasses.dataclass(frozen=True)
class Workspace:
    """What an entry point that acts on an experiment's runs works with.

    Args:
        client: the tracking and registry client.
        experiment: the experiment acted on.
        project_run_id: the run `mlflow run` created for the entry point, if any.
    """

    client: MlflowClient
    experiment: Experiment
    project_run_id: str | None


def open_workspace(run_type: str, experiment_name: str | None = None) -> Workspace:
    """Checks the tracking store, tags the run `mlflow run` created for this entry point (MLFLOW_RUN_ID)
    with `run_type` at once, so that it never counts as a training run, and finds the experiment.

    Raises:
        TrackingUnavailable: the tracking server does not answer or refuses the credentials.
        RunSelectionError: the experiment does not exist.
    """
    check_tracking_store()
    client = MlflowClient()
    run_id = os.environ.get(MLFLOW_RUN_ID.name) or None
    if run_id:
        client.set_tag(run_id, names.TAG_RUN_TYPE, run_type)
    return Workspace(client, resolve_experiment(client, experiment_name), run_id)
