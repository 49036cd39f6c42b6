"""Continuing a killed training in its own MLflow run.

Whether a run given by id (`--run-id`, or MLFLOW_RUN_ID under `mlflow run --run-id`) is a new run
to train in, a run to resume, or one to refuse is decided here, from what the run itself holds, so
a resume works on any machine that can reach the tracking store.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TRAINING_PARAMETERS, TrainingConfig
from pipeline.errors import ParameterError, UserInputError
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.training_state import TrainingState

logger = logging.getLogger(__name__)


class RunNotResumable(UserInputError):
    """The given run cannot be continued (finished, or trained with other parameters). Exit 2."""


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """Where a resumed training starts.

    Args:
        state: the last state the run holds, or None when it was killed before its first epoch ended.
        dataset_digest: the digest of the data the run was trained on.
    """

    state: TrainingState | None
    dataset_digest: str | None

    def initial_epoch(self, epochs: int) -> int:
        """The first epoch to train: the one after the saved state, or none when training had ended."""
        if self.state is None:
            return 0
        if self.state.record.get("stopped"):
            return epochs
        return self.state.epoch + 1


def find_resume_point(client: MlflowClient, run_id: str, config: TrainingConfig) -> ResumePoint | None:
    """Returns where to resume run `run_id`, or None when it is a fresh run (one `mlflow run` has
    just created for us).

    Raises:
        ParameterError: no such run.
        RunNotResumable: the run is FINISHED, or its recorded parameters differ from `config`.
    """
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ParameterError("run_id", run_id, "the id of an existing run in the tracking store") from None
    run_type = run.data.tags.get(names.TAG_RUN_TYPE)
    if run_type is None:
        return None  # nothing of ours has happened in this run yet (e.g. `mlflow run` just made it)
    if run_type != names.RUN_TYPE_TRAINING:
        raise RunNotResumable(f"run {run_id} is a {run_type} run, not a training run")
    if run.info.status == RunStatus.to_string(RunStatus.FINISHED):
        raise RunNotResumable(
            f"run {run_id} is FINISHED; a finished run is not trained again (start a new run instead)"
        )
    differences = parameter_differences(run, config)
    if differences:
        raise RunNotResumable(
            f"run {run_id} was trained with other parameters; resume it with the same ones "
            f"(recorded -> given): {'; '.join(differences)}"
        )
    return ResumePoint(
        state=_download_state(client, run_id), dataset_digest=run.data.tags.get(names.TAG_DATASET_DIGEST)
    )


def parameter_differences(run: Run, config: TrainingConfig) -> list[str]:
    """The training parameters whose recorded value differs from `config` (compared as values:
    "1e-3" and "0.001" are equal)."""
    given = TrainingConfig.from_values(config.as_params())
    differences = []
    for spec in TRAINING_PARAMETERS:
        recorded_text = run.data.params.get(spec.name)
        if recorded_text is None:
            continue
        try:
            recorded = getattr(TrainingConfig.from_values({spec.name: recorded_text}), spec.name)
        except ParameterError:
            recorded = recorded_text
        if recorded != getattr(given, spec.name):
            differences.append(f"{spec.name} {recorded_text} -> {getattr(config, spec.name)}")
    return differences


def _download_state(client: MlflowClient, run_id: str) -> TrainingState | None:
    artifact = f"{names.STATE_DIR}/{names.STATE_FILE}"
    listed = {item.path for item in client.list_artifacts(run_id, names.STATE_DIR)}
    if artifact not in listed:
        return None
    with tempfile.TemporaryDirectory(prefix="mnist-resume-") as tmp:
        return TrainingState.load(Path(client.download_artifacts(run_id, artifact, tmp)))


def resend_missing_metrics(client: MlflowClient, recorder: RunRecorder, history: Sequence[dict[str, float]]) -> int:
    """Logs the metrics of the saved epochs that the run does not hold yet (the state of an epoch
    is delivered before its metrics, so a kill can leave the last epoch's metrics out). Returns how
    many values were sent."""
    sent = 0
    for key in sorted({key for row in history for key in row}):
        present = {metric.step for metric in client.get_metric_history(recorder.run_id, key)}
        for epoch, row in enumerate(history):
            if key in row and epoch not in present:
                recorder.log_metrics({key: row[key]}, step=epoch)
                sent += 1
    return sent
