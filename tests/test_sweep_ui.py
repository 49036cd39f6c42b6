"""What users see of a sweep in MLflow and Optuna: one numbering (Optuna's, from 0) across the child runs, their
tags, the parent's best trial and the console; a failed trial FAILED with its reason, the sweep going on; pruned
trials KILLED, never resumed nor registered; the parent's params, source and best model as the UI reads them; the
objective named after the metric.

One real sweep through `mlflow run -e sweep` against the session's tracking server (the REST API the UI reads),
the study in a journal file; its records are checked by several tests."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TrainingConfig
from pipeline.experiments.study import JOURNAL_FILE, USER_CACHE
from tests.helpers import MNIST_SMALL, cli_options, mlflow_project_run, one_line_error, run_cli_here
from tests.run_contract import CALLBACKS, assert_run_contract

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# A grid in this order: two good learning rates, one that makes the loss NaN at once (its trial fails for real),
# a third good one, then one far too small. The median pruner (3 finished start-up trials, from the third epoch on)
# stops the last one (Optuna's trial 4) after its third epoch.
GRID = {"sampler": "grid", "pruner": "median", "learning_rate": "0.01,0.003,1e30,0.005,0.00001"}
FAILED, PRUNED = 2, 4
FIXED = {"dataset": str(MNIST_SMALL), "epochs": "4", "lr_patience": "1", "es_patience": "5"}


class Sweep:
    """The finished sweep: its console, client, parent, children by tag `sweep_trial`, and Optuna study."""

    def __init__(self, result, client: MlflowClient, experiment_id: str, journal: Path) -> None:
        self.result, self.client, self.experiment_id = result, client, experiment_id
        [self.parent] = client.search_runs([experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
        children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{self.parent.info.run_id}'")
        self.children = {int(run.data.tags[names.TAG_SWEEP_TRIAL]): run for run in children}
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        self.study = optuna.load_study(study_name=self.parent.data.tags[names.TAG_STUDY_NAME], storage=storage)

    def trials_table(self, directory: Path) -> pd.DataFrame:
        """The parent's trials table, by trial number."""
        path = self.client.download_artifacts(self.parent.info.run_id, names.SWEEP_TRIALS_FILE, str(directory))
        return pd.read_csv(path).set_index("trial")

    def assert_trial_contract(self, number: int, directory: Path, status: str = "FINISHED") -> None:
        """Trial `number`'s run holds the whole run contract of a training (with the trial's pruning callback)."""
        rate = self.study.trials[number].params["learning_rate"]
        config = TrainingConfig.from_values(FIXED | {"learning_rate": str(rate)})
        mlflow.set_tracking_uri(self.client.tracking_uri)  # the contract loads the model through the fluent API
        try:
            assert_run_contract(self.client, self.children[number].info.run_id, config, directory, status=status,
                                callbacks=CALLBACKS.replace("EpochMetricsLogger", "EpochMetricsLogger,TrialPruning"))
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def sweep(shared_tracking, tmp_path_factory) -> Iterator[Sweep]:
    """`mlflow run . -e sweep` with the default storage (HOME in a temporary directory: the journal file in its
    ~/.cache/mnist-pipeline, as for any remote tracking server) and no `study` or `storage` given."""
    home = tmp_path_factory.mktemp("home")
    experiment = f"sweep-ui-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as environment:  # this process's client signs in as the processes do
        for name, value in shared_tracking.items():
            environment.setenv(name, value)
        client = MlflowClient(shared_tracking["MLFLOW_TRACKING_URI"])
        experiment_id = client.create_experiment(experiment)
        result = mlflow_project_run("sweep", FIXED | GRID, experiment, home, shared_tracking | {"HOME": str(home)},
                                    timeout=540)
        assert result.returncode == 0, result.stderr[-3000:]
        journal = home / USER_CACHE.relative_to(Path.home()) / JOURNAL_FILE
        yield Sweep(result, client, experiment_id, journal)


def test_child_runs_carry_optunas_trial_numbers_study_name_and_states(sweep):
    trials = sweep.study.trials
    assert [trial.state.name for trial in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "PRUNED"]
    assert sorted(sweep.children) == [trial.number for trial in trials] == [0, 1, 2, 3, 4]
    shown = {"COMPLETE": ("FINISHED", "finished", ""), "PRUNED": ("KILLED", "pruned", "-pruned"),
             "FAIL": ("FAILED", "failed", "-failed")}
    for trial in trials:
        run = sweep.children[trial.number]
        status, state, suffix = shown[trial.state.name]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.info.run_name == f"trial-{trial.number}{suffix}"
        assert run.info.status == status  # a pruned trial is not shown as a green "Finished"
        assert run.data.tags[names.TAG_TRIAL_STATE] == state
        assert run.data.tags[names.TAG_STUDY_NAME] == sweep.study.study_name
        assert run.data.params["learning_rate"] == str(trial.params["learning_rate"])
        assert run.data.tags[names.TAG_RUN_TYPE] == names.RUN_TYPE_TRAINING
    assert sweep.children[PRUNED].data.tags[names.TAG_STOP_REASON] == names.STOP_PRUNED
    assert sweep.children[FAILED].data.tags[names.TAG_STOP_REASON] == names.STOP_NAN_LOSS


def test_a_pruned_trial_stops_early_with_its_whole_record(sweep, tmp_path):
    """The last grid point (far too small a rate) is pruned after its third epoch, recorded as every run is;
    the parent counts it, never names it best, and its trials table and plots show it."""
    client, parent, trials = sweep.client, sweep.parent, sweep.children
    pruned = trials[PRUNED]
    assert pruned.data.metrics[names.EPOCHS_COMPLETED] == 3
    sweep.assert_trial_contract(PRUNED, tmp_path / "contract", status="KILLED")
    for number in (0, 1, 3):
        assert trials[number].data.tags[names.TAG_STOP_REASON] != names.STOP_PRUNED
    tags = parent.data.tags
    counts = (tags[names.TAG_FINISHED_TRIALS], tags[names.TAG_PRUNED_TRIALS], tags[names.TAG_FAILED_TRIALS])
    assert counts == ("3", "1", "1")
    assert tags[names.TAG_BEST_RUN_ID] != pruned.info.run_id  # a pruned trial is never the best
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id, names.PLOTS_DIR)}
    plots = (names.SWEEP_HISTORY_PLOT, names.SWEEP_IMPORTANCE_PLOT)
    assert artifacts == {f"{names.PLOTS_DIR}/{plot}" for plot in plots}
    rows = sweep.trials_table(tmp_path)
    assert list(rows["state"]) == ["finished", "finished", "failed", "finished", "pruned"]
    assert rows.loc[PRUNED, names.TAG_STOP_REASON] == names.STOP_PRUNED
    assert rows.loc[PRUNED, names.BEST_VAL_ACCURACY] == pruned.data.metrics[names.BEST_VAL_ACCURACY]


def test_a_failed_trial_keeps_its_reason_and_the_sweep_goes_on_with_whole_records(sweep, tmp_path):
    """The diverging trial is FAILED with the reason in its run and the trials table; the trials after it ran, each
    with the whole run contract; the parent names the best finished trial and keeps the grid as given."""
    parent, trials = sweep.parent, sweep.children
    assert trials[FAILED].info.status == "FAILED"
    rows = sweep.trials_table(tmp_path)
    errors = rows["error"].fillna("")
    for number, run in trials.items():
        assert rows.loc[number, "run_id"] == run.info.run_id
        assert rows.loc[number, "status"] == run.info.status
        assert (errors[number] != "") == (run.info.status == "FAILED")
    assert "training diverged" in errors[FAILED]
    assert rows.loc[3, names.TEST_ACCURACY] == trials[3].data.metrics[names.TEST_ACCURACY]
    sweep.assert_trial_contract(3, tmp_path / "contract")  # the trial after the failure: a full training run
    finished = [run for run in trials.values() if run.info.status == "FINISHED"]
    best = max(finished, key=lambda run: run.data.metrics[names.TEST_ACCURACY])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"
    assert parent.data.tags[names.TAG_BEST_RUN_ID] == best.info.run_id
    assert parent.data.metrics["best_" + names.TEST_ACCURACY] == best.data.metrics[names.TEST_ACCURACY]
    assert parent.data.params["learning_rate"] == GRID["learning_rate"]  # the grid, as given


def test_the_objective_is_named_after_the_ranking_metric(sweep):
    assert sweep.study.metric_names == [names.TEST_ACCURACY]  # optuna-dashboard's label, not "Objective 0"


def test_the_parent_names_the_best_trial_by_optunas_number_and_outputs_its_model(sweep):
    best = sweep.study.best_trial
    best_run = sweep.children[best.number]
    tags = sweep.parent.data.tags
    assert tags[names.TAG_BEST_TRIAL] == str(best.number)
    assert tags[names.TAG_BEST_RUN_ID] == best_run.info.run_id
    assert best_run.data.metrics[names.TEST_ACCURACY] == best.value
    # the best trial's logged model is the parent's output: the UI files the sweep with the runs, not under
    # "Evaluation runs", and its page links the model
    [model] = sweep.client.search_logged_models([sweep.experiment_id], filter_string=(
        f"name = '{names.MODEL_NAME}' and source_run_id = '{best_run.info.run_id}'"))
    outputs = sweep.client.get_run(sweep.parent.info.run_id).outputs.model_outputs
    assert [output.model_id for output in outputs] == [model.model_id]


def test_the_parent_logs_only_params_with_a_value_and_its_runs_name_their_source(sweep):
    params = sweep.parent.data.params
    assert "storage" not in params and "study" not in params  # defaults: the study's name and file are tags
    assert "" not in params.values() and "''" not in params.values()
    assert (params["sampler"], params["pruner"]) == ("grid", "median")  # given
    assert params["trials"] == "5"  # not given: the grid's size, as the sweep resolved it
    assert sweep.parent.data.tags[names.TAG_STUDY_STORAGE].endswith(JOURNAL_FILE)
    # `mlflow run` set the parent's source; the trials (created by the sweep through the client) copy it
    source = {key: sweep.parent.data.tags.get(key) for key in names.SOURCE_TAGS}
    assert source["mlflow.source.type"] == "PROJECT" and source["mlflow.project.entryPoint"] == "sweep"
    assert re.fullmatch(r"[0-9a-f]{40}", source["mlflow.source.git.commit"] or "")
    for run in sweep.children.values():
        assert {key: run.data.tags.get(key) for key in names.SOURCE_TAGS} == source


def test_the_console_numbers_trials_as_optuna_does(sweep):
    output = sweep.result.stdout
    for number in range(5):
        assert f"Trial {number} ({number + 1}/5): learning_rate=" in output
    assert f"Trial {PRUNED} pruned after epoch 3" in output
    best = sweep.study.best_trial
    assert f"Best: trial {best.number}, run {sweep.children[best.number].info.run_id}" in output


def test_a_pruned_trial_is_never_resumed_nor_registered(sweep, shared_tracking, tmp_path, monkeypatch):
    from pipeline.experiments.runs import training_runs

    pruned = sweep.children[PRUNED]
    assert pruned.info.run_id not in {run.info.run_id for run in training_runs(sweep.client, sweep.experiment_id)}
    monkeypatch.chdir(tmp_path)
    result = run_cli_here(["train", "--run-id", pruned.info.run_id, *cli_options(FIXED | {"learning_rate": "0.00001"})],
                          **shared_tracking)
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_line_error(result, pruned.info.run_id, "pruned").startswith("error: ")
    assert sweep.client.get_run(pruned.info.run_id).info.status == "KILLED"  # untouched
