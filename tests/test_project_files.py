"""MLproject, the CLI, the config, conda.yaml, pyproject.toml and the README agree."""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow.projects._project_spec import load_project

from mlflow_project.cli import cli
from mlflow_project.mlproject import ENTRY_POINTS, render_mlproject
from pipeline import constants
from pipeline.config import (
    COMPARE_PARAMETERS,
    REGISTER_PARAMETERS,
    TRAINING_PARAMETERS,
    TRAINING_RUN_OPTIONS,
)
from pipeline.search_space import SWEEP_PARAMETERS
from tests.helpers import PROJECT_DIR

# Options that only the CLI has: under `mlflow run` the experiment is the run's own, and a resumed
# run is `mlflow run --run-id` (train's --run-id, on main since the resume work).
CLI_ONLY_OPTIONS = {"experiment_name", "run_id", "worker_number", "parent_pid"}


def test_mlproject_file_is_generated_from_the_parameter_specs():
    assert (PROJECT_DIR / "MLproject").read_text() == render_mlproject(), (
        "MLproject is stale: run `make mlproject`"
    )


def test_every_entry_point_has_its_parameters():
    assert {name: specs for name, (_, specs) in ENTRY_POINTS.items()} == {
        "main": TRAINING_PARAMETERS + TRAINING_RUN_OPTIONS,
        "register": REGISTER_PARAMETERS,
        "compare": COMPARE_PARAMETERS,
        "sweep": SWEEP_PARAMETERS,
    }


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_mlflow_reads_the_same_parameters_from_mlproject(entry_point):
    """MLproject lists every parameter that has a value by default; one whose default is empty is left out
    (so `mlflow run` logs no blank param), and MLflow still passes it on when given, which the CLI takes."""
    command_name, specs = ENTRY_POINTS[entry_point]
    loaded = load_project(str(PROJECT_DIR)).get_entry_point(entry_point)
    assert list(loaded.parameters) == [spec.name for spec in specs if spec.default_text != ""]
    for spec in specs:
        if spec.name not in loaded.parameters:
            continue
        parameter = loaded.parameters[spec.name]
        assert parameter.type == spec.mlproject_type
        assert spec.parse(parameter.default) == spec.default
    command = loaded.compute_command({}, storage_dir=None)
    assert command.startswith(f"python -m mlflow_project {command_name} ")
    given = {spec.name: f"given {spec.name}'s value" for spec in specs if spec.kind is str}
    arguments = shlex.split(loaded.compute_command(given, storage_dir=None))[4:]
    parsed = cli.commands[command_name].make_context(command_name, arguments).params
    assert {name: parsed[name] for name in given} == given


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_cli_options_are_the_parameters(entry_point):
    command_name, specs = ENTRY_POINTS[entry_point]
    command = cli.commands[command_name]
    options = [param.name for param in command.params if param.name not in CLI_ONLY_OPTIONS]
    assert options == [spec.name for spec in specs]
    flags = {param.name: param.opts[0] for param in command.params}
    assert all(flags[spec.name] == spec.cli_flag for spec in specs)
    help_text = CliRunner().invoke(cli, [command_name, "--help"], terminal_width=1000).output
    assert all(spec.cli_flag in help_text for spec in specs)


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


def _names_to_document() -> list[str]:
    """Every parameter of every entry point, and every metric, artifact, tag and value a run records."""
    specs = {spec.name for _, entry_point_specs in ENTRY_POINTS.values() for spec in entry_point_specs}
    return sorted(specs) + [
        value for name, value in vars(constants).items() if name.isupper() and isinstance(value, str)
    ] + list(constants.EPOCH_METRICS)


_CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
# A name's characters; anything else (`/`, `:`, `<`, `=`, space, ...) separates two names in a code span.
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]+")


def _code_tokens(readme: str) -> set[str]:
    """The whole names written in the README's inline code spans (`...`), outside code blocks:
    `checkpoints/best_model.keras` gives checkpoints and best_model.keras; `best_<metric>` gives best_."""
    prose = _CODE_BLOCK.sub("", readme)
    return {token for span in _CODE_SPAN.findall(prose) for token in _TOKEN.findall(span)}


def undocumented_names(readme: str) -> list[str]:
    """The names of _names_to_document() that `readme` never writes as a whole name in code (`name`)."""
    tokens = _code_tokens(readme)
    return [name for name in _names_to_document() if name not in tokens]


def _documentation() -> str:
    """README and the docs/ pages it links, as one text."""
    pages = [PROJECT_DIR / "README.md", *sorted((PROJECT_DIR / "docs").glob("*.md"))]
    return "\n".join(page.read_text() for page in pages)


def test_readme_links_every_docs_page():
    readme = (PROJECT_DIR / "README.md").read_text()
    pages = sorted(path.name for path in (PROJECT_DIR / "docs").glob("*.md"))
    assert len(pages) >= 7
    assert [page for page in pages if f"](docs/{page})" not in readme] == []


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    for page in [PROJECT_DIR / "README.md", *(PROJECT_DIR / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.name}: {target}")
    assert broken == []


def test_readme_and_docs_document_every_parameter_metric_artifact_and_tag():
    missing = undocumented_names(_documentation())
    assert not missing, f"neither README nor docs/ document (as `name`): {missing}"


@pytest.mark.parametrize("name", ["model", "best_", "loss", "epochs", "champion"])
def test_the_readme_check_notices_a_name_whose_documentation_is_removed(name):
    """On a copy of the documentation in which `name` is no longer written in code, the check reports it,
    even though the word still occurs in the prose or inside longer names (model_summary.txt, val_loss)."""
    readme = _documentation()
    assert name not in undocumented_names(readme)
    token = re.compile(rf"(?<![A-Za-z0-9_.\-]){re.escape(name)}(?![A-Za-z0-9_.\-])")
    removed = _CODE_SPAN.sub(lambda span: "`" + token.sub("X", span.group(1)) + "`", readme)
    assert name in removed  # still a substring of the text
    assert name in undocumented_names(removed)


# pipeline/'s layers, lowest first: a module may import its own layer and the ones below, never above.
LAYERS = {"base": 0, "tracking": 1, "callbacks": 2, "training": 3, "experiments": 4}
BASE_MODULES = {"config", "constants", "errors", "search_space", "stop_request"}


def _layer(module: str) -> int | None:
    """The layer of `pipeline.X[.Y]` (None for anything outside pipeline)."""
    parts = module.split(".")
    if parts[0] != "pipeline" or len(parts) < 2:
        return None
    return LAYERS["base"] if parts[1] in BASE_MODULES else LAYERS[parts[1]]


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {module for module in found if _layer(module) is not None or module == "pipeline"}


def test_every_pipeline_module_belongs_to_a_layer_and_imports_only_point_down():
    upward = []
    for path in sorted((PROJECT_DIR / "pipeline").rglob("*.py")):
        module = ".".join(path.relative_to(PROJECT_DIR).with_suffix("").parts).removesuffix(".__init__")
        if module == "pipeline":
            continue
        own = _layer(module)
        assert own is not None, f"{module} is in no layer"
        for imported in _imported_modules(path):
            layer = _layer(imported)
            if layer is not None and layer > own and not (module.startswith(imported + ".")):
                upward.append(f"{module} imports {imported}")
    assert upward == []
