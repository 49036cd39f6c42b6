"""MLproject, the CLI, the config, conda.yaml, pyproject.toml and the README agree."""

from __future__ import annotations

import tomllib

import yaml
from click.testing import CliRunner
from mlflow.projects._project_spec import load_project

from mlflow_project.cli import cli
from mlflow_project.mlproject import render_mlproject
from mlflow_project.train import train
from pipeline import constants
from pipeline.config import TRAINING_PARAMETERS
from tests.helpers import PROJECT_DIR


def test_mlproject_file_is_generated_from_the_parameter_specs():
    assert (PROJECT_DIR / "MLproject").read_text() == render_mlproject(), (
        "MLproject is stale: run `make mlproject`"
    )


def test_mlflow_reads_the_same_parameters_from_mlproject():
    entry_point = load_project(str(PROJECT_DIR)).get_entry_point("main")
    assert list(entry_point.parameters) == [spec.name for spec in TRAINING_PARAMETERS]
    for spec in TRAINING_PARAMETERS:
        parameter = entry_point.parameters[spec.name]
        assert parameter.type == spec.mlproject_type
        assert spec.kind(parameter.default) == spec.default
    command = entry_point.compute_command({}, storage_dir=None)
    assert command.startswith("python -m mlflow_project train ")


def test_cli_options_are_the_parameters():
    options = [param.name for param in train.params if param.name not in ("experiment_name", "run_id")]
    assert options == [spec.name for spec in TRAINING_PARAMETERS]
    flags = {param.name: param.opts[0] for param in train.params}
    assert all(flags[spec.name] == spec.cli_flag for spec in TRAINING_PARAMETERS)
    help_text = CliRunner().invoke(cli, ["train", "--help"]).output
    assert all(spec.cli_flag in help_text for spec in TRAINING_PARAMETERS)


def _requirements_from_conda() -> list[str]:
    conda = yaml.safe_load((PROJECT_DIR / "conda.yaml").read_text())
    assert "python=3.11" in conda["dependencies"]
    pip_section = next(item for item in conda["dependencies"] if isinstance(item, dict))
    return pip_section["pip"]


def test_conda_env_and_pyproject_declare_the_same_dependencies():
    pyproject = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    assert _requirements_from_conda() == pyproject["project"]["dependencies"]
    assert pyproject["project"]["requires-python"].startswith(">=3.11")


def test_dependency_ranges_admit_the_versions_we_build_on():
    from packaging.requirements import Requirement

    wanted = {"tensorflow": "2.21.0", "keras": "3.15.1", "mlflow": "3.17.2"}
    ranges = {Requirement(text).name: Requirement(text).specifier for text in _requirements_from_conda()}
    for package, version in wanted.items():
        assert ranges[package].contains(version), f"{package} {ranges[package]} excludes {version}"


def test_readme_documents_every_parameter_metric_artifact_and_tag():
    readme = (PROJECT_DIR / "README.md").read_text()
    documented = [spec.name for spec in TRAINING_PARAMETERS] + [
        value for name, value in vars(constants).items() if name.isupper() and isinstance(value, str)
    ] + list(constants.EPOCH_METRICS)
    missing = [name for name in documented if f"`{name}`" not in readme and name not in readme]
    assert not missing, f"README does not mention: {missing}"
