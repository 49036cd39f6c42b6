"""The team's MLflow tracking server as a real local process, started the way docker-compose starts it.

`TrackingServer` runs `docker/start-mlflow-server.sh`, the script the compose `mlflow` service runs,
so what tests, developers and CI start natively is what the team runs in containers: basic-auth on,
artifacts proxied by the server (`mlflow-artifacts:/`), users and permissions in the backend database.

Everything a server instance keeps lives in one root directory, so that stopping it and starting it
again (the same object, or a new one on the same root) finds the same runs, artifacts and users:

    ROOT/artifacts/              what `--artifacts-destination` points at
    ROOT/admin-credentials.json  the generated admin password and Flask secret (mode 0600)
    ROOT/server.log              the server's output, appended at each start
    ROOT/mlflow.db               the backend store, when no other URI is given (SQLite)

`mlflow server` spawns uvicorn workers (and, when MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true, a job
runner and huey consumers); the script is started in its own session and stopping kills that whole
process group, so nothing is left running. Being in its own session, the group never sees a Ctrl-C
meant for the caller: only stop() ends it. So a Ctrl-C (or SIGTERM) arriving while the server is being
started or stopped is held until that step is over, never let to cut it short (a server started but
not yet recorded would run on unowned; a stop cut short would leave the group running, or a
`subprocess` lock held that makes the next wait time out).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests

from pipeline.errors import TrackingServerError
from pipeline.tracking.process_group import free_port, poll, signal_group, signals_held, wait_for_group
from pipeline.tracking.server_stores import SQLITE_FILE, AdminCredentials, ArtifactStore, redacted

logger = logging.getLogger(__name__)

SERVER_SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "start-mlflow-server.sh"
CREDENTIALS_FILE = "admin-credentials.json"
ARTIFACTS_DIR = "artifacts"
LOG_FILE = "server.log"


class TrackingServer:
    """One MLflow tracking server process, with auth, proxied artifacts and a clean stop.

    Use it as a context manager, or call start() / stop() / restart(). The port, chosen free at the
    first start unless given, is kept across restarts, so clients keep their URI while the server is
    stopped and started again (outage tests rely on it).

    Args:
        root: the directory holding everything this server keeps (see the module docstring).
        backend_store_uri: runs, users and permissions; default: SQLite in root.
        host: the interface to listen on.
        port: the port; default: a free one.
        artifact_store: where artifacts are kept; default: the directory `artifacts` in root.

    Attributes:
        workers: server worker processes (1, as compose runs it: see MLFLOW_WORKERS in the start script).
        startup_timeout: seconds to wait for `/health` before giving up.
        script: the start script (the one the compose `mlflow` service runs).
    """

    workers = 1
    startup_timeout = 120.0
    script = SERVER_SCRIPT

    def __init__(
        self,
        root: Path,
        backend_store_uri: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        artifact_store: ArtifactStore | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / SQLITE_FILE}"
        self.host = host
        self.port = port
        self.artifact_store = artifact_store or ArtifactStore(str(self.root / ARTIFACTS_DIR))
        self._credentials: AdminCredentials | None = None
        self._process: subprocess.Popen | None = None
        self._scratch_dir: Path | None = None

    @property
    def artifacts_dir(self) -> Path:
        return self.root / ARTIFACTS_DIR

    @property
    def log_path(self) -> Path:
        return self.root / LOG_FILE

    @property
    def credentials_path(self) -> Path:
        return self.root / CREDENTIALS_FILE

    @property
    def uri(self) -> str:
        if self.port is None:
            raise TrackingServerError("the tracking server has no port yet: start it first")
        return f"http://{self.host}:{self.port}"

    @property
    def username(self) -> str:
        return self._admin().username

    @property
    def password(self) -> str:
        return self._admin().password

    @property
    def pid(self) -> int | None:
        """The server's process id, which is also its process group id (None when stopped)."""
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and poll(self._process) is None

    def client_environment(self) -> dict[str, str]:
        """The variables a client (mlflow run, our CLI, MlflowClient) needs to use this server."""
        return {
            "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }

    def server_environment(self) -> dict[str, str]:
        """The settings the start script reads (see docker/start-mlflow-server.sh)."""
        credentials = self._admin()
        return self.artifact_store.environment | {
            "MLFLOW_BACKEND_STORE_URI": self.backend_store_uri,
            "MLFLOW_ARTIFACTS_DESTINATION": self.artifact_store.destination,
            "MLFLOW_AUTH_ADMIN_USERNAME": credentials.username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": credentials.password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": credentials.flask_secret_key,
            "MLFLOW_HOST": self.host,
            "MLFLOW_PORT": str(self.port),
            "MLFLOW_WORKERS": str(self.workers),
        }

    def start(self) -> TrackingServer:
        """Starts the server and returns once it answers `/health` and accepts the admin credentials.

        Raises:
            TrackingServerError: it exited, did not answer in time, or refuses the saved credentials.
        """
        if self.running:
            return self
        if not self.script.is_file():
            raise TrackingServerError(f"the server start script {self.script} is missing")
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        self._scratch_dir = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
        environment = os.environ | self.server_environment() | {
            # The `mlflow` the script runs is the one next to this Python; its temporary files
            # (the generated auth config among them) go to a directory removed at stop.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "TMPDIR": str(self._scratch_dir),
        }
        try:
            # Until self._process records it, a Ctrl-C would leave the new server running unowned.
            with open(self.log_path, "ab") as log, signals_held():
                log.write(f"--- starting {self.uri} on {redacted(self.backend_store_uri)}\n".encode())
                log.flush()
                self._process = subprocess.Popen(
                    ["bash", str(self.script)],
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            logger.info("starting MLflow server at %s (process group %s)", self.uri, self._process.pid)
            self._wait_until_healthy()
            self._check_admin_credentials()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the server's whole process group (uvicorn workers, job runner, huey consumers) and waits for it.

        A Ctrl-C or SIGTERM arriving meanwhile takes effect once the group is gone (at most
        2 x `timeout`), so a second Ctrl-C never leaves the server running.

        Args:
            timeout: seconds to wait after SIGTERM before the group gets SIGKILL.
        """
        with signals_held():
            process, self._process = self._process, None
            if process is not None:
                group = process.pid
                signal_group(group, signal.SIGTERM)
                if not wait_for_group(process, group, timeout):
                    logger.warning("MLflow server group %s ignored SIGTERM for %.0f s; killing it", group, timeout)
                    signal_group(group, signal.SIGKILL)
                    wait_for_group(process, group, timeout)
            if self._scratch_dir is not None:
                shutil.rmtree(self._scratch_dir, ignore_errors=True)
                self._scratch_dir = None

    def restart(self) -> TrackingServer:
        """Stops the server and starts it again on the same port, database and artifact directory."""
        self.stop()
        return self.start()

    def __enter__(self) -> TrackingServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _admin(self) -> AdminCredentials:
        if self._credentials is None:
            self._credentials = AdminCredentials.load_or_create(self.credentials_path)
        return self._credentials

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            status = poll(self._process)
            if status is not None:
                raise TrackingServerError(
                    f"the MLflow server exited with status {status} before answering /health: "
                    f"{_last_line(self.log_path)} (the whole log: {self.log_path})"
                )
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise TrackingServerError(
            f"the MLflow server did not answer {self.uri}/health within {self.startup_timeout:.0f} s: "
            f"{_last_line(self.log_path)} (the whole log: {self.log_path})"
        )

    def _check_admin_credentials(self) -> None:
        response = requests.get(
            f"{self.uri}/api/2.0/mlflow/users/get",
            params={"username": self.username},
            auth=(self.username, self.password),
            timeout=30,
        )
        if response.status_code == 401:
            raise TrackingServerError(
                f"the server refuses the admin password in {self.credentials_path}: the user store "
                f"({redacted(self.backend_store_uri)}) already has user {self.username!r} with another "
                "password; use the root directory that created it, or a fresh database"
            )
        if response.status_code != 200:
            raise TrackingServerError(
                f"the server answered HTTP {response.status_code} when asked for its admin user; "
                f"see {self.log_path}"
            )


def _last_line(path: Path) -> str:
    """The log's last non-empty line: where a failed start says why."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        lines = []
    return lines[-1] if lines else "(nothing logged)"

