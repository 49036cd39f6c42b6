"""The parameter contract: names, types, defaults, and what each one refuses."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.config import REGISTER_PARAMETERS, TRAINING_PARAMETERS, TrainingConfig
from pipeline.errors import ParameterError
from pipeline.search_space import SWEEP_GRID_SEPARATORS, SWEEP_PARAMETERS, sweep_grid

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
