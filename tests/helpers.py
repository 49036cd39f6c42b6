"""Paths and process helpers for the tests."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.experiments.serving import JSON_CONTENT_TYPE, request_body

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PROJECT_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / "data"
MNIST_SMALL = DATA_DIR / "mnist-small.npz"  # 1,500 train + 300 test real MNIST digits
FASHION_SMALL = DATA_DIR / "fashion-small"  # 500 train + 100 test real Fashion-MNIST, IDX .gz


@functools.cache
def _created_sqlite_store() -> Path:
    """One MLflow SQLite store created by MLflow in this test process, the original of `new_sqlite_store`'s
    copies: creating a store runs MLflow's schema migrations, ~3 s of CPU each time."""
    from mlflow.tracking import MlflowClient

    directory = Path(tempfile.mkdtemp(prefix="mlflow-store-original-"))
    atexit.register(shutil.rmtree, directory, True)
    database = directory / "mlflow.db"
    MlflowClient(f"sqlite:///{database}").search_experiments(max_results=1)
    return database


def new_sqlite_store(directory: Path) -> str:
    """The URI of a new, empty MLflow SQLite store, directory/mlflow.db, as MLflow creates it when a process
    working in `directory` first opens it (its Default experiment keeps artifacts in directory/mlruns/0).

    A copy of a store created once per test process. Tests of creating a store (first use, several
    processes at once, bad input leaving none behind) use a plain URI instead. The copy's Default experiment
    is moved in MLflow's own table (no API changes it); a schema where that fails stops the test loudly."""
    database = directory / "mlflow.db"
    shutil.copyfile(_created_sqlite_store(), database)
    with contextlib.closing(sqlite3.connect(database)) as connection, connection:
        moved = connection.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (str(directory.resolve() / "mlruns" / "0"),),
        ).rowcount
    if moved != 1:
        raise RuntimeError(f"MLflow's SQLite schema changed: the Default experiment of {database} was not found")
    return f"sqlite:///{database}"


# README: a command whose tracking server is unreachable or refuses it fails in one line before any
# training, after one request with a 10 s timeout.
SERVER_CHECK_TIMEOUT = 10


def fail_fast_bound(start_up: float) -> float:
    """Seconds within which such a command must fail, given one measured start-up (Python, TensorFlow,
    MLflow). Twice the start-up: on a loaded machine one measurement varies that much (CI with a training
    beside it: 13.7 s measured, then 34 s for a command that failed at once). What the bound guards against,
    MLflow's own retries, takes minutes."""
    return 2 * start_up + SERVER_CHECK_TIMEOUT + 20


def project_env(**extra: str) -> dict[str, str]:
    """Environment for a child process of this project: our venv first on PATH (so that
    `mlflow run --env-manager local` finds this Python), no inherited MLflow run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(PROJECT_DIR)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one line a failed command wrote to stderr (`error: ...`, no traceback, nothing else), after
    checking that it holds every fragment; returns it."""
    output = result.stderr + (result.stdout or "")
    assert "Traceback" not in output, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    missing = [fragment for fragment in fragments if fragment not in lines[0]]
    assert not missing, (missing, lines[0])
    return lines[0]


def run_cli(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Runs `python -m mlflow_project ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "mlflow_project", *args],
        cwd=cwd,
        env=project_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_here(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`python -m mlflow_project ARGS` run in this process by click's CliRunner: the same command, exit code
    and console lines, without another process's TensorFlow start-up (~10 s of CPU). MLflow's own log level is the
    CLI's (MLFLOW_LOGGING_LEVEL=WARNING, which a process sets before it imports MLflow; pytest's imported it
    first). An exception the command did not turn into an exit is raised here."""
    from click.testing import CliRunner

    from mlflow_project.cli import cli

    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    mlflow_logger.setLevel(logging.WARNING)
    try:
        result = CliRunner().invoke(cli, args, env={"MLFLOW_RUN_ID": "", **env})
    finally:
        mlflow_logger.setLevel(level)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def resume_here(client: MlflowClient, run_id: str, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`train --run-id RUN_ID ARGS` in this process (run_cli_here), with MLflow's active experiment the run's own,
    as in a new process: MLflow refuses to start a run of another experiment than the one an earlier training in
    this process set."""
    import mlflow

    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    return run_cli_here(["train", "--run-id", run_id, *args], **env)


def cli_options(values: dict[str, str]) -> list[str]:
    """Parameters as the CLI takes them: `{"batch_size": "8"}` -> `["--batch-size", "8"]`."""
    return [part for name, value in values.items() for part in ("--" + name.replace("_", "-"), value)]


def mlflow_project_run(
    entry_point: str,
    params: dict[str, str],
    experiment: str,
    cwd: Path,
    tracking: dict[str, str],
    timeout: float = 300,
    env_manager: str = "local",
) -> subprocess.CompletedProcess:
    """`mlflow run PROJECT -e ENTRY_POINT --env-manager ENV_MANAGER` as a real process."""
    args = ["mlflow", "run", str(PROJECT_DIR), "-e", entry_point, "--env-manager", env_manager,
            "--experiment-name", experiment]
    for name, value in params.items():
        args += ["-P", f"{name}={value}"]
    return subprocess.run(
        args, cwd=cwd, env=project_env(**tracking), capture_output=True, text=True,
        timeout=timeout,
    )


def live_processes_in_group(group: int) -> list[int]:
    """The processes of a process group that still run (zombies waiting to be reaped do not count)."""
    members = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = stat_file.read_text()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may hold spaces: split after it
        state, _parent, process_group = stat.rsplit(")", 1)[1].split()[:3]
        if int(process_group) == group and state != "Z":
            members.append(int(stat_file.parent.name))
    return members


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that are free on 127.0.0.1 now (all held open while they are chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_config(ports: list[int], index: int) -> str:
    """The TF_CONFIG of worker `index` in a cluster of workers on 127.0.0.1 at `ports`."""
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def stdout_lines(process: subprocess.Popen) -> queue.Queue:
    """The lines `process` prints, read by a thread into a queue (None once its stdout ends), so that a
    test can wait for a line with a timeout; the process' stdout must not be read elsewhere."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def rest_of_lines(lines: queue.Queue, timeout: float = 30) -> str:
    """What a process that has ended printed after what was read of `lines` (see `stdout_lines`)."""
    output, deadline = [], time.monotonic() + timeout
    while (line := lines.get(timeout=max(0.1, deadline - time.monotonic()))) is not None:
        output.append(line)
    return "".join(output)


# Straight to the local server: urllib's default opener keeps the proxies of the first call in the
# process (a test elsewhere points them at a dead proxy).
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_for_ping(base_url: str, timeout: float, failure: Callable[[], str | None]) -> None:
    """Waits until a model server at `base_url` answers /ping with 200; fails the test when `failure()`
    returns a reason (the server died) or the time is up."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reason = failure()
        if reason:
            pytest.fail(reason)
        try:
            with _LOCAL.open(f"{base_url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{base_url} did not answer /ping within {timeout} s: {failure() or 'still starting'}")


def invoke(base_url: str, rows: np.ndarray, content_type: str = JSON_CONTENT_TYPE) -> np.ndarray:
    """The predictions of the model served at `base_url` for `rows` (POST /invocations), sent as
    docs/team-server.md shows (`pipeline.experiments.serving.request_body`)."""
    body = request_body(rows, content_type)
    request = urllib.request.Request(f"{base_url}/invocations", body, {"Content-Type": content_type})
    with _LOCAL.open(request, timeout=60) as response:
        return np.array(json.loads(response.read())["predictions"])


@contextmanager
def models_serve(model_uri: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> Iterator[str]:
    """`mlflow models serve -m MODEL_URI --env-manager local` as a real process on a free port; yields its
    base URL once it answers /ping, and stops its whole process group after."""
    [port] = free_ports(1)
    log = cwd / "serve.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-p", str(port)],
            cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=output, start_new_session=True,
        )
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_for_ping(base_url, timeout, lambda: server.poll() is not None and (
            f"mlflow models serve exited {server.returncode}: {log.read_text()[-3000:]}"
        ))
        yield base_url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


_PREDICT = """
import json, sys, time, numpy as np, mlflow, keras
rows = np.load(sys.argv[1])
for model_uri in sys.argv[2:]:
    started = time.monotonic()
    predictions = mlflow.pyfunc.load_model(model_uri).predict(rows).tolist()
    print(json.dumps({"predictions": predictions, "seconds": time.monotonic() - started}), flush=True)
"""


def predict_in_new_process(
    model_uri: str, rows: np.ndarray, cwd: Path, env: dict[str, str]
) -> tuple[np.ndarray, float]:
    """`mlflow.pyfunc.load_model(model_uri).predict(rows)` in a new Python process with `env`, as a
    teammate's notebook runs it; returns the predictions and the seconds the load and the prediction took. Not the
    process's start-up (importing MLflow and TensorFlow): that is CPU alone, and on a busy 2-core machine it took
    most of the 76 s a whole process took in CI beside a training."""
    [answer] = predict_each_in_one_new_process([model_uri], rows, cwd, env)
    return answer


def predict_each_in_one_new_process(
    model_uris: list[str], rows: np.ndarray, cwd: Path, env: dict[str, str]
) -> list[tuple[np.ndarray, float]]:
    """predict_in_new_process for each of `model_uris` in turn, in one new process (one start-up): the first load
    is a new process's; the later ones find MLflow's and TensorFlow's lazy imports done."""
    rows_file = cwd / "rows.npy"
    np.save(rows_file, rows)
    result = subprocess.run(
        [sys.executable, "-c", _PREDICT, str(rows_file), *model_uris], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"predictions"')]
    assert len(answers) == len(model_uris), result.stdout[-3000:]
    return [(np.array(answer["predictions"]), answer["seconds"]) for answer in answers]
