"""The click group behind `python -m mlflow_project` and the `mnist-pipeline` console script."""

import click

from mlflow_project.compare import compare
from mlflow_project.mlproject import mlproject
from mlflow_project.register import register
from mlflow_project.serve import serve
from mlflow_project.server import server
from mlflow_project.sweep import sweep
from mlflow_project.train import train


@click.group()
def cli() -> None:
    """MNIST MLP training pipeline with MLflow tracking."""


cli.add_command(train)
cli.add_command(register)
cli.add_command(compare)
cli.add_command(sweep)
cli.add_command(mlproject)
cli.add_command(server)
cli.add_command(serve)
