"""The registry's decision, apart from the writes: from the run's version and the champion before and after,
what `register` reports (pipeline.experiments.registry: _Decision, _outcome, Registration). The versions it
names are real ones in a SQLite store; no model is trained or logged (tests/test_registry.py does that)."""

from __future__ import annotations

import pytest
from mlflow.entities import Metric, Run, RunData, RunInfo
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.registry import NEW_VERSION, Registration, _Decision, _outcome
from pipeline.experiments.runs import Ranking

pytestmark = pytest.mark.timeout(60)

MODEL = "decided"
ALIAS = f"{MODEL}@{names.CHAMPION_ALIAS}"
STAYS_BECAUSE = "ties go to the lower test_loss, then the earlier run)"


def _run(run_id: str = "r" * 32, **metrics: float) -> Run:
    """A run as the registry reads it (only its id and metrics matter to the decision)."""
    info = RunInfo(run_id, "0", "user", "FINISHED", 1000, 2000, "active")
    return Run(info, RunData(metrics=[Metric(key, value, 0, 0) for key, value in metrics.items()]))


@pytest.fixture
def client(sqlite_store: str) -> MlflowClient:
    return MlflowClient(sqlite_store)


def _version(client: MlflowClient, tmp_path, **metrics: float) -> tuple[str, str]:
    """A real version of MODEL for a new run with `metrics`: (version, run id)."""
    run_id = client.create_run("0").info.run_id
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, str(tmp_path / "model"), run_id)
    return str(version.version), run_id


def _decide(client, run, version, previous, champion, ranking=None, dry_run=False, created=True) -> Registration:
    decision = _Decision(version, created, previous, champion)
    return _outcome(client, MODEL, run, ranking or Ranking(), decision, dry_run=dry_run)


def test_the_first_version_becomes_champion_because_there_was_none(client):
    run = _run(test_accuracy=0.91234, test_loss=0.25)
    moved = _outcome(client, MODEL, run, Ranking(), _Decision("1", True, None, "1"))  # dry_run's default: False
    assert moved == Registration(
        model_name=MODEL, run_id=run.info.run_id, run_summary="test_accuracy=0.9123, test_loss=0.2500",
        version="1", created=True, champion_version="1", champion_moved=True,
        reason=f"{ALIAS} moved to version 1: there was no champion", dry_run=False,
    )
    planned = _decide(client, run, NEW_VERSION, None, NEW_VERSION, dry_run=True)
    assert planned.reason == f"{ALIAS} would move to a new version: there was no champion"
    assert (planned.champion_moved, planned.dry_run, planned.version) == (True, True, NEW_VERSION)


def test_a_champion_already_on_the_runs_version_does_not_move(client):
    registration = _decide(client, _run(test_accuracy=0.9), "3", "3", "3", created=False)
    assert registration.reason == f"{ALIAS} already points at version 3"
    assert (registration.champion_moved, registration.created, registration.champion_version) == (False, False, "3")


def test_a_better_run_moves_the_champion_and_names_the_version_it_beat(client, tmp_path):
    beaten, beaten_run = _version(client, tmp_path, test_accuracy=0.9, test_loss=0.3)
    ours, _ = _version(client, tmp_path, test_accuracy=0.95, test_loss=0.2)
    run = _run(test_accuracy=0.95, test_loss=0.2)
    registration = _decide(client, run, ours, beaten, ours)
    assert registration.reason == (
        f"{ALIAS} moved to version {ours}: it beats version {beaten} "
        f"(run {beaten_run}, test_accuracy=0.9000, test_loss=0.3000)"
    )
    assert registration.champion_moved is True and registration.champion_version == ours
    planned = _decide(client, run, NEW_VERSION, beaten, NEW_VERSION, dry_run=True)
    assert planned.reason.startswith(f"{ALIAS} would move to a new version: it beats version {beaten} (run ")


def test_a_run_that_does_not_beat_the_champion_leaves_it_and_says_why(client, tmp_path):
    champion, champion_run = _version(client, tmp_path, test_accuracy=0.95, test_loss=0.2)
    ours, _ = _version(client, tmp_path, test_accuracy=0.9, test_loss=0.3)
    run = _run(test_accuracy=0.9, test_loss=0.3)
    registration = _decide(client, run, ours, champion, champion)
    assert registration.reason == (
        f"{ALIAS} stays at version {champion} (run {champion_run}, test_accuracy=0.9500, test_loss=0.2000): "
        f"this run does not beat it (test_accuracy, higher is better; {STAYS_BECAUSE}"
    )
    assert (registration.champion_moved, registration.champion_version) == (False, champion)
    by_loss = _decide(client, run, NEW_VERSION, champion, champion, ranking=Ranking(names.TEST_LOSS, "min"),
                      dry_run=True)
    assert by_loss.reason == (
        f"{ALIAS} would stay at version {champion} (run {champion_run}, test_loss=0.2000): "
        f"this run does not beat it (test_loss, lower is better; {STAYS_BECAUSE}"
    )


def test_a_run_without_the_metric_never_moves_the_champion(client):
    run = _run(test_loss=0.1)
    assert _decide(client, run, "2", "1", "1").reason == f"{ALIAS} did not move: the run has no 'test_accuracy'"
    planned = _decide(client, run, NEW_VERSION, None, None, dry_run=True)
    assert planned.reason == f"{ALIAS} would not move: the run has no 'test_accuracy'"
    assert (planned.champion_moved, planned.champion_version) == (False, None)


def test_a_version_deleted_meanwhile_or_whose_run_is_gone_is_still_named(client, tmp_path):
    ours, _ = _version(client, tmp_path, test_accuracy=0.99)
    run = _run(test_accuracy=0.99)
    assert _decide(client, run, ours, "41", ours).reason == (
        f"{ALIAS} moved to version {ours}: it beats version 41 (since deleted)"
    )
    gone_run = "0" * 32
    gone = client.create_model_version(MODEL, str(tmp_path / "model"), gone_run).version
    assert _decide(client, run, ours, str(gone), ours).reason == (
        f"{ALIAS} moved to version {ours}: it beats version {gone} (run {gone_run})"
    )
    runless = client.create_model_version(MODEL, str(tmp_path / "model")).version  # a version of no run
    assert _decide(client, run, ours, str(runless), ours).reason == (
        f"{ALIAS} moved to version {ours}: it beats version {runless} (run None)"
    )


def test_the_two_console_lines_of_each_kind_of_registration():
    def registration(**changes) -> Registration:
        fields = dict(model_name=MODEL, run_id="abc", run_summary="test_accuracy=0.9000, test_loss=0.3000",
                      version="4", created=True, champion_version="4", champion_moved=True, reason="why")
        return Registration(**(fields | changes))

    assert registration().summary_lines() == [
        f"Registered {MODEL} version 4 for run abc (test_accuracy=0.9000, test_loss=0.3000)", "why",
    ]
    assert registration(version=NEW_VERSION, dry_run=True).summary_lines()[0] == (
        f"Dry run: would register a new version of {MODEL} for run abc (test_accuracy=0.9000, test_loss=0.3000)"
    )
    again = f"Run abc is already {MODEL} version 4 (no new version) (test_accuracy=0.9000, test_loss=0.3000)"
    assert registration(created=False).summary_lines()[0] == again
    assert registration(created=False, dry_run=True).summary_lines()[0] == again
