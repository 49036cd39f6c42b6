"""The sweep's parameters and its search space: what each swept parameter may take, as the user writes it.

A swept training parameter is either a list of values (`learning_rate=0.0003,0.001`; architectures
are separated by ';': `hidden_units=128,64;256`) or a range: `learning_rate=1e-4:1e-2:log`,
`dropout=0.0:0.5`, `batch_size=32:256:log` (integers for integer parameters), and per hidden layer
`hidden_units=64:512:log,32:128`. A search space of lists only is a grid. This module knows no
Optuna: a dimension suggests its value to any object with Optuna's `suggest_*` methods.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping
from typing import Any, Protocol

from pipeline.config import (
    DEFAULT_STRATEGY,
    MIRRORED_STRATEGY,
    SWEEP_RANKING_PARAMETERS,
    TRAINING_PARAMETERS,
    ParameterSpec,
    TrainingConfig,
    parse_parameters,
)
from pipeline.errors import ParameterError

# The training parameters a sweep can vary, and the separator of their listed values: a hidden_units
# value is itself comma-separated, so its values are separated by ';' ("128,64;256").
SWEEP_GRID_SEPARATORS: dict[str, str] = {
    "learning_rate": ",",
    "hidden_units": ";",
    "dropout": ",",
    "batch_size": ",",
    "epochs": ",",
}
SWEEP_GRID_PARAMETERS = tuple(SWEEP_GRID_SEPARATORS)
SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "budget", "median", "hyperband")
DEFAULT_TRIALS = 20  # random and tpe; a grid runs every combination
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_TRAINING = {spec.name: spec for spec in TRAINING_PARAMETERS}


class Suggests(Protocol):
    """What a dimension asks for a value: an `optuna.Trial`."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...
    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int: ...
    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...


@dataclasses.dataclass(frozen=True)
class Choices:
    """A listed dimension: one of `values`, in the order given."""

    name: str
    values: tuple[Any, ...]

    def suggest(self, trial: Suggests) -> Any:
        return trial.suggest_categorical(self.name, self.values)


@dataclasses.dataclass(frozen=True)
class Range:
    """A range dimension from `low` to `high` (both included), on a log scale when `log`."""

    name: str
    low: float
    high: float
    log: bool
    integer: bool

    def suggest(self, trial: Suggests) -> float | int:
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclasses.dataclass(frozen=True)
class HiddenLayers:
    """hidden_units with a range per layer (`64:512:log,32:128`): one dimension per layer."""

    layers: tuple[Choices | Range, ...]

    def suggest(self, trial: Suggests) -> str:
        return ",".join(str(layer.suggest(trial)) for layer in self.layers)


Dimension = Choices | Range | HiddenLayers


def parse_dimension(name: str, text: str) -> Dimension:
    """The dimension that `text` gives the swept training parameter `name`.

    Raises:
        ParameterError: `text` is neither a list of allowed values nor a valid range.
    """
    spec = _TRAINING[name]
    text = text.strip()
    try:
        if ":" not in text:
            values = tuple(spec.parse(part.strip()) for part in text.split(SWEEP_GRID_SEPARATORS[name]))
            return Choices(name, tuple(dict.fromkeys(values)))
        if name == "hidden_units":
            return _hidden_layers(text)
        return _range(spec, name, text)
    except (ParameterError, ValueError):
        raise ParameterError(name, text, _dimension_allowed(spec)) from None


def _range(spec: ParameterSpec, name: str, text: str) -> Range:
    parts = [part.strip() for part in text.split(":")]
    log = len(parts) == 3 and parts[2] == "log"
    if len(parts) != 2 + log:
        raise ValueError(text)
    low, high = (spec.parse(part) for part in parts[:2])
    if not low < high or (log and low <= 0):
        raise ValueError(text)
    return Range(name, low, high, log, integer=spec.kind is int)


def _hidden_layers(text: str) -> HiddenLayers:
    units = dataclasses.replace(_TRAINING["epochs"], name="hidden_units")  # a positive integer, like epochs
    layers = []
    for number, part in enumerate(text.split(","), start=1):
        layer_name = f"hidden_units_{number}"
        part = part.strip()
        layers.append(_range(units, layer_name, part) if ":" in part else Choices(layer_name, (units.parse(part),)))
    return HiddenLayers(tuple(layers))


def _dimension_allowed(spec: ParameterSpec) -> str:
    separator = SWEEP_GRID_SEPARATORS[spec.name]
    if spec.name == "hidden_units":
        return ("one or more values separated by ';', each comma-separated positive integers (e.g. '128,64;256'); "
                "or one architecture whose layers may be integer ranges LOW:HIGH[:log] (e.g. '64:512:log,32')")
    kind = "integers" if spec.kind is int else "numbers"
    return (f"one or more values separated by '{separator}', each {spec.allowed}; "
            f"or a range LOW:HIGH[:log] of such {kind} with LOW < HIGH (log: LOW > 0)")


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The swept dimensions and the fixed training values of a sweep.

    Args:
        dimensions: swept parameter -> its dimension (a parameter with a single listed value is fixed).
        fixed: every other training parameter, parsed.
    """

    dimensions: dict[str, Dimension]
    fixed: dict[str, Any]

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SearchSpace:
        """The space of parsed SWEEP_PARAMETERS."""
        dimensions, fixed = {}, {}
        for name in _TRAINING:
            if name not in SWEEP_GRID_SEPARATORS:
                fixed[name] = options[name]
                continue
            dimension = parse_dimension(name, str(options[name]))
            if isinstance(dimension, Choices) and len(dimension.values) == 1:
                fixed[name] = dimension.values[0]
            else:
                dimensions[name] = dimension
        return cls(dimensions, fixed)

    @property
    def is_grid(self) -> bool:
        return all(isinstance(dimension, Choices) for dimension in self.dimensions.values())

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of a grid's values, in order (the last parameter varies fastest)."""
        lists = {name: dimension.values for name, dimension in self.dimensions.items()}
        return [dict(zip(lists, combination, strict=True)) for combination in itertools.product(*lists.values())]

    def suggest(self, trial: Suggests) -> TrainingConfig:
        """A trial's configuration: each dimension asks `trial` for its value."""
        return self.config({name: dimension.suggest(trial) for name, dimension in self.dimensions.items()})

    def config(self, values: Mapping[str, Any]) -> TrainingConfig:
        return TrainingConfig.from_values(self.fixed | dict(values))


def _swept(spec: ParameterSpec) -> ParameterSpec:
    """A training parameter as the sweep takes it: a list or range to search, or one value for all
    trials. Trials run in one process each, so a sweep cannot be one worker of a cluster."""
    if spec.name in SWEEP_GRID_SEPARATORS:
        def is_dimension(text: str) -> bool:
            try:
                parse_dimension(spec.name, text)
            except ParameterError:
                return False
            return True

        return ParameterSpec(spec.name, str, str(spec.default), _dimension_allowed(spec),
                             f"Values or range to search. {spec.help}", is_dimension)
    if spec.name == "strategy":
        single_process = (DEFAULT_STRATEGY, MIRRORED_STRATEGY)
        return dataclasses.replace(
            spec,
            allowed=f"one of {', '.join(single_process)} (a trial runs in one process; multi_worker needs a cluster)",
            check=lambda v: v in single_process,
        )
    return spec


# How the search runs: sampler, budget, pruning, parallel workers and where the study is kept.
SEARCH_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("sampler", str, "", "grid, random or tpe (empty: grid when every swept parameter is a list, "
                  "else tpe)", "How trials are chosen (Optuna's GridSampler, RandomSampler or TPESampler, seeded "
                  "with `seed`).", lambda v: v in ("", *SAMPLERS)),
    ParameterSpec("trials", str, "", f"empty (a grid: all its combinations; else {DEFAULT_TRIALS}) or an integer >= 1 "
                  "(a grid: at most its size)", "How many trials the study runs in all, over every worker.",
                  lambda v: v == "" or (bool(re.fullmatch(r"\s*[0-9]+\s*", v)) and int(v) >= 1)),
    ParameterSpec("pruner", str, "", "none, budget, median or hyperband (empty: none for a grid, else budget)",
                  "Stops trials that are clearly losing at an epoch's end, on the per-epoch validation metric.",
                  lambda v: v in ("", *PRUNERS)),
    ParameterSpec("workers", int, 1, "an integer >= 1", "Trial processes on this machine, sharing the study.",
                  lambda v: v >= 1),
    ParameterSpec("storage", str, "", "empty (a journal file next to a local tracking store, else in "
                  "~/.cache/mnist-pipeline), a file path, or a "
                  "database URL such as postgresql+psycopg2://user@host/optuna",
                  "Where the Optuna study is kept; machines that share it share the sweep."),
    ParameterSpec("study", str, "", "empty (a new study) or a name of letters, digits, '.', '_' and '-'",
                  "Study name: the same name (and storage) joins or continues that study and its parent run.",
                  lambda v: v == "" or bool(_STUDY_NAME.match(v))),
)

# A sweep takes every training parameter (the swept ones as lists or ranges), how the best trial is
# chosen, and how the search runs.
SWEEP_PARAMETERS: tuple[ParameterSpec, ...] = (
    tuple(_swept(spec) for spec in TRAINING_PARAMETERS) + SWEEP_RANKING_PARAMETERS + SEARCH_PARAMETERS
)


def sweep_grid(values: Mapping[str, object] | None = None) -> list[TrainingConfig]:
    """The trials of a grid sweep, in order: one validated config per combination. `values` are
    SWEEP_PARAMETERS, as text or typed.

    Raises:
        ParameterError: an unknown or invalid parameter, or a range (a grid takes lists only).
    """
    space = SearchSpace.from_options(parse_parameters(SWEEP_PARAMETERS, values or {}))
    if not space.is_grid:
        name = next(name for name, dimension in space.dimensions.items() if not isinstance(dimension, Choices))
        raise ParameterError(name, (values or {})[name], "a list of values (a grid has no ranges)")
    return [space.config(point) for point in space.grid()]
