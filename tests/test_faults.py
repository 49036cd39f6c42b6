"""Fault injection on a real training process: the local disk fills up while checkpointing."""

from __future__ import annotations

import contextlib
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from tests.helpers import MNIST_SMALL, new_sqlite_store, one_line_error, project_env

pytestmark = pytest.mark.slow

FILE_SIZE_LIMIT = 8 * 1024 * 1024  # larger than the SQLite store grows, smaller than the checkpoint
SMALL_DISK = "4m"  # room for the run's small files, not for the checkpoint of a 784-1024-10 model (~10 MB)


def _limit_file_size() -> None:
    """In the child: files cannot grow past the limit (EFBIG, "File too large", instead of SIGXFSZ)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


@contextlib.contextmanager
def _small_disk(mount_point: Path) -> Iterator[Path]:
    """A real filesystem of SMALL_DISK bytes at `mount_point` (tmpfs; the tests run as root), unmounted
    afterwards: writing past its size fails with ENOSPC, "No space left on device", as on a full disk."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK},mode=1777", "tmpfs", str(mount_point)],
        capture_output=True, text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"this test needs to mount a small tmpfs (as root): mount failed: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


@pytest.mark.parametrize("fault", ["disk full (ENOSPC)", "file size limit (EFBIG)"])
def test_disk_full_while_checkpointing_fails_the_run_in_one_line(tmp_path, monkeypatch, fault):
    monkeypatch.chdir(tmp_path)  # the experiment's artifacts (./mlruns) go there
    store = new_sqlite_store(tmp_path)  # the store and its artifacts (./mlruns) on the big disk
    client = MlflowClient(store)
    experiment_id = client.create_experiment("faults")  # the store exists before the fault applies
    args = [sys.executable, "-m", "mlflow_project", "train", "--epochs", "2", "--dataset", str(MNIST_SMALL),
            "--hidden-units", "1024", "--experiment-name", "faults"]
    with contextlib.ExitStack() as stack:
        if fault.startswith("disk full"):
            local = stack.enter_context(_small_disk(tmp_path / "small-disk"))
            env, limit, message = project_env(MLFLOW_TRACKING_URI=store, TMPDIR=str(local)), None, "No space left"
        else:
            local = None
            env, limit, message = project_env(MLFLOW_TRACKING_URI=store), _limit_file_size, "File too large"
        result = subprocess.run(
            args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit,
        )
        if local is not None:  # the run's own local directory was removed (Keras leaves an empty tmp*/assets)
            assert list(local.glob("mnist-run-*")) == []
    assert result.returncode == 1, result.stderr
    line = one_line_error(result, message, "free disk space or point TMPDIR")
    assert line.startswith("error: cannot write the run's local files in ")
    if local is not None:
        assert f"in {local}/" in line  # the directory on the full disk
    [run] = client.search_runs([experiment_id])
    assert run.info.status == "FAILED"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert names.CHECKPOINT_DIR not in artifacts  # nothing half-written was recorded
    assert not client.search_logged_models([experiment_id])  # and no model
