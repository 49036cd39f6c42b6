"""Entry point `compare`: the best training runs side by side (table, overlay plot, UI link)."""

from __future__ import annotations

from pathlib import Path

import click

from mlflow_project.common import configure_console_logging, experiment_command, one_line_errors, open_experiment
from pipeline.config import COMPARE_PARAMETERS


@experiment_command("compare", COMPARE_PARAMETERS)
def compare(experiment_name: str | None, **values: str | None) -> None:
    """Compare the experiment's best training runs: table (CSV), overlay plot (PNG), UI compare link."""
    configure_console_logging()
    with one_line_errors():
        from pipeline import constants as names
        from pipeline.experiments import comparison
        from pipeline.experiments.runs import Ranking
        from pipeline.tracking.store import is_server_uri

        options, workspace = open_experiment(COMPARE_PARAMETERS, values, names.RUN_TYPE_COMPARISON, experiment_name)
        client = workspace.client
        result = comparison.compare_runs(
            client, workspace.experiment, options["filter"], options["top"], Ranking.from_options(options)
        )
        files = comparison.write_outputs(client, result, Path(options["output_dir"]))
        logged_to = None
        if workspace.project_run_id or options["log_run"]:
            logged_to = comparison.log_comparison(client, result, files, run_id=workspace.project_run_id)
    click.echo(f"{len(result.run_ids)} training runs of experiment {workspace.experiment.name!r}, best first "
               f"by {options['metric']} ({options['mode']}):")
    click.echo(result.table_text())
    click.echo(f"Table: {files[0]}")
    click.echo(f"Plot:  {files[1]}")
    if logged_to:
        click.echo(f"Logged to comparison run {logged_to}")
    click.echo(f"Compare view: {result.url}")
    if not is_server_uri(client.tracking_uri):
        click.echo(f"(open it after starting the UI: mlflow ui --backend-store-uri {client.tracking_uri})")
