"""`server`: the team's tracking server on this machine, without Docker, until Ctrl-C.

It starts the same script as the compose `mlflow` service (see pipeline/tracking/server.py), prints
what to export, and stops the server's whole process group on Ctrl-C or SIGTERM. The first of them
starts the stop; later ones are ignored, so pressing Ctrl-C again cannot cut the stop short (it is
bounded: SIGTERM, then SIGKILL after 30 s) and leave the server running.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from mlflow_project.common import configure_console_logging, one_line_errors, stop_on_first_signal
from pipeline.errors import TrackingServerError
from pipeline.tracking.server import TrackingServer
from pipeline.tracking.server_stores import DEFAULT_DATABASE, choose_backend_store


@click.command("server")
@click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("mlflow-server"),
    show_default=True,
    help="Directory for the artifacts, the server log, the admin credentials (and the SQLite file).",
)
@click.option(
    "--backend-store-uri",
    default=None,
    help="Backend store URI (postgresql+psycopg2://... or sqlite:///...). Default: database --database "
    "on the PostgreSQL at 127.0.0.1:5432 when one answers there, else SQLite in --root.",
)
@click.option("--database", default=DEFAULT_DATABASE, show_default=True, help="Database on the local PostgreSQL.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port. Default: a free one.")
def server(root: Path, backend_store_uri: str | None, database: str, host: str, port: int | None) -> None:
    """Run the team tracking server locally (auth on, artifacts proxied) until Ctrl-C."""
    configure_console_logging()
    with one_line_errors():
        backend = choose_backend_store(root, backend_store_uri, database)
        click.echo(f"Backend store: {backend.description}")
        tracking_server = TrackingServer(root, backend.uri, host=host, port=port)
        ctrl_c_stops = stop_on_first_signal()
        try:
            with tracking_server:
                _announce(tracking_server, ctrl_c_stops)
                _wait_while_running(tracking_server)
        except KeyboardInterrupt:
            click.echo("Stopped.")


def _announce(tracking_server: TrackingServer, ctrl_c_stops: bool) -> None:
    click.echo(f"Artifacts:     {tracking_server.artifacts_dir} (clients use mlflow-artifacts:/ through the server)")
    click.echo(f"Server log:    {tracking_server.log_path}")
    click.echo(f"UI:            {tracking_server.uri} (sign in as {tracking_server.username})")
    click.echo("\nIn the shell you train from:")
    for name, value in tracking_server.client_environment().items():
        click.echo(f"  export {name}={value}")
    click.echo("  mlflow run . -P epochs=20\n")
    if ctrl_c_stops:
        click.echo("Ctrl-C stops the server.")
    else:
        click.echo(f"Started with Ctrl-C ignored (a background job): `kill {os.getpid()}` stops the server.")


def _wait_while_running(tracking_server: TrackingServer) -> None:
    while tracking_server.running:
        time.sleep(0.5)
    raise TrackingServerError(f"the MLflow server exited on its own; see {tracking_server.log_path}")
