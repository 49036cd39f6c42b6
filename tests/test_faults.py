"""Fault injection on a real training process: the local disk fills up while checkpointing."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from tests.helpers import MNIST_SMALL, project_env

pytestmark = pytest.mark.slow

FILE_SIZE_LIMIT = 8 * 1024 * 1024  # larger than the SQLite store grows, smaller than the checkpoint


def _limit_file_size() -> None:
    """In the child: files cannot grow past the limit, as on a full disk (EFBIG instead of SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def test_disk_full_while_checkpointing_fails_the_run_in_one_line(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment_id = client.create_experiment("faults")  # the store exists before the limit applies
    result = subprocess.run(
        [sys.executable, "-m", "mlflow_project", "train", "--epochs", "2", "--dataset", str(MNIST_SMALL),
         "--hidden-units", "2048,1024", "--experiment-name", "faults"],
        cwd=tmp_path, env=project_env(MLFLOW_TRACKING_URI=store), capture_output=True, text=True, timeout=300,
        preexec_fn=_limit_file_size,
    )
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: cannot write the run's local files in ")
    assert "File too large" in lines[0] and "free disk space or point TMPDIR" in lines[0]
    [run] = client.search_runs([experiment_id])
    assert run.info.status == "FAILED"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert names.CHECKPOINT_DIR not in artifacts  # nothing half-written was recorded
    assert not client.search_logged_models([experiment_id])  # and no model
