"""Entry point `main` / `train`: one training run, recorded in MLflow."""

from __future__ import annotations

import click

from mlflow_project.common import (
    configure_console_logging,
    given,
    import_tensorflow_quietly,
    one_line_errors,
    parameter_options,
)
from pipeline.config import TRAINING_PARAMETERS, TRAINING_RUN_OPTIONS


@click.command("train")
@parameter_options(TRAINING_PARAMETERS + TRAINING_RUN_OPTIONS)
@click.option(
    "--experiment-name",
    default=None,
    help="Experiment of a new run (default: MLFLOW_EXPERIMENT_NAME, else MLflow's 'Default'). "
    "Under `mlflow run`, the run MLflow created is used.",
)
def train(experiment_name: str | None, **values: str | None) -> None:
    """Train the MNIST MLP and record the run in MLflow."""
    configure_console_logging()
    with one_line_errors():
        from pipeline.config import TrainingConfig, parse_parameters

        option_values = {spec.name: values.pop(spec.name) for spec in TRAINING_RUN_OPTIONS}
        run_options = parse_parameters(TRAINING_RUN_OPTIONS, given(option_values))
        config = TrainingConfig.from_values(given(values))
        import_tensorflow_quietly()
        from pipeline.training import run_training

        result = run_training(config, experiment_name=experiment_name)
    click.echo(
        f"Run {result.run_id}: test_accuracy={result.test_accuracy:.4f} test_loss={result.test_loss:.4f} "
        f"after {result.epochs_completed} epochs ({result.stop_reason}), best epoch {result.best_epoch}"
    )
    from pipeline.tracking import run_ui_url

    ui_url = run_ui_url(result.experiment_id, result.run_id)
    if ui_url:
        click.echo(f"View it at {ui_url}")
    if run_options["register_as"]:
        with one_line_errors():
            from mlflow.tracking import MlflowClient

            from mlflow_project.register import echo_registration
            from pipeline.registry import register_run

            echo_registration(register_run(MlflowClient(), result.run_id, run_options["register_as"]))
