"""Entry point `main` / `train`: one training run, recorded in MLflow."""

from __future__ import annotations

import os

import click

from mlflow_project.common import (
    configure_console_logging,
    experiment_option,
    given,
    import_tensorflow_quietly,
    one_line_errors,
    parameter_options,
)
from pipeline.config import TRAINING_PARAMETERS, TRAINING_RUN_OPTIONS


@click.command("train")
@parameter_options(TRAINING_PARAMETERS + TRAINING_RUN_OPTIONS)
@experiment_option(
    "Experiment of a new run (default: MLFLOW_EXPERIMENT_NAME, else MLflow's 'Default'). "
    "Under `mlflow run`, the run MLflow created is used."
)
@click.option(
    "--run-id",
    default=None,
    help="Continue this run (killed or failed) at its first unfinished epoch, with the same parameters. "
    "Under `mlflow run --run-id ID` this is implied.",
)
def train(experiment_name: str | None, run_id: str | None, **values: str | None) -> None:
    """Train the MNIST MLP and record the run in MLflow."""
    configure_console_logging()
    with one_line_errors():
        from pipeline.config import TrainingConfig, parse_parameters

        option_values = {spec.name: values.pop(spec.name) for spec in TRAINING_RUN_OPTIONS}
        run_options = parse_parameters(TRAINING_RUN_OPTIONS, given(option_values))
        config = TrainingConfig.from_values(given(values))
        if config.strategy != "multi_worker":  # (its other workers never use the store)
            from pipeline.tracking.store import check_tracking_store

            check_tracking_store(open_sqlite=False)  # in a second or two, not after TensorFlow's import
        import_tensorflow_quietly()
        from pipeline.tracking.recorder import BEHIND_SECONDS
        from pipeline.tracking.run_owner import HEARTBEAT_TIMEOUT_SECONDS
        from pipeline.training.distribution import PEER_TIMEOUT_SECONDS
        from pipeline.training.run import FLUSH_TIMEOUT_SECONDS, RunLimits, WorkerResult, run_training

        limits = RunLimits(
            flush_timeout=float(os.environ.get("MNIST_PIPELINE_FLUSH_TIMEOUT", FLUSH_TIMEOUT_SECONDS)),
            peer_timeout=float(os.environ.get("MNIST_PIPELINE_PEER_TIMEOUT", PEER_TIMEOUT_SECONDS)),
            heartbeat_timeout=float(os.environ.get("MNIST_PIPELINE_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT_SECONDS)),
            behind_after=float(os.environ.get("MNIST_PIPELINE_BEHIND_SECONDS", BEHIND_SECONDS)),
        )
        result = run_training(config, experiment_name=experiment_name, run_id=run_id, limits=limits)
    if isinstance(result, WorkerResult):
        click.echo(
            f"Worker {result.worker_id} of {result.num_workers}: trained {result.epochs_completed} epochs; "
            "the chief (worker 0) records the run"
        )
        return
    from mlflow.tracking import MlflowClient

    from pipeline.experiments.runs import logged_models_by_run
    from pipeline.tracking.store import run_ui_url

    model_id = logged_models_by_run(MlflowClient(), result.experiment_id, result.run_id).get(result.run_id)
    if model_id:  # the fast URI: runs:/ID/model first probes a run artifact that MLflow 3 no longer writes
        click.echo(f"Model: models:/{model_id}")
    # The record counts epochs from 0 (the tag best_epoch, the metrics' steps); Keras' console lines from 1.
    best_epoch = result.best_epoch
    best = "no best epoch" if best_epoch is None else f"best epoch {best_epoch + 1} (step {best_epoch})"
    click.echo(
        f"Run {result.run_id}: test_accuracy={result.test_accuracy:.4f} test_loss={result.test_loss:.4f} "
        f"after {result.epochs_completed} epochs ({result.stop_reason}), {best}"
    )
    ui_url = run_ui_url(result.experiment_id, result.run_id)
    if ui_url:
        click.echo(f"View it at {ui_url}")
    if run_options["register_as"]:
        with one_line_errors():
            from mlflow_project.register import echo_registration
            from pipeline.experiments.registry import register_run

            echo_registration(register_run(MlflowClient(), result.run_id, run_options["register_as"]))
