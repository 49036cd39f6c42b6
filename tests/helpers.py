"""Paths and process helpers for the tests."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / "data"
MNIST_SMALL = DATA_DIR / "mnist-small.npz"  # 1,500 train + 300 test real MNIST digits
FASHION_SMALL = DATA_DIR / "fashion-small"  # 500 train + 100 test real Fashion-MNIST, IDX .gz


def project_env(**extra: str) -> dict[str, str]:
    """Environment for a child process of this project: our venv first on PATH (so that
    `mlflow run --env-manager local` finds this Python), no inherited MLflow run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(PROJECT_DIR)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra)
    return env


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


def mlflow_project_run(
    entry_point: str,
    params: dict[str, str],
    experiment: str,
    cwd: Path,
    tracking: dict[str, str],
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """`mlflow run PROJECT -e ENTRY_POINT --env-manager local` as a real process."""
    args = ["mlflow", "run", str(PROJECT_DIR), "-e", entry_point, "--env-manager", "local",
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
