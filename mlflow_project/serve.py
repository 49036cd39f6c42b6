"""`serve`: serve the registered model's champion over HTTP (`/invocations`), the compose `serve` service.

It waits for the champion (saying so once in its log while there is none), then replaces itself with
`mlflow models serve` of that version, loaded through the tracking server like any other client.
"""

from __future__ import annotations

import os

import click

from mlflow_project.common import configure_console_logging, one_line_errors
from pipeline.config import REGISTER_PARAMETERS

_MODEL_NAME = next(spec for spec in REGISTER_PARAMETERS if spec.name == "model_name")


@click.command("serve")
@click.option("--model-name", default=_MODEL_NAME.default, show_default=True, help=_MODEL_NAME.help)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=5001, show_default=True, help="Port.")
@click.option(
    "--poll-seconds", type=click.FloatRange(min=1), default=15, show_default=True,
    help="How often to look for a champion while there is none.",
)
def serve(model_name: str, host: str, port: int, poll_seconds: float) -> None:
    """Serve the champion version of the registered model; wait for one if there is none yet."""
    configure_console_logging()
    with one_line_errors():
        from mlflow.tracking import MlflowClient

        from pipeline.config import parse_parameters
        from pipeline.experiments.serving import wait_for_champion
        from pipeline.tracking.store import check_tracking_store

        parse_parameters((_MODEL_NAME,), {"model_name": model_name})
        check_tracking_store()
        model_uri = wait_for_champion(MlflowClient(), model_name, poll_seconds)
    click.echo(f"Serving {model_uri} (the champion) on http://{host}:{port}/invocations")
    command = ["mlflow", "models", "serve", "--model-uri", model_uri, "--env-manager", "local",
               "--host", host, "--port", str(port)]
    os.execvp(command[0], command)
