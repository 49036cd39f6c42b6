"""Property-based: whatever a user types for any parameter, the answer is one line and exit 2 or a
valid config, never a traceback and never a run."""

from __future__ import annotations

import math

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_project.cli import cli
from mlflow_project.mlproject import ENTRY_POINTS
from pipeline.config import ParameterSpec
from pipeline.errors import ParameterError

_ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10", "1_000", " 3 ", "", "1.", ".5", "+2"]),
)
RAW_VALUES = st.one_of(_ANY_TEXT, _NUMBERS)


def _accepts(spec: ParameterSpec, raw: str) -> bool:
    try:
        spec.parse(raw)
        return True
    except ParameterError as error:
        assert error.name == spec.name and "\n" not in str(error)
        return False


def _cases(specs: tuple[ParameterSpec, ...]):
    """Raw values for a random subset of the parameters, at least one of them invalid."""
    return st.fixed_dictionaries({}, optional={spec.name: RAW_VALUES for spec in specs}).filter(
        lambda values: any(not _accepts(_spec(specs, name), raw) for name, raw in values.items())
    )


def _spec(specs: tuple[ParameterSpec, ...], name: str) -> ParameterSpec:
    return next(spec for spec in specs if spec.name == name)


def _check_entry_point(command: str, specs: tuple[ParameterSpec, ...], values: dict[str, str], store_dir) -> None:
    args = [command]
    for name, raw in values.items():
        args += [_spec(specs, name).cli_flag, raw]
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    result = CliRunner().invoke(cli, args, env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": ""})
    invalid = [name for name, raw in values.items() if not _accepts(_spec(specs, name), raw)]
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # no other exception escaped: no traceback
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    named = lines[0].removeprefix("error: parameter ").split("=", 1)[0]
    assert lines[0].startswith("error: parameter ") and named in invalid, (lines, invalid)
    assert not (store_dir / "mlflow.db").exists()  # no run (not even a store) was created


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_entry_point_answers_bad_values_in_one_line_with_exit_2(data, tmp_path):
    entry_point = data.draw(st.sampled_from(sorted(ENTRY_POINTS)), label="entry point")
    command, specs = ENTRY_POINTS[entry_point]
    values = data.draw(_cases(tuple(specs)), label="values")
    _check_entry_point(command, tuple(specs), values, tmp_path)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_accepted_values_are_in_range_and_round_trip(data):
    for _, specs in ENTRY_POINTS.values():
        for spec in specs:
            raw = data.draw(RAW_VALUES, label=spec.name)
            if not _accepts(spec, raw):
                continue
            value = spec.parse(raw)
            assert isinstance(value, spec.kind) and spec.check(value)
            if spec.kind is float:
                assert math.isfinite(value)
            assert spec.parse(str(value)) == value
