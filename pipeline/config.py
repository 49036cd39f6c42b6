"""The training parameters: their one definition, and the validated config built from them.

`TRAINING_PARAMETERS` is the single source of truth for the `main` entry point: the MLproject file
is generated from it, the click CLI builds its options from it, and `TrainingConfig` has exactly
these fields. A test proves the three agree.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.errors import ParameterError

_KIND_NAMES = {int: "int", float: "float", str: "string"}
_HIDDEN_UNITS = re.compile(r"^\s*[1-9]\d*\s*(,\s*[1-9]\d*\s*)*$")
# Values of the `strategy` parameter (see pipeline/distribution.py).
DEFAULT_STRATEGY, MIRRORED_STRATEGY, MULTI_WORKER_STRATEGY = STRATEGIES = ("default", "mirrored", "multi_worker")


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """One user-facing parameter.

    Args:
        name: the parameter name (MLproject `-P name=...`, CLI `--name-with-dashes`).
        kind: `int`, `float` or `str`; values given as strings are parsed to this type.
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

    def parse(self, raw: object) -> Any:
        """Returns `raw` as a checked value of `kind`, or raises ParameterError."""
        value = self._convert(raw)
        if not self.check(value):
            raise ParameterError(self.name, raw, self.allowed)
        return value

    def _convert(self, raw: object) -> Any:
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
    ParameterSpec("strategy", str, DEFAULT_STRATEGY, "one of " + ", ".join(STRATEGIES),
                  "How training is spread: default (one device), mirrored (all local devices) or "
                  "multi_worker (the cluster in TF_CONFIG, one process per worker).",
                  lambda v: v in STRATEGIES),
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
