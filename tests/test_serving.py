"""The champion the `serve` service serves (pipeline/experiments/serving.py, `mnist-pipeline serve`): it waits,
saying so once, while the registered model or its alias does not exist, then serves the version the
alias points at. The compose stack test serves it for real (tests/test_compose_stack.py)."""

from __future__ import annotations

import logging

import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.serving import wait_for_champion
from tests.helpers import run_cli


def test_waits_while_there_is_no_champion_saying_so_once_then_returns_its_version(sqlite_store, caplog):
    client = MlflowClient()
    waits = []

    def sleep(seconds: float) -> None:  # what happens meanwhile: a model, a version, then the alias
        waits.append(seconds)
        if len(waits) == 1:
            client.create_registered_model("digits")
        elif len(waits) == 2:
            client.create_model_version("digits", "file:///nowhere", run_id=None)
            client.create_model_version("digits", "file:///nowhere", run_id=None)
        else:
            client.set_registered_model_alias("digits", names.CHAMPION_ALIAS, "1")

    with caplog.at_level(logging.INFO, logger="pipeline"):
        uri = wait_for_champion(client, "digits", poll_seconds=7, sleep=sleep)
    assert uri == "models:/digits/1"
    assert waits == [7, 7, 7]
    lines = [record.getMessage() for record in caplog.records if record.name == "pipeline.experiments.serving"]
    assert lines == ["No champion yet: models:/digits@champion does not exist; waiting for `register` to set it "
                     "(checking every 7 s)"]


def test_returns_at_once_when_the_champion_exists(sqlite_store):
    client = MlflowClient()
    client.create_registered_model("digits")
    for _ in range(2):
        client.create_model_version("digits", "file:///nowhere", run_id=None)
    client.set_registered_model_alias("digits", names.CHAMPION_ALIAS, "2")

    def never(seconds: float) -> None:
        pytest.fail("waited although the champion exists")

    assert wait_for_champion(client, "digits", poll_seconds=1, sleep=never) == "models:/digits/2"


def test_a_bad_model_name_exits_2_in_one_line(tmp_path):
    result = run_cli(["serve", "--model-name", "no spaces"], cwd=tmp_path,
                     MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "model_name" in line


@pytest.mark.parametrize("args", [["--port", "0"], ["--poll-seconds", "0"]])
def test_out_of_range_options_exit_2_naming_the_option(args, tmp_path):
    """click's own usage error, as for every command's typed options."""
    result = run_cli(["serve", *args], cwd=tmp_path, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == 2
    assert f"Invalid value for '{args[0]}'" in result.stderr and "Traceback" not in result.stderr
