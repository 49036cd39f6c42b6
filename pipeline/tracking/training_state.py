"""The state of a training at an epoch's end, as one file the run holds, so a killed training can
continue in the same run, on this machine or another.

A `TrainingState` carries what `model.fit` and the callbacks would otherwise lose: model weights,
optimizer variables (moments, iteration count, learning rate), EarlyStopping's and
ReduceLROnPlateau's counters and bests (and EarlyStopping's best weights), the best checkpoint
(its `.keras` file, byte for byte), the per-epoch metrics, LR changes, best epoch and whether training
had stopped, and the CSV log so far (see `pipeline.callbacks.training_backup`). It is written as one
uncompressed `.npz` (no pickle) and uploaded as one artifact, so it is replaced whole or not at all.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any, BinaryIO

import keras
import numpy as np

FORMAT_VERSION = 1


@dataclasses.dataclass
class TrainingState:
    """Everything needed to continue training at epoch `epoch + 1`.

    Args:
        epoch: the last completed epoch (0-based).
        model_weights: `model.get_weights()`.
        optimizer_variables: the values of `model.optimizer.variables`, in order.
        early_stopping_weights: EarlyStopping's best weights (restore_best_weights), or None.
        best_checkpoint: the bytes of the best checkpoint `.keras` file, or None.
        record: JSON-able counters and records of the callbacks (see `TrainingStateBackup`).
        csv_log: the CSVLogger file's text so far.
    """

    epoch: int
    model_weights: list[np.ndarray]
    optimizer_variables: list[np.ndarray]
    early_stopping_weights: list[np.ndarray] | None
    best_checkpoint: bytes | None
    record: dict[str, Any]
    csv_log: str

    def save(self, path: Path) -> None:
        with open(path, "wb") as stream:  # a file object: np.savez adds no ".npz" to the name
            self._write(stream)

    def to_bytes(self) -> bytes:
        """The file `save` writes, as bytes (what a multi-worker chief sends its workers on resume)."""
        stream = io.BytesIO()
        self._write(stream)
        return stream.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingState:
        return cls.load(io.BytesIO(data))

    def _write(self, stream: BinaryIO) -> None:
        arrays: dict[str, np.ndarray] = {}
        for prefix, values in (
            ("model", self.model_weights),
            ("optimizer", self.optimizer_variables),
            ("early_stopping", self.early_stopping_weights or []),
        ):
            for index, value in enumerate(values):
                arrays[f"{prefix}_{index:04d}"] = np.asarray(value)
        if self.best_checkpoint is not None:
            arrays["best_checkpoint"] = np.frombuffer(self.best_checkpoint, dtype=np.uint8)
        header = {
            "format_version": FORMAT_VERSION,
            "epoch": self.epoch,
            "counts": {
                "model": len(self.model_weights),
                "optimizer": len(self.optimizer_variables),
                "early_stopping": None if self.early_stopping_weights is None else len(self.early_stopping_weights),
            },
            "record": self.record,
            "csv_log": self.csv_log,
        }
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        np.savez(stream, **arrays)

    @classmethod
    def load(cls, path: Path | BinaryIO) -> TrainingState:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes().decode())
            if header.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"unsupported training state format {header.get('format_version')}")
            counts = header["counts"]

            def arrays(prefix: str, count: int | None) -> list[np.ndarray] | None:
                return None if count is None else [npz[f"{prefix}_{index:04d}"] for index in range(count)]

            return cls(
                epoch=int(header["epoch"]),
                model_weights=arrays("model", counts["model"]) or [],
                optimizer_variables=arrays("optimizer", counts["optimizer"]) or [],
                early_stopping_weights=arrays("early_stopping", counts["early_stopping"]),
                best_checkpoint=npz["best_checkpoint"].tobytes() if "best_checkpoint" in npz.files else None,
                record=header["record"],
                csv_log=header["csv_log"],
            )


def optimizer_values(model: keras.Model) -> list[np.ndarray]:
    """The optimizer's variables (step count, moments) as arrays, for the saved state."""
    return [keras.ops.convert_to_numpy(variable) for variable in model.optimizer.variables]


def restore_model(model: keras.Model, state: TrainingState) -> None:
    """Puts the weights and optimizer variables (moments, iterations, learning rate) back."""
    model.set_weights(state.model_weights)
    if not model.optimizer.built:  # Keras builds it lazily, at the first training step
        model.optimizer.build(model.trainable_variables)
    variables = model.optimizer.variables
    if len(variables) != len(state.optimizer_variables):
        raise ValueError(
            f"optimizer has {len(variables)} variables, the saved state {len(state.optimizer_variables)}"
        )
    for variable, value in zip(variables, state.optimizer_variables, strict=True):
        variable.assign(value)


def monitor_state(callback: keras.callbacks.Callback, *fields: str) -> dict[str, Any]:
    """The named counters of a Keras monitor callback, as JSON-able values."""
    return {field: _plain(getattr(callback, field)) for field in fields}


def restore_monitor_state(callback: keras.callbacks.Callback, values: dict[str, Any]) -> None:
    """Puts a Keras monitor callback's saved counters (wait, best, ...) back."""
    for field, value in values.items():
        setattr(callback, field, value)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return float(value)
