"""A team's load on one tracking server: bench/server_load.py plays K trainings at once, recorded by the
pipeline's own RunRecorder, against the session's native team server (PostgreSQL, basic auth, proxied
artifacts), and nothing may be lost or surfaced to a training. test_compose_stack.py plays the same
against the compose stack, through its TLS proxy."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from tests.helpers import PROJECT_DIR, project_env

TRAININGS = 8
EPOCHS = 3


def play_load(client: MlflowClient, uri: str, environment: dict[str, str], cwd: Path) -> None:
    """Plays TRAININGS trainings of EPOCHS epochs at once against `uri` (bench/server_load.py, whose own
    read-back checks every record and artifact size), then reads every run back with `client`."""
    experiment = f"server-load-{uuid.uuid4().hex[:8]}"
    levels_file = cwd / "levels.json"
    played = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "bench" / "server_load.py"), "--tracking-uri", uri,
         "--trainings", str(TRAININGS), "--epochs", str(EPOCHS), "--epoch-seconds", "0.5", "--per-process", "8",
         "--experiment", experiment, "--json", str(levels_file)],
        env=project_env(**environment), cwd=cwd, capture_output=True, text=True, timeout=220,
    )
    assert played.returncode == 0, played.stdout[-3000:] + played.stderr[-3000:]
    [level] = json.loads(levels_file.read_text())
    assert level["lost"] == [] and level["surfaced"] == [], level
    # every epoch queued one metrics batch, one checkpoint pair and the state files: all went through
    assert level["requests"]["log_batch"]["count"] >= TRAININGS * (EPOCHS + 1), level["requests"]

    # read back independently of the bench's own check
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    assert len(runs) == TRAININGS and {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        for key in names.EPOCH_METRICS:
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(EPOCHS)), key
        last = names.checkpoint_dir(EPOCHS - 1)
        files = {item.path for item in client.list_artifacts(run.info.run_id, last)}
        assert files == {f"{last}/{names.BEST_MODEL_FILE}", f"{last}/{names.BEST_MODEL_INFO_FILE}"}
        assert run.data.tags[names.TAG_LATEST_CHECKPOINT] == names.checkpoint_file(EPOCHS - 1)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eight_trainings_at_once_lose_nothing_and_surface_no_error(tracking_server, tmp_path, monkeypatch):
    for key, value in tracking_server.client_environment().items():
        monkeypatch.setenv(key, value)
    play_load(MlflowClient(tracking_server.uri), tracking_server.uri, tracking_server.client_environment(), tmp_path)
