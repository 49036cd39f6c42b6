"""How runs rank (pipeline.experiments.runs.Ranking) and the pure helpers of run selection, on MLflow's own
entities built in memory: the metric in its mode, then the lower test_loss, then the earlier run, runs
without the metric (or with a NaN) last; the same order on runs and on a search_runs DataFrame. The
order on runs read from a real store is tests/test_registry.py's (slow) tie test."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mlflow.entities import Metric, Run, RunData, RunInfo
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.store.entities.paged_list import PagedList

from pipeline import constants as names
from pipeline.config import COMPARE_PARAMETERS
from pipeline.errors import ParameterError
from pipeline.experiments.runs import Ranking, all_pages, training_runs_filter, user_filter_errors

pytestmark = pytest.mark.timeout(30)


def _run(run_id: str, start: int | None = 1000, **metrics: float) -> Run:
    info = RunInfo(run_id, "1", "user", "FINISHED", start, None, "active")
    return Run(info, RunData(metrics=[Metric(key, value, 0, 0) for key, value in metrics.items()]))


def _order(ranking: Ranking, runs: list[Run]) -> list[str]:
    return [run.info.run_id for run in ranking.best_first(runs)]


def _frame(runs: list[Run]) -> pd.DataFrame:
    """What mlflow.search_runs returns for `runs`: run_id, start_time (UTC timestamps), metrics.* (NaN when
    a run lacks one)."""
    metrics = sorted({key for run in runs for key in run.data.metrics})
    return pd.DataFrame({
        "run_id": [run.info.run_id for run in runs],
        "start_time": pd.to_datetime([run.info.start_time for run in runs], unit="ms", utc=True),
        **{f"metrics.{key}": [run.data.metrics.get(key, math.nan) for run in runs] for key in metrics},
    })


def _sorted_ids(ranking: Ranking, runs: list[Run]) -> list[str]:
    return list(ranking.sort(_frame(runs))["run_id"])


def test_the_metric_ranks_first_in_its_mode():
    runs = [_run("a", test_accuracy=0.90, test_loss=0.1), _run("b", test_accuracy=0.95, test_loss=0.5),
            _run("c", test_accuracy=0.92, test_loss=0.3)]
    assert _order(Ranking(), runs) == _sorted_ids(Ranking(), runs) == ["b", "c", "a"]
    by_loss = Ranking(names.TEST_LOSS, "min")
    assert _order(by_loss, runs) == _sorted_ids(by_loss, runs) == ["a", "c", "b"]
    by_accuracy_low = Ranking(names.TEST_ACCURACY, "min")
    assert _order(by_accuracy_low, runs) == ["a", "c", "b"]


def test_ties_go_to_the_lower_test_loss_then_the_earlier_run_then_the_run_id():
    runs = [
        _run("late", start=3000, test_accuracy=0.9, test_loss=0.2),
        _run("lossy", start=1000, test_accuracy=0.9, test_loss=0.4),
        _run("b-early", start=2000, test_accuracy=0.9, test_loss=0.2),
        _run("a-early", start=2000, test_accuracy=0.9, test_loss=0.2),
    ]
    expected = ["a-early", "b-early", "late", "lossy"]
    assert _order(Ranking(), runs) == _sorted_ids(Ranking(), runs) == expected


def test_runs_without_the_metric_or_with_a_nan_come_last_and_a_missing_loss_after_a_present_one():
    runs = [
        _run("no-metric", test_loss=0.01),
        _run("nan", test_accuracy=math.nan, test_loss=0.01),
        _run("inf", test_accuracy=math.inf, test_loss=0.01),
        _run("no-loss", test_accuracy=0.5),
        _run("nan-loss", test_accuracy=0.5, test_loss=math.nan),
        _run("worst", test_accuracy=0.1, test_loss=9.0),
        _run("with-loss", start=9000, test_accuracy=0.5, test_loss=9.0),
    ]
    ranked = _order(Ranking(), runs)
    assert ranked[:4] == ["with-loss", "nan-loss", "no-loss", "worst"]
    assert sorted(ranked[4:]) == ["inf", "nan", "no-metric"]
    assert _sorted_ids(Ranking(), runs)[:4] == ranked[:4]
    low = Ranking(names.TEST_ACCURACY, "min")  # a missing metric is last in either mode
    assert _order(low, runs)[:4] == ["worst", "with-loss", "nan-loss", "no-loss"]


def test_a_run_started_at_time_zero_is_the_earliest():
    runs = [_run("a-one", start=1, test_accuracy=0.9, test_loss=0.2),
            _run("z-zero", start=0, test_accuracy=0.9, test_loss=0.2)]
    assert _order(Ranking(), runs) == _sorted_ids(Ranking(), runs) == ["z-zero", "a-one"]


def test_the_dataframe_order_without_a_loss_column_or_a_start_time():
    runs = [_run("a", start=2000, test_accuracy=0.8), _run("b", start=1000, test_accuracy=0.8),
            _run("c", start=3000, test_accuracy=0.9)]
    frame = _frame(runs)
    assert "metrics.test_loss" not in frame
    assert list(Ranking().sort(frame)["run_id"]) == ["c", "b", "a"]
    frame.loc[0, "start_time"] = pd.NaT  # a run whose start time is unknown: the earliest
    assert list(Ranking().sort(frame)["run_id"]) == ["c", "a", "b"]
    ordered = Ranking().sort(frame)
    assert list(ordered.index) == [0, 1, 2]  # a new index, in the new order, and no other column
    assert list(ordered.columns) == list(frame.columns)
    assert list(Ranking(names.TEST_LOSS, "min").sort(frame)["run_id"]) == ["a", "b", "c"]  # none has it


def test_has_metric_is_a_finite_value():
    ranking = Ranking()
    assert ranking.has_metric(_run("zero", test_accuracy=0.0)) is True
    for run in (_run("none", test_loss=0.1), _run("nan", test_accuracy=math.nan),
                _run("inf", test_accuracy=-math.inf)):
        assert ranking.has_metric(run) is False


def test_describe_shows_the_metric_and_test_loss_once_each():
    run = _run("a", test_accuracy=0.96123, test_loss=0.13006)
    assert Ranking().describe(run) == "test_accuracy=0.9612, test_loss=0.1301"
    assert Ranking(names.TEST_LOSS, "min").describe(run) == "test_loss=0.1301"
    assert Ranking("val_accuracy").describe(run) == "val_accuracy=none, test_loss=0.1301"


def test_the_ranking_of_parsed_options():
    assert Ranking.from_options({"metric": "test_loss", "mode": "min"}) == Ranking("test_loss", "min")
    assert Ranking() == Ranking(names.TEST_ACCURACY, "max")


def test_the_training_runs_filter():
    training = f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_TRAINING}'"
    assert training_runs_filter() == f"{training} and attributes.status = 'FINISHED'"
    assert training_runs_filter("  params.dropout = '0.2' ", finished_only=False) == (
        f"{training} and params.dropout = '0.2'"
    )
    assert training_runs_filter("   ") == f"{training} and attributes.status = 'FINISHED'"


def test_all_pages_follows_the_page_tokens_to_the_end():
    pages = {None: PagedList([1, 2], "t1"), "t1": PagedList([3], "t2"), "t2": PagedList([], "t3"),
             "t3": PagedList([4], None)}
    asked = []

    def search(token):
        asked.append(token)
        return pages[token]

    assert list(all_pages(search)) == [1, 2, 3, 4]
    assert asked == [None, "t1", "t2", "t3"]


def test_a_filter_mlflow_refuses_becomes_the_one_line_filter_error_and_other_errors_pass():
    allowed = next(spec.allowed for spec in COMPARE_PARAMETERS if spec.name == "filter")
    with pytest.raises(ParameterError) as raised, user_filter_errors("params.x =="):
        raise MlflowException("bad filter", error_code=INVALID_PARAMETER_VALUE)
    assert (raised.value.name, raised.value.value, raised.value.allowed) == ("filter", "params.x ==", allowed)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    with pytest.raises(MlflowException, match="store down"), user_filter_errors("params.x = '1'"):
        raise MlflowException("store down", error_code=INTERNAL_ERROR)
