"""The parameters of every entry point: their one definition, and the validated config built from them.

`TRAINING_PARAMETERS` is the single source of truth for training: the MLproject file is generated
from it, the click CLI builds its options from it, and `TrainingConfig` has exactly these fields.
The other entry points' parameters are built here the same way (`REGISTER_PARAMETERS`,
`COMPARE_PARAMETERS`, and the run options of `main`; the sweep's are in `pipeline.search_space`).
A test proves MLproject, CLI and specs agree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.constants import RUN_METRICS
from pipeline.errors import ParameterError

_KIND_NAMES = {int: "int", float: "float", str: "string", bool: "string"}
_BOOLEAN_WORDS = {"true": True, "false": False}
_HIDDEN_UNITS = re.compile(r"^\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*$")
# Registered model names end up in `models:/NAME@champion` URIs: keep them to URI-safe characters.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")  # \Z: `$` would let a final newline through
_METRIC_NAME = re.compile(r"^[A-Za-z0-9_./-]+( [A-Za-z0-9_./-]+)*\Z")
# Values of the `strategy` parameter (see pipeline/training/distribution.py).
DEFAULT_STRATEGY, MIRRORED_STRATEGY, MULTI_WORKER_STRATEGY = STRATEGIES = ("default", "mirrored", "multi_worker")


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """One user-facing parameter.

    Args:
        name: the parameter name (MLproject `-P name=...`, CLI `--name-with-dashes`).
        kind: `int`, `float`, `str` or `bool` (`true` / `false`); values given as strings are parsed
            to this type.
        default: the value when the user gives none.
        allowed: what values are accepted, in words; quoted in error messages.
        help: one sentence for `--help` and the README.
        check: returns True when a parsed value is acceptable.
    """

    name: str
    kind: type
    default: Any
    allowed: str
    help: str
    check: Callable[[Any], bool] = lambda value: True

    @property
    def mlproject_type(self) -> str:
        return _KIND_NAMES[self.kind]

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def mlflow_run_flag(self) -> str:
        """How `mlflow run -P name=...` passes a parameter its MLproject entry point does not list."""
        return "--" + self.name

    @property
    def in_mlproject(self) -> bool:
        """Whether the MLproject file lists it: not when its default is empty, so that `mlflow run` logs it
        as a param only when it is given (a blank param is noise in the UI; the CLI takes it as ever)."""
        return self.default_text != ""

    @property
    def default_text(self) -> str:
        """The default as a user types it (`false`, not `False`)."""
        return str(self.default).lower() if self.kind is bool else str(self.default)

    def parse(self, raw: object) -> Any:
        """Returns `raw` as a checked value of `kind`, or raises ParameterError."""
        value = self._convert(raw)
        if not self.check(value):
            raise ParameterError(self.name, raw, self.allowed)
        return value

    def _convert(self, raw: object) -> Any:
        if self.kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str) and raw.strip().lower() in _BOOLEAN_WORDS:
                return _BOOLEAN_WORDS[raw.strip().lower()]
            raise ParameterError(self.name, raw, self.allowed)
        if isinstance(raw, bool):
            raise ParameterError(self.name, raw, self.allowed)
        if self.kind is str:
            if not isinstance(raw, str):
                raise ParameterError(self.name, raw, self.allowed)
            return raw
        if isinstance(raw, self.kind) or (self.kind is float and isinstance(raw, int)):
            value = self.kind(raw)
        elif isinstance(raw, str):
            try:
                value = self.kind(raw.strip())
            except ValueError:
                raise ParameterError(self.name, raw, self.allowed) from None
        else:
            raise ParameterError(self.name, raw, self.allowed)
        if self.kind is float and not math.isfinite(value):
            raise ParameterError(self.name, raw, self.allowed)
        return value


def parse_hidden_units(text: str) -> tuple[int, ...]:
    """'128,64' -> (128, 64)."""
    return tuple(int(part) for part in text.split(","))


TRAINING_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("epochs", int, 20, "an integer >= 1", "Maximum number of epochs.",
                  lambda v: v >= 1),
    ParameterSpec("batch_size", int, 128, "an integer >= 1", "Global batch size.",
                  lambda v: v >= 1),
    ParameterSpec("learning_rate", float, 0.001, "a number > 0", "Initial Adam learning rate.",
                  lambda v: v > 0),
    ParameterSpec("hidden_units", str, "128,64",
                  "comma-separated positive integers, at least one (e.g. '128,64')",
                  "Units of each hidden Dense layer, input side first.",
                  lambda v: bool(_HIDDEN_UNITS.match(v))),
    ParameterSpec("dropout", float, 0.2, "a number d with 0 <= d < 1",
                  "Dropout rate after each hidden layer.", lambda v: 0 <= v < 1),
    ParameterSpec("validation_split", float, 0.2, "a number v with 0 < v < 1",
                  "Fraction of the training data held out (from its end) for validation.",
                  lambda v: 0 < v < 1),
    ParameterSpec("dataset", str, "mnist",
                  "'mnist', 'fashion_mnist', a path to an .npz in Keras' mnist.npz layout, "
                  "or a directory holding the four MNIST-format IDX .gz files",
                  "What to train on.", lambda v: bool(v.strip())),
    ParameterSpec("es_patience", int, 3, "an integer >= 0",
                  "EarlyStopping patience on val_loss (best weights restored).",
                  lambda v: v >= 0),
    ParameterSpec("lr_factor", float, 0.5, "a number f with 0 < f < 1",
                  "ReduceLROnPlateau factor on val_loss.", lambda v: 0 < v < 1),
    ParameterSpec("lr_patience", int, 2, "an integer >= 0",
                  "ReduceLROnPlateau patience in epochs.", lambda v: v >= 0),
    ParameterSpec("min_lr", float, 1e-6, "a number >= 0",
                  "Lower bound for the learning rate.", lambda v: v >= 0),
    ParameterSpec("target_accuracy", float, 0.98, "a number t with 0 <= t <= 1 (0 disables)",
                  "Stop once val_accuracy reaches this.", lambda v: 0 <= v <= 1),
    ParameterSpec("seed", int, 42, "an integer from 0 to 2**32-1",
                  "Seeds Python, NumPy and Keras: same seed and data give the same metrics.",
                  lambda v: 0 <= v < 2**32),
    # 64: on this 2-core CPU an epoch of the seed's model took 1.2-1.9 s at 1 batch per call, 0.86 s at 8
    # and 0.74 s at 64, no faster beyond (375 = a whole epoch per call: 0.73 s); bench/RESULTS.md, "Epoch
    # profile". Above 64 only the NaN guard's reaction (at most N batches) would grow.
    ParameterSpec("steps_per_execution", int, 64, "an integer >= 1",
                  "Training batches per compiled call (Keras' steps_per_execution): the same results with "
                  "fewer Python round trips; the NaN guard and batch timing look every N batches. 1 is Keras' default.",
                  lambda v: v >= 1),
    ParameterSpec("strategy", str, DEFAULT_STRATEGY, "one of " + ", ".join(STRATEGIES),
                  "How training is spread: default (one device), mirrored (all local devices) or "
                  "multi_worker (the cluster in TF_CONFIG, one process per worker).",
                  lambda v: v in STRATEGIES),
)


# Options of a training run that are not hyper-parameters: `main` takes them beside
# TRAINING_PARAMETERS, and they are not fields of TrainingConfig.
TRAINING_RUN_OPTIONS: tuple[ParameterSpec, ...] = (
    ParameterSpec("register_as", str, "",
                  "empty (do not register) or a model name of letters, digits, '.', '_' and '-'",
                  "After training, register the run's model under this name (its champion picked by the model's rule; "
                  "test_accuracy max for a new model).",
                  lambda v: v == "" or bool(_MODEL_NAME.match(v))),
)

# How runs are ranked, best first: by `metric` in `mode`; ties go to the lower test_loss, then
# the earlier run. Shared by `register`, `compare` and `sweep`.
RANKING_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("metric", str, "test_accuracy",
                  "the name of a metric the training runs record (e.g. test_accuracy, test_loss)",
                  "Metric that ranks the runs.", lambda v: bool(_METRIC_NAME.match(v))),
    ParameterSpec("mode", str, "max", "'max' (higher is better) or 'min' (lower is better)",
                  "Whether a higher or a lower metric is better.", lambda v: v in ("max", "min")),
)

# A sweep ranks its trials by their own record, so only by a metric every trial records (a metric none of
# them recorded would fail every trial, after training it).
SWEEP_RANKING_PARAMETERS: tuple[ParameterSpec, ...] = (
    dataclasses.replace(
        RANKING_PARAMETERS[0], allowed="one of the metrics every training run records: " + ", ".join(RUN_METRICS),
        check=lambda v: v in RUN_METRICS,
    ),
    *RANKING_PARAMETERS[1:],
)

REGISTER_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("model_name", str, "mnist-mlp",
                  "a model name of letters, digits, '.', '_' and '-'",
                  "Registered model to add the best run's model to.", lambda v: bool(_MODEL_NAME.match(v))),
    *RANKING_PARAMETERS,
    ParameterSpec("dry_run", bool, False, "true or false",
                  "Only show what would be registered and whether the champion would move."),
    ParameterSpec("change_rule", bool, False, "true or false",
                  "Make metric and mode the model's champion rule from now on and re-pick its champion by them "
                  "(without it, another rule than the model's is refused)."),
)

COMPARE_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("filter", str, "",
                  "empty, or an MLflow search filter (e.g. \"params.dropout = '0.2' and metrics.test_accuracy > 0.9\")",
                  "Only training runs matching this filter are compared."),
    ParameterSpec("top", int, 10, "an integer >= 1", "Compare the best N runs by the metric.",
                  lambda v: v >= 1),
    *RANKING_PARAMETERS,
    ParameterSpec("output_dir", str, "comparison", "a directory path (created if missing)",
                  "Where the table (CSV) and the plot (PNG) are written.", lambda v: bool(v.strip())),
    ParameterSpec("log_run", bool, False, "true or false",
                  "Also log the outputs to a comparison run (always done under `mlflow run`)."),
)

def parse_parameters(
    specs: Sequence[ParameterSpec], values: Mapping[str, object]
) -> dict[str, Any]:
    """Parses and checks `values` against `specs`; missing ones take their defaults.

    Raises:
        ParameterError: for the first unknown or invalid parameter.
    """
    known = {spec.name for spec in specs}
    for name in values:
        if name not in known:
            raise ParameterError(name, values[name], "one of " + ", ".join(sorted(known)))
    return {
        spec.name: spec.parse(values[spec.name]) if spec.name in values else spec.default
        for spec in specs
    }


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """One validated training configuration; build it with `TrainingConfig.from_values`.

    The fields are exactly TRAINING_PARAMETERS (defaults live there, not here).
    """

    epochs: int
    batch_size: int
    learning_rate: float
    hidden_units: str
    dropout: float
    validation_split: float
    dataset: str
    es_patience: int
    lr_factor: float
    lr_patience: int
    min_lr: float
    target_accuracy: float
    seed: int
    steps_per_execution: int
    strategy: str

    @classmethod
    def from_values(cls, values: Mapping[str, object] | None = None) -> TrainingConfig:
        """Builds a config from raw values (strings from a command line, or typed values)."""
        parsed = parse_parameters(TRAINING_PARAMETERS, values or {})
        parsed["hidden_units"] = ",".join(
            str(units) for units in parse_hidden_units(parsed["hidden_units"])
        )
        return cls(**parsed)

    @property
    def layer_sizes(self) -> tuple[int, ...]:
        return parse_hidden_units(self.hidden_units)

    def as_params(self) -> dict[str, str]:
        """The parameters as MLflow params (strings), in the order of TRAINING_PARAMETERS."""
        return {spec.name: str(getattr(self, spec.name)) for spec in TRAINING_PARAMETERS}
