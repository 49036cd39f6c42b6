"""Entry point `register`: register the best training run's model; move `champion` if it wins."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mlflow_project.common import configure_console_logging, experiment_command, one_line_errors, open_experiment
from pipeline.config import REGISTER_PARAMETERS

if TYPE_CHECKING:
    from pipeline.experiments.registry import Registration


@experiment_command("register", REGISTER_PARAMETERS)
def register(experiment_name: str | None, **values: str | None) -> None:
    """Register the best finished training run's model; move the champion alias only if it beats it.

    The model's champion rule (metric, mode) is set by its first registration; another rule is refused
    unless --change-rule true."""
    configure_console_logging()
    with one_line_errors():
        from pipeline import constants as names
        from pipeline.experiments.registry import record_registration, register_best_run
        from pipeline.experiments.runs import Ranking

        options, workspace = open_experiment(REGISTER_PARAMETERS, values, names.RUN_TYPE_REGISTRATION, experiment_name)
        registration = register_best_run(
            workspace.client, workspace.experiment.experiment_id, options["model_name"],
            Ranking.from_options(options), dry_run=options["dry_run"], change_rule=options["change_rule"],
        )
        if workspace.project_run_id:
            record_registration(workspace.client, workspace.project_run_id, registration)
    echo_registration(registration)


def echo_registration(registration: Registration) -> None:
    """What `register` (or `train --register-as`) did, and how to serve the champion."""
    import mlflow

    from pipeline.experiments.serving import champion_alias_uri
    from pipeline.tracking.store import is_server_uri

    for line in registration.summary_lines():
        click.echo(line)
    if registration.champion_version and not registration.dry_run:
        click.echo(
            f"Serve the champion: mlflow models serve -m {champion_alias_uri(registration.model_name)} "
            "--env-manager local"
        )
    if registration.champion_moved and not registration.dry_run and is_server_uri(mlflow.get_tracking_uri()):
        # The compose `serve` service serves the version it found at start; a restart picks up the new one.
        click.echo("On the team stack, roll the served model: docker compose --profile serve restart serve")
