"""Property-based: whatever a user types for any parameter, the answer is one line and exit 2 or a
valid config, never a traceback and never a run.

What is valid is written down here a second time, from the README's parameter tables, and not taken
from `ParameterSpec.parse`: a wrong rule in pipeline/config.py (a bound off by one, a missing check)
makes these tests fail instead of agreeing with it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlflow_project.cli import cli
from mlflow_project.mlproject import ENTRY_POINTS
from pipeline.config import ParameterSpec
from pipeline.errors import ParameterError
from tests.helpers import DATA_DIR

# -- the rules, from the README ------------------------------------------------------------------
# Numbers are read as Python reads decimal literals (int() / float(), surrounding blanks allowed):
# the README does not define a syntax of its own. Everything else below is the README's tables.

_INVALID = object()


def _int(raw: str) -> object:
    try:
        return int(raw.strip())
    except ValueError:
        return _INVALID


def _float(raw: str) -> object:
    try:
        value = float(raw.strip())
    except ValueError:
        return _INVALID
    return value if math.isfinite(value) else _INVALID


def _int_where(condition: Callable[[int], bool]) -> Callable[[str], object]:
    def rule(raw: str) -> object:
        value = _int(raw)
        return value if value is not _INVALID and condition(value) else _INVALID

    return rule


def _float_where(condition: Callable[[float], bool]) -> Callable[[str], object]:
    def rule(raw: str) -> object:
        value = _float(raw)
        return value if value is not _INVALID and condition(value) else _INVALID

    return rule


def _text_where(condition: Callable[[str], bool]) -> Callable[[str], object]:
    return lambda raw: raw if condition(raw) else _INVALID


def _boolean(raw: str) -> object:
    # `true` or `false`; read leniently: any case, blanks around.
    return {"true": True, "false": False}.get(raw.strip().lower(), _INVALID)


def _hidden_units(text: str) -> bool:
    # comma-separated positive ints, at least one hidden layer (in decimal digits: no sign, no leading 0)
    return all(re.fullmatch(r"[1-9]\d*", part.strip()) for part in text.split(","))


_NAME_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _model_name(text: str) -> bool:
    # letters, digits, `.`, `_`, `-` (and, which the README does not say, beginning with a letter or digit)
    return bool(text) and set(text) <= _NAME_CHARACTERS and text[0] not in "._-"


def _metric_name(text: str) -> bool:
    # a metric name as MLflow spells them: letters, digits, `_ . / -`, words separated by single spaces
    words = text.split(" ")
    return all(word and set(word) <= _NAME_CHARACTERS | {"/"} for word in words)


def _not_blank(text: str) -> bool:
    return bool(text.strip())


TRAINING_RULES: dict[str, Callable[[str], object]] = {
    "epochs": _int_where(lambda v: v >= 1),
    "batch_size": _int_where(lambda v: v >= 1),
    "learning_rate": _float_where(lambda v: v > 0),
    "hidden_units": _text_where(_hidden_units),
    "dropout": _float_where(lambda v: 0 <= v < 1),
    "validation_split": _float_where(lambda v: 0 < v < 1),
    # mnist, fashion_mnist, a path or a directory: any name; the data itself is checked when it is loaded
    "dataset": _text_where(_not_blank),
    "es_patience": _int_where(lambda v: v >= 0),
    "lr_factor": _float_where(lambda v: 0 < v < 1),
    "lr_patience": _int_where(lambda v: v >= 0),
    "min_lr": _float_where(lambda v: v >= 0),
    "target_accuracy": _float_where(lambda v: 0 <= v <= 1),
    "seed": _int_where(lambda v: 0 <= v < 2**32),  # what NumPy takes as a seed (the README gives no range)
    "steps_per_execution": _int_where(lambda v: v >= 1),
    "strategy": _text_where(lambda v: v in ("default", "mirrored", "multi_worker")),
}
RANKING_RULES: dict[str, Callable[[str], object]] = {
    "metric": _text_where(_metric_name),
    "mode": _text_where(lambda v: v in ("max", "min")),
}
# A sweep's lists: values separated by `,` (hidden_units: architectures separated by `;`), each allowed.
SWEEP_SEPARATORS = {"learning_rate": ",", "hidden_units": ";", "dropout": ",", "batch_size": ",", "epochs": ","}


def _range(single: Callable[[str], object], text: str) -> bool:
    # LOW:HIGH or LOW:HIGH:log, both ends allowed values, LOW < HIGH, and LOW > 0 on a log scale
    parts = [part.strip() for part in text.split(":")]
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
        return False
    low, high = single(parts[0]), single(parts[1])
    return _INVALID not in (low, high) and low < high and (len(parts) == 2 or low > 0)


def _search(name: str) -> Callable[[str], object]:
    # a list (values separated by SWEEP_SEPARATORS[name], each allowed) or a range; hidden_units: one
    # architecture whose layers are positive integers or integer ranges
    single, separator = TRAINING_RULES[name], SWEEP_SEPARATORS[name]
    layer = TRAINING_RULES["epochs"]  # a layer's width: an integer >= 1

    def allowed(text: str) -> bool:
        text = text.strip()
        if ":" not in text:
            return all(single(part.strip()) is not _INVALID for part in text.split(separator))
        if name == "hidden_units":
            return all(_range(layer, part) if ":" in part else layer(part.strip()) is not _INVALID
                       for part in text.split(","))
        return _range(single, text)

    return _text_where(allowed)


SEARCH_RULES: dict[str, Callable[[str], object]] = {
    "sampler": _text_where(lambda v: v in ("", "grid", "random", "tpe")),
    "trials": _text_where(lambda v: v == "" or (re.fullmatch(r"\s*[0-9]+\s*", v) is not None and int(v) >= 1)),
    "pruner": _text_where(lambda v: v in ("", "none", "budget", "median", "hyperband")),
    "workers": _int_where(lambda v: v >= 1),
    "storage": _text_where(lambda v: True),  # a path or database URL: checked when the study opens
    "study": _text_where(lambda v: v == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v) is not None),
}


RULES: dict[str, dict[str, Callable[[str], object]]] = {
    "main": TRAINING_RULES | {"register_as": _text_where(lambda v: v == "" or _model_name(v))},
    "register": {"model_name": _text_where(_model_name), **RANKING_RULES, "dry_run": _boolean, "change_rule": _boolean},
    "compare": {
        "filter": _text_where(lambda v: True),  # an MLflow search filter: MLflow checks it when searching
        "top": _int_where(lambda v: v >= 1),
        **RANKING_RULES,
        "output_dir": _text_where(_not_blank),
        "log_run": _boolean,
    },
    "sweep": TRAINING_RULES | {name: _search(name) for name in SWEEP_SEPARATORS} | {
        # a sweep runs its trials in one process: it cannot be one worker of a cluster (not in the README)
        "strategy": _text_where(lambda v: v in ("default", "mirrored")),
    } | RANKING_RULES | {
        # a sweep ranks its trials by their own record: a metric every training run records (docs/search.md)
        "metric": _text_where(lambda v: v in (
            "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_seconds", "samples_per_second",
            "batch_ms_mean", "batch_ms_p95", "best_val_accuracy", "epochs_completed", "test_loss", "test_accuracy")),
    } | SEARCH_RULES,
}


def expected(entry_point: str, name: str, raw: str) -> object:
    """The value `raw` must give for parameter `name` of `entry_point`, or _INVALID."""
    return RULES[entry_point][name](raw)


# -- values users may type -------------------------------------------------------------------------

_ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "0x10", "1_000", " 3 ", "", "1.", ".5", "+2"]),
)
# The edges of the rules above, where a wrong bound shows.
_EDGES = st.sampled_from([
    "0", "1", "-1", "0.0", "1.0", "-0.0", "-0", "1e-300", "0.999999", "1.000001", "2", "4294967295", "4294967296",
    "128,64", "128, 64", "64", "0", "01", "128,", ",64", "128,,64", "128,-64", "128,64;256", "64;", "128;0",
    "0.001,0.01", "0.001,0", "0.1, 0.5", "1,2", "1,0", "32,64",
    "default", "mirrored", "multi_worker", "Mirrored", "max", "min", "MAX", "true", "false", "True", " false ",
    "yes", "mnist-mlp", "my.model_2", "-model", ".model", "a/b", "my model", "test_accuracy", "test loss",
    "test  loss", " test_loss", "a:b", "val/accuracy", " ", "\t", "mnist-mlp\n", "test_loss\n", "mirrored\n",
    "loss", "best_val_accuracy", "val_f1", "slowest_worker_epoch_seconds",
])
RAW_VALUES = st.one_of(_ANY_TEXT, _NUMBERS, _EDGES)


def _accepts(spec: ParameterSpec, raw: str) -> bool:
    """Whether the product accepts `raw`; a refusal must be one line naming the parameter."""
    try:
        spec.parse(raw)
        return True
    except ParameterError as error:
        assert error.name == spec.name and "\n" not in str(error)
        return False


def _cases(entry_point: str, specs: tuple[ParameterSpec, ...]):
    """Raw values for a random subset of the parameters, at least one of them invalid by the README."""
    return st.fixed_dictionaries({}, optional={spec.name: RAW_VALUES for spec in specs}).filter(
        lambda values: any(expected(entry_point, name, raw) is _INVALID for name, raw in values.items())
    )


def _spec(specs: tuple[ParameterSpec, ...], name: str) -> ParameterSpec:
    return next(spec for spec in specs if spec.name == name)


def _check_entry_point(
    entry_point: str, specs: tuple[ParameterSpec, ...], values: dict[str, str], store_dir
) -> None:
    command = ENTRY_POINTS[entry_point][0]
    args = [command]
    for name, raw in values.items():
        args += [_spec(specs, name).cli_flag, raw]
    uri = f"sqlite:///{store_dir / 'mlflow.db'}"
    result = CliRunner().invoke(cli, args, env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_RUN_ID": ""})
    invalid = [name for name, raw in values.items() if expected(entry_point, name, raw) is _INVALID]
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)  # no other exception escaped: no traceback
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    named = lines[0].removeprefix("error: parameter ").split("=", 1)[0]
    assert lines[0].startswith("error: parameter ") and named in invalid, (lines, invalid)
    assert not (store_dir / "mlflow.db").exists()  # no run (not even a store) was created


def test_the_rules_here_cover_every_parameter_of_every_entry_point():
    assert {entry_point: sorted(RULES[entry_point]) for entry_point in RULES} == {
        entry_point: sorted(spec.name for spec in specs) for entry_point, (_, specs) in ENTRY_POINTS.items()
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_entry_point_answers_bad_values_in_one_line_with_exit_2(data, tmp_path):
    entry_point = data.draw(st.sampled_from(sorted(ENTRY_POINTS)), label="entry point")
    specs = tuple(ENTRY_POINTS[entry_point][1])
    values = data.draw(_cases(entry_point, specs), label="values")
    _check_entry_point(entry_point, specs, values, tmp_path)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_a_value_is_accepted_exactly_when_the_readme_allows_it_and_round_trips(data):
    for entry_point, (_, specs) in ENTRY_POINTS.items():
        for spec in specs:
            raw = data.draw(RAW_VALUES, label=f"{entry_point}.{spec.name}")
            want = expected(entry_point, spec.name, raw)
            assert _accepts(spec, raw) == (want is not _INVALID), (entry_point, spec.name, raw)
            if want is _INVALID:
                continue
            value = spec.parse(raw)
            assert value == want and type(value) is type(want), (entry_point, spec.name, raw, value, want)
            assert spec.parse(str(value).lower() if isinstance(value, bool) else str(value)) == value


# The README's bounds, one value on each side of each: [entry point, parameter, value, allowed?].
README_EDGES = [tuple(row) for row in json.loads((DATA_DIR / "readme_bounds.json").read_text())]


@pytest.mark.parametrize(("entry_point", "name", "raw", "allowed"), README_EDGES)
def test_the_readme_bounds(entry_point, name, raw, allowed):
    assert (expected(entry_point, name, raw) is not _INVALID) == allowed  # the rules above say so too
    specs = tuple(ENTRY_POINTS[entry_point][1])
    assert _accepts(_spec(specs, name), raw) == allowed
