"""The parameter contract: names, types, defaults, and what each one refuses."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import (
    COMPARE_PARAMETERS,
    REGISTER_PARAMETERS,
    TRAINING_PARAMETERS,
    TrainingConfig,
    parse_parameters,
)
from pipeline.errors import ParameterError
from pipeline.search_space import (
    SWEEP_GRID_SEPARATORS,
    SWEEP_PARAMETERS,
    Choices,
    HiddenLayers,
    Range,
    SearchSpace,
    parse_dimension,
    sweep_grid,
)

# The contract of issue 2, as the user reads it in the README.
CONTRACT_DEFAULTS = {
    "epochs": 20,
    "batch_size": 128,
    "learning_rate": 0.001,
    "hidden_units": "128,64",
    "dropout": 0.2,
    "validation_split": 0.2,
    "dataset": "mnist",
    "es_patience": 3,
    "lr_factor": 0.5,
    "lr_patience": 2,
    "min_lr": 1e-6,
    "target_accuracy": 0.98,
    "seed": 42,
    # not a seed notebook parameter: Keras runs 1 batch per call; 8 give the same results faster
    "steps_per_execution": 64,
    "strategy": "default",
}


def test_defaults_are_the_seed_notebooks():
    assert {spec.name: spec.default for spec in TRAINING_PARAMETERS} == CONTRACT_DEFAULTS
    assert dataclasses.asdict(TrainingConfig.from_values()) == CONTRACT_DEFAULTS


def test_config_fields_are_exactly_the_parameters():
    assert [field.name for field in dataclasses.fields(TrainingConfig)] == [
        spec.name for spec in TRAINING_PARAMETERS
    ]


def test_values_given_as_text_are_parsed():
    config = TrainingConfig.from_values(
        {"epochs": "5", "learning_rate": "1e-3", "hidden_units": " 256, 32 ,16", "dropout": "0",
         "target_accuracy": "0", "min_lr": "0"}
    )
    assert config.epochs == 5
    assert config.learning_rate == 0.001
    assert config.layer_sizes == (256, 32, 16)
    assert config.hidden_units == "256,32,16"
    assert (config.dropout, config.target_accuracy, config.min_lr) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("epochs", "0"), ("epochs", "2.5"), ("epochs", "ten"), ("epochs", ""),
        ("batch_size", "0"), ("batch_size", "-1"),
        ("learning_rate", "0"), ("learning_rate", "-0.1"), ("learning_rate", "nan"), ("learning_rate", "inf"),
        ("hidden_units", ""), ("hidden_units", "128,"), ("hidden_units", "0,64"), ("hidden_units", "a,b"),
        ("hidden_units", "-5"),
        ("dropout", "1"), ("dropout", "-0.1"),
        ("validation_split", "0"), ("validation_split", "1"),
        ("dataset", ""), ("dataset", "   "),
        ("es_patience", "-1"), ("lr_factor", "1"), ("lr_factor", "0"), ("lr_patience", "-2"),
        ("min_lr", "-1e-6"), ("target_accuracy", "1.5"), ("target_accuracy", "-0.5"),
        ("seed", "-1"), ("seed", str(2**32)),
        ("strategy", "mirrord"), ("strategy", "Default"), ("strategy", ""),
    ],
)
def test_invalid_values_name_the_parameter_and_what_is_allowed(name, value):
    spec = next(spec for spec in TRAINING_PARAMETERS if spec.name == name)
    with pytest.raises(ParameterError) as raised:
        TrainingConfig.from_values({name: value})
    message = str(raised.value)
    assert raised.value.name == name
    assert name in message and spec.allowed in message
    assert "\n" not in message


def test_unknown_parameter_is_refused():
    with pytest.raises(ParameterError, match="one of .*epochs"):
        TrainingConfig.from_values({"epoch": "3"})


def test_true_false_parameters_take_words_and_refuse_anything_else():
    dry_run = next(spec for spec in REGISTER_PARAMETERS if spec.name == "dry_run")
    assert (dry_run.parse("true"), dry_run.parse(" False "), dry_run.parse(True)) == (True, False, True)
    assert dry_run.default_text == "false"
    for value in ("yes", "1", "", 1):
        with pytest.raises(ParameterError, match="dry_run"):
            dry_run.parse(value)


def test_sweep_grid_is_every_combination_in_order():
    configs = sweep_grid({"learning_rate": "0.001, 3e-3", "hidden_units": "128,64;32", "epochs": "2",
                          "dataset": "x.npz"})
    assert [(c.learning_rate, c.hidden_units) for c in configs] == [
        (0.001, "128,64"), (0.001, "32"), (0.003, "128,64"), (0.003, "32")
    ]
    assert {(c.epochs, c.dataset, c.batch_size) for c in configs} == {(2, "x.npz", 128)}
    assert len(sweep_grid({"dropout": "0.1,0.1"})) == 1  # repeated values are one trial


def test_sweep_parameters_are_the_training_parameters_with_grids():
    training = [spec.name for spec in TRAINING_PARAMETERS]
    assert [spec.name for spec in SWEEP_PARAMETERS][: len(training)] == training
    grids = {spec.name for spec in SWEEP_PARAMETERS if spec.kind is str and "separated by" in spec.allowed}
    assert grids == set(SWEEP_GRID_SEPARATORS) == {"learning_rate", "hidden_units", "dropout", "batch_size", "epochs"}


@pytest.mark.parametrize(("name", "value"), [("learning_rate", "0.1,,0.2"), ("hidden_units", "64;0"),
                                             ("batch_size", "32,1.5"), ("dropout", "")])
def test_a_bad_grid_names_the_parameter_and_what_is_allowed(name, value):
    with pytest.raises(ParameterError) as raised:
        sweep_grid({name: value})
    assert raised.value.name == name
    assert "one or more values separated by" in str(raised.value)


# What a refusal carries, whatever the wrong value's type: the parameter, the value as given, and what is
# allowed (the error's fields, which entry points print as one line).
_WRONG_VALUES = {
    int: ["ten", " ", "2.5", 2.5, None, [1], True, "nan", "-1"],
    float: ["ten", "", None, [0.5], True, "inf", "-inf", "nan", float("nan"), "-1"],
    str: [None, 5, 0.5, ["a"], True, "\n"],
    bool: ["yes", "", "1", 1, 0, None],
}


@pytest.mark.parametrize("spec", TRAINING_PARAMETERS + REGISTER_PARAMETERS + COMPARE_PARAMETERS,
                         ids=lambda spec: spec.name)
def test_a_refusal_carries_the_parameter_the_value_as_given_and_what_is_allowed(spec):
    for raw in _WRONG_VALUES[spec.kind]:
        if spec.kind is str and spec.name == "filter" and isinstance(raw, str):
            continue
        with pytest.raises(ParameterError) as raised:
            spec.parse(raw)
        assert (raised.value.name, raised.value.allowed) == (spec.name, spec.allowed), raw
        assert raised.value.value is raw
        assert f"parameter {spec.name}={raw!r} is invalid: allowed is {spec.allowed}" == str(raised.value)


def test_a_number_parameter_takes_an_integer_as_a_float():
    learning_rate = next(spec for spec in TRAINING_PARAMETERS if spec.name == "learning_rate")
    value = learning_rate.parse(1)
    assert value == 1.0 and type(value) is float
    epochs = next(spec for spec in TRAINING_PARAMETERS if spec.name == "epochs")
    assert type(epochs.parse(3)) is int and epochs.parse(" 3 ") == 3


def test_an_unknown_parameter_is_named_with_every_known_one():
    with pytest.raises(ParameterError) as raised:
        TrainingConfig.from_values({"epochs": "2", "epoch": 3})
    known = ", ".join(sorted(spec.name for spec in TRAINING_PARAMETERS))
    assert (raised.value.name, raised.value.value, raised.value.allowed) == ("epoch", 3, f"one of {known}")


def test_config_as_mlflow_params_is_every_parameter_as_text_in_order():
    config = TrainingConfig.from_values({"hidden_units": "256, 32", "dropout": "0"})
    params = config.as_params()
    assert list(params) == [spec.name for spec in TRAINING_PARAMETERS]
    assert params["hidden_units"] == "256,32" and params["dropout"] == "0.0" and params["epochs"] == "20"
    assert params["learning_rate"] == "0.001"


# The sweep's ranges and lists, as docs/search.md writes them.
@pytest.mark.parametrize(
    ("name", "text", "dimension"),
    [
        ("learning_rate", " 1e-4 : 1e-2 : log ", Range("learning_rate", 1e-4, 1e-2, log=True, integer=False)),
        ("dropout", "0.0:0.5", Range("dropout", 0.0, 0.5, log=False, integer=False)),
        ("batch_size", "32:256:log", Range("batch_size", 32, 256, log=True, integer=True)),
        ("epochs", "1:3", Range("epochs", 1, 3, log=False, integer=True)),
        ("dropout", "0.2, 0.1,0.2", Choices("dropout", (0.2, 0.1))),
        ("hidden_units", "128,64;256", Choices("hidden_units", ("128,64", "256"))),
        ("hidden_units", "64:512:log, 32 ,16:64", HiddenLayers((
            Range("hidden_units_1", 64, 512, log=True, integer=True),
            Choices("hidden_units_2", (32,)),
            Range("hidden_units_3", 16, 64, log=False, integer=True),
        ))),
    ],
)
def test_a_swept_parameter_is_a_list_or_a_range(name, text, dimension):
    assert parse_dimension(name, text) == dimension


_LIST_OR_RANGE = ("one or more values separated by ',', each {allowed}; or a range LOW:HIGH[:log] of such {kind} "
                  "with LOW < HIGH (log: LOW > 0)")


@pytest.mark.parametrize(
    ("name", "text", "kind"),
    [
        ("dropout", "0.1:0.1", "numbers"),  # LOW == HIGH
        ("dropout", "0.3:0.1", "numbers"),
        ("dropout", "0.0:0.5:log", "numbers"),  # log with LOW = 0
        ("learning_rate", "1e-3:1e-2:lin", "numbers"),
        ("learning_rate", "1e-3:1e-2:log:x", "numbers"),
        ("learning_rate", "1e-3:", "numbers"),
        ("batch_size", "32:64.5", "integers"),
        ("epochs", "0:3", "integers"),
        ("hidden_units", "64:512:log,0", None),
        ("hidden_units", "64:64,32", None),
    ],
)
def test_a_bad_range_names_the_parameter_the_text_and_what_is_allowed(name, text, kind):
    with pytest.raises(ParameterError) as raised:
        parse_dimension(name, f" {text} ")
    spec = next(spec for spec in TRAINING_PARAMETERS if spec.name == name)
    allowed = ("one or more values separated by ';', each comma-separated positive integers (e.g. '128,64;256'); "
               "or one architecture whose layers may be integer ranges LOW:HIGH[:log] (e.g. '64:512:log,32')"
               if kind is None else _LIST_OR_RANGE.format(allowed=spec.allowed, kind=kind))
    assert (raised.value.name, raised.value.value, raised.value.allowed) == (name, text, allowed)


def test_a_grid_refuses_a_range_naming_the_first_range_in_the_parameters_order():
    values = {"learning_rate": "0.001,0.01", "dropout": "0.1:0.5", "batch_size": "32:64"}  # batch_size first
    with pytest.raises(ParameterError) as raised:
        sweep_grid(values)
    assert (raised.value.name, raised.value.value, raised.value.allowed) == (
        "batch_size", "32:64", "a list of values (a grid has no ranges)"
    )


def test_each_dimension_asks_an_optuna_trial_for_its_distribution():
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    options = parse_parameters(SWEEP_PARAMETERS, {
        "learning_rate": "1e-4:1e-2:log", "dropout": "0.1,0.3", "batch_size": "32:256:log",
        "hidden_units": "64:512:log,32", "epochs": "2:4",
    })
    space = SearchSpace.from_options(options)
    assert not space.is_grid
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3)).ask()
    config = space.suggest(trial)
    assert trial.distributions == {
        "learning_rate": FloatDistribution(1e-4, 1e-2, log=True),
        "dropout": CategoricalDistribution((0.1, 0.3)),
        "batch_size": IntDistribution(32, 256, log=True),
        "hidden_units_1": IntDistribution(64, 512, log=True),
        "hidden_units_2": CategoricalDistribution((32,)),
        "epochs": IntDistribution(2, 4),
    }
    params = trial.params
    assert (config.learning_rate, config.dropout, config.batch_size, config.epochs) == (
        params["learning_rate"], params["dropout"], params["batch_size"], params["epochs"]
    )
    assert config.hidden_units == f"{params['hidden_units_1']},32"
    assert (config.seed, config.strategy) == (42, "default")  # the fixed values


def test_each_training_parameter_as_the_sweep_takes_it():
    """What `_swept` makes of each training parameter (SWEEP_PARAMETERS is built from it at import)."""
    from pipeline.search_space import _dimension_allowed, _swept

    for spec in TRAINING_PARAMETERS:
        swept = _swept(spec)
        if spec.name in SWEEP_GRID_SEPARATORS:
            assert (swept.name, swept.kind, swept.default, swept.allowed, swept.help) == (
                spec.name, str, str(spec.default), _dimension_allowed(spec), f"Values or range to search. {spec.help}"
            )
            assert swept.parse(f" {spec.default} ") == f" {spec.default} "  # the text, checked, kept as given
        elif spec.name == "strategy":
            assert (swept.name, swept.kind, swept.default, swept.help) == (spec.name, str, "default", spec.help)
            assert swept.allowed == (
                "one of default, mirrored (a trial runs in one process; multi_worker needs a cluster)"
            )
            assert swept.parse("mirrored") == "mirrored"
            with pytest.raises(ParameterError):
                swept.parse("multi_worker")
        else:
            assert swept is spec
    learning_rate = _swept(next(spec for spec in TRAINING_PARAMETERS if spec.name == "learning_rate"))
    assert learning_rate.parse("1e-4:1e-2:log") == "1e-4:1e-2:log"
    with pytest.raises(ParameterError) as raised:
        learning_rate.parse("0:1e-2:log")
    assert raised.value.name == "learning_rate"
