"""Entry point `sweep`: a grid of training runs under one parent run."""

from __future__ import annotations

import sys

import click

from mlflow_project.common import (
    configure_console_logging,
    experiment_option,
    given,
    import_tensorflow_quietly,
    one_line_errors,
    parameter_options,
)
from pipeline.config import SWEEP_PARAMETERS


@click.command("sweep")
@parameter_options(SWEEP_PARAMETERS)
@experiment_option(
    "Experiment of the sweep (default: MLFLOW_EXPERIMENT_NAME, else MLflow's 'Default'). "
    "Under `mlflow run`, the run MLflow created is the parent."
)
def sweep(experiment_name: str | None, **values: str | None) -> None:
    """Train every combination of the listed values, each as a child run of one sweep run."""
    configure_console_logging()
    with one_line_errors():
        from pipeline.config import parse_parameters, sweep_grid

        options = parse_parameters(SWEEP_PARAMETERS, given(values))
        configs = sweep_grid(options)
        import_tensorflow_quietly()
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")  # retracing notices: several models train in one process
        from pipeline.experiments.runs import Ranking
        from pipeline.experiments.sweep import run_sweep

        sweep_params = {name: str(value) for name, value in options.items()}
        result = run_sweep(configs, Ranking.from_options(options), sweep_params, experiment_name)
    click.echo(f"Sweep run {result.parent_run_id}: {len(result.trials)} trials, {len(result.failed)} failed")
    click.echo(result.table_text())
    if result.best is None:
        click.echo("error: every trial of the sweep failed", err=True)
        sys.exit(1)
    click.echo(f"Best: trial {result.best.number}, run {result.best.run.info.run_id} "
               f"({options['metric']}={result.best.run.data.metrics[options['metric']]:.4f})")
