"""`python -m mlflow_project ...`"""

from mlflow_project.cli import cli

if __name__ == "__main__":
    cli()
