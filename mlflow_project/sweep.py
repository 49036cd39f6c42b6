"""Entry point `sweep`: an Optuna search (or grid) of training runs under one parent run."""

from __future__ import annotations

import os
import sys

import click

from mlflow_project import common
from pipeline.search_space import SWEEP_PARAMETERS

# What a worker started by this sweep is told beside the user's own parameters.
_WORKER_OPTIONS = ("workers", "study", "storage")


@click.command("sweep")
@common.parameter_options(SWEEP_PARAMETERS)
@common.experiment_option(
    "Experiment of a new sweep (default: MLFLOW_EXPERIMENT_NAME, else MLflow's 'Default'). "
    "Under `mlflow run`, the run MLflow created is the parent."
)
@click.option("--worker-number", type=int, default=0, hidden=True)
@click.option("--parent-pid", type=int, default=0, hidden=True)  # a worker: the sweep that started it
def sweep(experiment_name: str | None, worker_number: int, parent_pid: int, **values: str | None) -> None:
    """Search the listed values or ranges with Optuna, each trial a child run of one sweep run."""
    common.configure_console_logging(f"[worker {worker_number}] " if worker_number else "")
    common.stop_on_first_signal()  # SIGTERM (docker stop, a deleted pod) stops a sweep as Ctrl-C does
    if parent_pid:  # a worker dies with its sweep, even a SIGKILLed one: SIGTERM fails its trial, as above
        from pipeline.tracking.process_group import die_with_parent

        if not die_with_parent(parent_pid):
            click.echo(f"error: worker {worker_number}: its sweep (process {parent_pid}) is gone", err=True)
            sys.exit(1)
    user_values = common.given(values)

    def worker_command(number: int, study: str, storage: str) -> list[str]:
        arguments = [sys.executable, "-m", "mlflow_project", "sweep", "--worker-number", str(number),
                     "--parent-pid", str(os.getpid()), "--workers", "1", "--study", study, "--storage", storage]
        for spec in SWEEP_PARAMETERS:
            if spec.name in user_values and spec.name not in _WORKER_OPTIONS:
                arguments += [spec.cli_flag, str(user_values[spec.name])]
        return arguments

    with common.one_line_errors():
        from pipeline.config import parse_parameters
        from pipeline.experiments.study import SearchPlan

        options = parse_parameters(SWEEP_PARAMETERS, user_values)
        SearchPlan.from_options(options)  # a bad search space fails before TensorFlow loads
        if options["workers"] == 1:  # trials train in this process (with more, in its workers alone)
            common.import_tensorflow_quietly()
            import tensorflow as tf

            tf.get_logger().setLevel("ERROR")  # retracing notices: several models train in one process
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our trial lines say the same, with their run
        common.no_interrupt_tracebacks("optuna")
        from pipeline.experiments.sweep import SweepRequest, run_sweep

        summary = run_sweep(SweepRequest(options, experiment_name, worker_command, worker_number,
                                         common.source_tags()))
    if worker_number:
        return
    import pandas as pd

    from pipeline.experiments.sweep_record import CONTINUED

    counts = ", ".join(f"{summary.count(state)} {state}" for state in ("finished", "pruned", "failed"))
    continued = summary.count(CONTINUED)
    counts += f"; {continued} paused, then continued by a later trial" if continued else ""
    click.echo(f"Sweep run {summary.parent_run_id}: {len(summary.table)} trials ({counts})")
    click.echo(summary.table_text())
    if summary.best is None:
        click.echo("error: no trial of the sweep finished", err=True)
        sys.exit(1)
    metric = options["metric"]
    best = summary.best
    origin = "" if pd.isna(best["continues"]) else f", continuing trial {best['continues']}"
    click.echo(f"Best: trial {best['trial']}{origin}, run {best['run_id']} ({metric}={best[metric]:.4f})")
