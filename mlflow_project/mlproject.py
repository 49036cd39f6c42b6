"""Renders the MLproject file from the parameter specs, so that it cannot drift from the CLI.

A parameter whose default is empty is left out of its entry point: `mlflow run` then logs it only when
it is given, and passes it on as `--name value`, which the CLI accepts beside `--name-with-dashes`.

    python -m mlflow_project mlproject > MLproject
"""

from __future__ import annotations

from collections.abc import Sequence

import click

from pipeline.config import (
    COMPARE_PARAMETERS,
    REGISTER_PARAMETERS,
    TRAINING_PARAMETERS,
    TRAINING_RUN_OPTIONS,
    ParameterSpec,
)
from pipeline.search_space import SWEEP_PARAMETERS

PROJECT_NAME = "mnist-mlp-pipeline"
# MLproject entry point -> (CLI command, its parameters).
ENTRY_POINTS: dict[str, tuple[str, Sequence[ParameterSpec]]] = {
    "main": ("train", TRAINING_PARAMETERS + TRAINING_RUN_OPTIONS),
    "register": ("register", REGISTER_PARAMETERS),
    "compare": ("compare", COMPARE_PARAMETERS),
    "sweep": ("sweep", SWEEP_PARAMETERS),
}


def render_mlproject() -> str:
    lines = [
        "# Generated from pipeline/config.py and pipeline/search_space.py by",
        "# `python -m mlflow_project mlproject > MLproject`.",
        "# Do not edit by hand: tests/test_project_files.py fails when the two differ.",
        f"name: {PROJECT_NAME}",
        "conda_env: conda.yaml",
        "entry_points:",
    ]
    for entry_point, (command, all_specs) in ENTRY_POINTS.items():
        specs = [spec for spec in all_specs if spec.in_mlproject]  # `-P name=value` still reaches the others
        lines += [f"  {entry_point}:", "    parameters:"]
        for spec in specs:
            lines.append(f"      {spec.name}: {{type: {spec.mlproject_type}, default: {_yaml_scalar(spec)}}}")
        lines += ["    command: >-", f"      python -m mlflow_project {command}"]
        lines += [f"      {spec.cli_flag} {{{spec.name}}}" for spec in specs]
    return "\n".join(lines) + "\n"


def _yaml_scalar(spec: ParameterSpec) -> str:
    return f'"{spec.default_text}"' if spec.kind in (str, bool) else spec.default_text


@click.command("mlproject")
def mlproject() -> None:
    """Print the MLproject file generated from the parameter specs."""
    click.echo(render_mlproject(), nl=False)
