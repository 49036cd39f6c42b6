"""The Optuna sweep as users run it: real `sweep` processes, a real store, the study in a real journal
file or PostgreSQL database; pruning, parallel workers, a killed worker, a continued study, bad specs."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.study import JOURNAL_FILE, open_storage
from tests.conftest import create_database, drop_database
from tests.helpers import MNIST_SMALL, PROJECT_DIR, cli_options, one_line_error, run_cli, run_cli_here

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
FIXED = {"dataset": str(MNIST_SMALL), "epochs": "4", "lr_patience": "1", "es_patience": "5"}


def _sweep(tmp_path: Path, values: dict[str, str], experiment: str, timeout: float = 360):
    result = run_cli(["sweep", "--experiment-name", experiment, *cli_options(FIXED | values)], cwd=tmp_path,
                     timeout=timeout, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _parent_and_children(tmp_path: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    [parent] = client.search_runs([experiment_id], f"tags.{names.TAG_RUN_TYPE} = '{names.RUN_TYPE_SWEEP}'")
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return client, parent, {int(run.data.tags[names.TAG_SWEEP_TRIAL]): run for run in children}


@pytest.mark.timeout(120)
def test_a_paused_trial_whose_run_cannot_be_continued_fails_its_continuation_and_the_sweep_goes_on(sqlite_store):
    """The budget pruner names a paused trial whose run holds no saved state (e.g. its state files were deleted):
    its continuation fails with the reason, the run stays as its pruner left it, and the sweep ends instead of
    offering the same trial again. The sweep's own trial loop, in this process, on a real store and journal."""
    from pipeline.config import parse_parameters
    from pipeline.experiments.pruning import CONTINUES_ATTR
    from pipeline.experiments.runs import Ranking
    from pipeline.experiments.study import ERROR_ATTR, RUN_ID_ATTR, SearchPlan, SharedStudy
    from pipeline.experiments.sweep_record import summarize
    from pipeline.experiments.trials import TrialRunner
    from pipeline.search_space import SWEEP_PARAMETERS

    options = parse_parameters(SWEEP_PARAMETERS, FIXED | {"dropout": "0.0,0.1,0.2", "sampler": "tpe", "trials": "3"})
    plan = SearchPlan.from_options(options)
    client = MlflowClient()
    parent = client.create_run("0", run_name="sweep").info.run_id
    location = str(Path(sqlite_store.removeprefix("sqlite:///")).with_name(JOURNAL_FILE))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(location))
    study = optuna.create_study(storage=storage, direction=plan.direction, pruner=plan.make_pruner())
    runs = []
    for value in (0.9, 0.5, 0.4):  # each paused at the cut (epoch 1 of 4); the first leads
        trial = study.ask()
        plan.space.suggest(trial)
        run_id = client.create_run("0", run_name=f"trial-{trial.number}-pruned", tags={
            "mlflow.parentRunId": parent, names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING,
            names.TAG_STOP_REASON: names.STOP_PRUNED, names.TAG_TRIAL_STATE: "pruned"}).info.run_id
        client.set_terminated(run_id, "KILLED")  # as a pruned trial's run ends; no state saved
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        trial.report(value, 0)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        runs.append(run_id)
    assert study.pruner.to_continue(study).number == 0  # the premise: the budget continues trial 0

    TrialRunner(client, SharedStudy(study, storage, location, parent, created=True), plan, Ranking(), "0").run()

    [continuation] = [trial for trial in study.trials if CONTINUES_ATTR in trial.user_attrs]
    assert (continuation.number, continuation.state) == (3, optuna.trial.TrialState.FAIL)
    assert continuation.user_attrs[ERROR_ATTR] == (
        f"trial 0 cannot be continued: run {runs[0]} is a pruned sweep trial that holds no saved training state "
        "to continue from")
    run = client.get_run(runs[0])
    assert (run.info.status, run.info.run_name) == ("KILLED", "trial-0-pruned")
    assert run.data.tags[names.TAG_TRIAL_STATE] == "pruned" and names.TAG_CONTINUED_BY_TRIAL not in run.data.tags
    assert study.pruner.to_continue(study) is None  # not offered again
    table = summarize(client, SharedStudy(study, storage, location, parent, created=True), Ranking(), "0").table
    assert list(table["state"]) == ["pruned", "pruned", "pruned", "failed"]  # not "continued": it trained no epoch
    assert table["continues"].tolist()[3] == 0


@pytest.mark.timeout(120)
def test_a_pruned_trial_is_never_the_best_even_when_its_record_scores_best(tmp_path, sqlite_store):
    """A pruned trial keeps its whole record, test_accuracy included: even when that beats every finished
    trial, the best trial is a finished one. Real store and journal; the trials' runs with their metrics."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    from pipeline.experiments.runs import Ranking
    from pipeline.experiments.study import RUN_ID_ATTR, SharedStudy
    from pipeline.experiments.sweep_record import record_summary, summarize

    client = MlflowClient()
    experiment_id = client.create_experiment("best")
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / JOURNAL_FILE)))
    study = optuna.create_study(storage=storage, direction="maximize")
    scores = {TrialState.COMPLETE: (0.80, 0.60), TrialState.PRUNED: (0.95, 0.20)}  # test_accuracy, test_loss
    runs = {}
    for number, (state, (accuracy, loss)) in enumerate(scores.items()):
        run_id = client.create_run(experiment_id, run_name=f"trial-{number}", tags={
            "mlflow.parentRunId": parent, names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING}).info.run_id
        client.log_metric(run_id, names.TEST_ACCURACY, accuracy)
        client.log_metric(run_id, names.TEST_LOSS, loss)
        client.set_terminated(run_id)
        study.add_trial(create_trial(
            state=state, value=accuracy if state == TrialState.COMPLETE else None, params={"dropout": number / 10},
            distributions={"dropout": FloatDistribution(0.0, 0.5)}, user_attrs={RUN_ID_ATTR: run_id},
            intermediate_values={0: accuracy}))
        runs[state] = run_id
    shared = SharedStudy(study, storage, str(tmp_path / JOURNAL_FILE), parent, created=True)

    summary = summarize(client, shared, Ranking(), experiment_id)
    assert list(summary.table["state"]) == ["finished", "pruned"]
    assert summary.best["run_id"] == runs[TrialState.COMPLETE]
    record_summary(client, summary, shared, Ranking())
    recorded = client.get_run(parent).data
    assert recorded.tags[names.TAG_BEST_RUN_ID] == runs[TrialState.COMPLETE]
    assert recorded.tags[names.TAG_BEST_TRIAL] == "0"  # Optuna's number of the finished trial
    assert recorded.metrics[names.BEST_METRIC_PREFIX + names.TEST_ACCURACY] == 0.80


def test_a_sweep_ranked_by_a_per_epoch_metric_ranks_records_and_shows_it(tmp_path):
    """Every metric a training run records ranks a sweep: here the last epoch's `loss`, lower is better."""
    result = _sweep(tmp_path, {"sampler": "grid", "learning_rate": "0.01,0.00001", "epochs": "2",
                               "metric": names.LOSS, "mode": "min"}, "by-loss")
    client, parent, trials = _parent_and_children(tmp_path, "by-loss")
    losses = {number: run.data.metrics[names.LOSS] for number, run in trials.items()}
    best = min(losses, key=losses.get)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[names.TAG_BEST_TRIAL] == str(best)
    assert parent.data.tags[names.TAG_BEST_RUN_ID] == trials[best].info.run_id
    assert parent.data.metrics[names.BEST_METRIC_PREFIX + names.LOSS] == losses[best]
    rows = pd.read_csv(client.download_artifacts(parent.info.run_id, names.SWEEP_TRIALS_FILE, str(tmp_path)))
    assert rows.set_index("trial")[names.LOSS].to_dict() == losses
    assert f"Best: trial {best}, run {trials[best].info.run_id} (loss={losses[best]:.4f})" in result.stdout
    # a sweep started from the CLI names its source as `mlflow.start_run` would (program, LOCAL, git commit, user);
    # its trials, created through the client, copy it: the UI's Source column is never "-"
    source = {key: parent.data.tags.get(key) for key in names.SOURCE_TAGS if key in parent.data.tags}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True).stdout
    assert source["mlflow.source.type"] == "LOCAL"
    assert source["mlflow.source.name"] == str(PROJECT_DIR / "mlflow_project" / "__main__.py")
    assert source["mlflow.source.git.commit"] == commit.strip()
    assert source["mlflow.user"]
    for run in trials.values():
        assert {key: run.data.tags.get(key) for key in source} == source


@pytest.mark.timeout(120)
@pytest.mark.parametrize("metric", ["val_f1", names.SLOWEST_WORKER_EPOCH_SECONDS])
def test_a_metric_the_trials_do_not_all_record_is_refused_before_any_trial(tmp_path, metric):
    """A sweep ranks by the trials' own record: a metric they do not all record could rank nothing."""
    values = FIXED | {"metric": metric, "trials": "1", "epochs": "1", "sampler": "random", "pruner": "none",
                      "learning_rate": "1e-3:1e-2:log"}
    result = run_cli(["sweep", "--experiment-name", "refused", *cli_options(values)], cwd=tmp_path, timeout=100,
                     MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line_error(result, f"metric='{metric}'", names.TEST_ACCURACY, names.BEST_VAL_ACCURACY, names.LOSS)
    assert line.startswith("error: parameter metric")
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.glob("*.journal"))  # no parent, no trial


@pytest.mark.timeout(240)
def test_a_trial_the_pruner_would_stop_at_its_last_epoch_finishes(tmp_path):
    """The median pruner (3 start-up trials, judging from the third epoch) judges 3-epoch trials only at their
    last epoch: the far too small rate of the fourth grid point loses there, but it trained fully, so it is a
    finished trial (FINISHED, `trial_state` finished, Optuna COMPLETE with its value: eligible as the best)."""
    values = {"sampler": "grid", "pruner": "median", "learning_rate": "0.01,0.003,0.005,0.00001", "epochs": "3"}
    result = _sweep(tmp_path, values, "last-epoch", timeout=200)
    _, parent, trials = _parent_and_children(tmp_path, "last-epoch")
    assert "Epoch 3: the pruner would stop this trial at its last epoch; it finishes" in result.stdout
    last = trials[3]
    assert last.info.status == "FINISHED" and last.data.tags[names.TAG_TRIAL_STATE] == "finished"
    assert last.data.metrics[names.EPOCHS_COMPLETED] == 3
    assert last.data.tags[names.TAG_STOP_REASON] != names.STOP_PRUNED
    assert (parent.data.tags[names.TAG_FINISHED_TRIALS], parent.data.tags[names.TAG_PRUNED_TRIALS]) == ("4", "0")
    study = optuna.load_study(study_name=parent.data.tags[names.TAG_STUDY_NAME],
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                                  str(tmp_path / JOURNAL_FILE))))
    assert study.trials[3].state.name == "COMPLETE"
    assert study.trials[3].value == last.data.metrics[names.TEST_ACCURACY]


@pytest.mark.timeout(480)  # one sweep process of 8 trials: minutes on a slow CPU beside a training
def test_the_budget_pruner_holds_a_sweep_to_half_the_epochs_and_continues_the_paused_trials_that_lead(tmp_path):
    """6 grid points of 4 epochs may train 12 epochs; a trial goes on at the cut (epoch 1) only among the best third
    of those there, so none of the first two (ASHA's promotion: a trial alone there proves nothing). The large rate,
    first, and the smaller one, second, are paused; the four tiny rates after them rank lower and pause. That leaves
    6 epochs, and the first two rank first and second of the six at the cut: trials 6 and 7 continue their runs
    from epoch 2, best first, on their saved weights, optimizer and counters."""
    values = {"sampler": "grid", "pruner": "budget", "epochs": "4",
              "learning_rate": "0.01,0.001,0.00001,0.00002,0.00003,0.00004"}
    result = _sweep(tmp_path, values, "continued", timeout=420)
    client, parent, trials = _parent_and_children(tmp_path, "continued")
    epochs = {number: int(run.data.metrics[names.EPOCHS_COMPLETED]) for number, run in trials.items()}
    assert epochs == {0: 4, 1: 4, 2: 1, 3: 1, 4: 1, 5: 1}  # 12 epochs: the budget, all of it
    for number in range(6):
        assert f"Trial {number} pruned after epoch 1" in result.stdout
    assert "Trial 6 continues trial 0 from epoch 2: learning_rate=0.01" in result.stdout
    assert "Trial 7 continues trial 1 from epoch 2: learning_rate=0.001" in result.stdout
    study = optuna.load_study(study_name=parent.data.tags[names.TAG_STUDY_NAME],
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                                  str(tmp_path / JOURNAL_FILE))))
    paused, continuation = study.trials[1], study.trials[7]
    assert paused.state.name == "PRUNED" and list(paused.intermediate_values) == [0]
    assert paused.intermediate_values[0] > max(study.trials[n].intermediate_values[0] for n in range(2, 6))
    assert continuation.state.name == "COMPLETE" and continuation.user_attrs["continues_trial"] == 1
    assert list(continuation.intermediate_values) == [1, 2, 3]  # the epochs after the cut only
    run = trials[1]
    assert continuation.user_attrs["mlflow_run_id"] == run.info.run_id and len(trials) == 6  # no run of its own
    assert continuation.value == run.data.metrics[names.TEST_ACCURACY]
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-1"
    assert run.data.tags[names.TAG_TRIAL_STATE] == "finished" and run.data.tags[names.TAG_STOP_REASON] != "pruned"
    assert (run.data.tags[names.TAG_CONTINUED_BY_TRIAL], run.data.tags[names.TAG_RESUMED_FROM_EPOCH]) == ("7", "1")
    val = client.get_metric_history(run.info.run_id, names.VAL_ACCURACY)
    assert sorted(metric.step for metric in val) == [0, 1, 2, 3]  # every epoch once, the paused one kept
    assert next(metric.value for metric in val if metric.step == 0) == pytest.approx(paused.intermediate_values[0])
    loss = {metric.step: metric.value for metric in client.get_metric_history(run.info.run_id, names.LOSS)}
    assert loss[1] < 0.8 * loss[0]  # the curve goes on: a model trained again from scratch starts near loss[0]
    for number in range(2, 6):
        assert trials[number].info.status == "KILLED" and trials[number].data.tags[names.TAG_TRIAL_STATE] == "pruned"
    assert (parent.data.tags[names.TAG_FINISHED_TRIALS], parent.data.tags[names.TAG_PRUNED_TRIALS]) == ("2", "4")
    assert "8 trials (2 finished, 4 pruned, 0 failed; 2 paused, then continued by a later trial)" in result.stdout
    rows = pd.read_csv(client.download_artifacts(parent.info.run_id, names.SWEEP_TRIALS_FILE, str(tmp_path)))
    rows = rows.set_index("trial")
    assert list(rows["state"]) == ["continued"] * 2 + ["pruned"] * 4 + ["finished"] * 2
    assert (rows.loc[6, "continues"], rows.loc[7, "continues"]) == (0, 1)


@pytest.fixture
def study_database() -> str:
    """A PostgreSQL database of its own for Optuna (as a team gives the study next to MLflow's)."""
    name, uri = create_database("mnist_study")
    yield uri
    drop_database(name)


def test_two_workers_share_one_study_and_one_parent_and_take_each_grid_point_once(tmp_path, study_database):
    grid = {"learning_rate": "0.01,0.003", "dropout": "0.1,0.3"}
    result = _sweep(tmp_path, grid | {"workers": "2", "storage": study_database, "study": "shared"}, "workers")
    client, parent, trials = _parent_and_children(tmp_path, "workers")
    assert sorted(trials) == [0, 1, 2, 3]  # every trial a child of the one parent, none twice
    expected = {0: ("0.01", "0.1"), 1: ("0.01", "0.3"), 2: ("0.003", "0.1"), 3: ("0.003", "0.3")}
    assert {n: (r.data.params["learning_rate"], r.data.params["dropout"]) for n, r in trials.items()} == expected
    assert all(run.info.status == "FINISHED" for run in trials.values())
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[names.TAG_STUDY_STORAGE] == study_database  # no password in this URL to hide
    study = optuna.load_study(study_name="shared", storage=study_database)
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"] * 4
    workers = {trial.user_attrs["worker"] for trial in study.trials}
    assert len(workers) == 2, workers  # both processes took trials
    assert "[worker 1] Trial" in result.stdout and "[worker 2] Trial" in result.stdout


def test_the_same_study_name_continues_the_study_and_its_parent(tmp_path):
    values = {"sampler": "random", "pruner": "none", "learning_rate": "1e-3:1e-2:log", "study": "kept", "epochs": "2"}
    _sweep(tmp_path, values | {"trials": "2"}, "continued")
    _, first, _ = _parent_and_children(tmp_path, "continued")
    result = _sweep(tmp_path, values | {"trials": "3"}, "continued")
    client, parent, trials = _parent_and_children(tmp_path, "continued")
    assert parent.info.run_id == first.info.run_id
    assert sorted(trials) == [0, 1, 2]
    assert parent.info.status == "FINISHED" and parent.data.tags[names.TAG_FINISHED_TRIALS] == "3"
    assert "Trial 2 (3/3)" in result.stdout and "Trial 0 " not in result.stdout  # only the new trial ran

    other = run_cli_here(["sweep", *cli_options(FIXED | values | {"dropout": "0.0:0.5"})],
                         MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert other.returncode == 2
    assert one_line_error(other, "study='kept'", "same search space").startswith("error: parameter study")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"learning_rate": "1e-2:1e-4"}, "learning_rate='1e-2:1e-4'"),
        ({"learning_rate": "0:1e-2:log"}, "LOW > 0"),
        ({"dropout": "0.0:1.5"}, "dropout='0.0:1.5'"),
        ({"batch_size": "16:64.5"}, "batch_size='16:64.5'"),
        ({"hidden_units": "64:abc,32"}, "hidden_units='64:abc,32'"),
        ({"dropout": "0.1:0.2:linear"}, "dropout="),
        ({"sampler": "grid", "dropout": "0.0:0.5"}, "a grid has no ranges"),
        ({"learning_rate": "0.1,0.2", "trials": "3"}, "at most the grid's 2 combinations"),
        ({"sampler": "bayes"}, "sampler='bayes'"),
        ({"pruner": "sometimes"}, "pruner='sometimes'"),
        ({"trials": "0"}, "trials='0'"),
        ({"workers": "0"}, "workers='0'"),
        ({"study": "no spaces"}, "study='no spaces'"),
    ],
)
def test_a_bad_search_spec_gives_one_line_and_exit_2_and_starts_nothing(tmp_path, values, fragment):
    result = run_cli_here(["sweep", *cli_options(values)], MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    assert one_line_error(result, fragment).startswith("error: parameter ")
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.glob("*.journal"))


def test_an_unreachable_study_database_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli_here(["sweep", *cli_options(FIXED | {"storage": "postgresql+psycopg2://postgres@127.0.0.1:1/x"})],
                          MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    line = one_line_error(result, "storage='postgresql+psycopg2://postgres@127.0.0.1:1/x'")
    assert line.startswith("error: parameter")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []  # no parent run


def test_a_storage_password_is_never_shown_or_recorded():
    from pipeline.experiments.study import shown_location

    shown = shown_location("postgresql+psycopg2://optuna:s3cret@db.example/optuna")
    assert "s3cret" not in shown and shown.startswith("postgresql+psycopg2://optuna:")
    assert shown_location("/tmp/studies.journal") == "/tmp/studies.journal"
    line = run_cli_here(["sweep", "--storage", "postgresql+psycopg2://optuna:s3cret@127.0.0.1:1/x"],
                        MLFLOW_TRACKING_URI="sqlite:///:memory:").stderr
    assert "s3cret" not in line and "storage=" in line


@pytest.mark.timeout(120)
def test_sweeps_opening_a_new_study_database_at_once_all_get_it(study_database, tmp_path):
    """Sweep pods started together on a fresh PostgreSQL database all create Optuna's schema: released from one
    barrier (threads here, each with its own connection: the race is the database's), each opens the storage; the
    losers of the race (a unique violation on an enum type) open it again."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    barrier, results = threading.Barrier(4), []

    def open_it() -> None:
        barrier.wait()
        try:
            results.append(type(open_storage(study_database, "", client)[0]).__name__)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            results.append(repr(error))

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == ["RDBStorage"] * 4, results
