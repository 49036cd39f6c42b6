"""Continuing a killed training in its own MLflow run.

Whether a run given by id (`--run-id`, or MLFLOW_RUN_ID under `mlflow run --run-id`) is a new run
to train in, a run to resume, or one to refuse is decided here, from what the run itself holds, so
a resume works on any machine that can reach the tracking store. A run that another process is
training (its heartbeat, `pipeline.tracking.run_owner`) is refused. The run holds two states, the
newest and the one of the epoch before (Keras' `BackupAndRestore(double_checkpoint=True)`; two slots
written in turn): when the newest cannot be read, the resume continues from the other, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.config import TRAINING_PARAMETERS, TrainingConfig
from pipeline.errors import ParameterError, UserInputError, first_line
from pipeline.tracking.recorder import RunRecorder
from pipeline.tracking.run_owner import HEARTBEAT_TIMEOUT_SECONDS, live_owner
from pipeline.tracking.training_state import TrainingState

logger = logging.getLogger(__name__)


class RunNotResumable(UserInputError):
    """The given run cannot be continued (finished, trained by a live process, or with other
    parameters). Exit 2."""


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


def find_resume_point(
    client: MlflowClient, run_id: str, config: TrainingConfig, heartbeat_timeout: float = HEARTBEAT_TIMEOUT_SECONDS,
    continue_pruned: bool = False,
) -> ResumePoint | None:
    """Returns where to resume run `run_id`, or None when it is a fresh run (one `mlflow run` has
    just created for us).

    Args:
        heartbeat_timeout: seconds after its last heartbeat that a training on another machine is
            taken as gone (`pipeline.tracking.run_owner`).
        continue_pruned: a pruned sweep trial may be continued (its sweep continues a trial it paused).

    Raises:
        ParameterError: no such run.
        RunNotResumable: the run is FINISHED or a pruned sweep trial (without `continue_pruned`, or with it
            and no saved state), another live process trains it, its recorded parameters differ from `config`,
            or none of its saved states can be read.
    """
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ParameterError("run_id", run_id, "the id of an existing run in the tracking store") from None
    if run.info.status != RunStatus.to_string(RunStatus.FINISHED):
        owner = live_owner(run, heartbeat_timeout)
        if owner is not None:
            raise RunNotResumable(trained_elsewhere(run_id, owner[1]))
    run_type = run.data.tags.get(names.TAG_RUN_TYPE)
    if run_type is None:
        return None  # nothing of ours has happened in this run yet (e.g. `mlflow run` just made it)
    if run_type != names.RUN_TYPE_TRAINING:
        raise RunNotResumable(f"run {run_id} is a {run_type} run, not a training run")
    pruned = run.data.tags.get(names.TAG_STOP_REASON) == names.STOP_PRUNED
    if pruned and not continue_pruned:
        raise RunNotResumable(
            f"run {run_id} is a sweep trial its pruner stopped (stop_reason={names.STOP_PRUNED}); a pruned trial "
            "is not trained again (start a new run, or continue the sweep's study)"
        )
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
    state = _download_state(client, run_id)
    if state is None and pruned:
        raise RunNotResumable(f"run {run_id} is a pruned sweep trial that holds no saved training state to "
                              "continue from")  # trained again from its first epoch, it would pay for them twice
    return ResumePoint(state=state, dataset_digest=run.data.tags.get(names.TAG_DATASET_DIGEST))


def trained_elsewhere(run_id: str, why: str) -> str:
    """The refusal of a run that another live process trains, `why` saying why it is taken as alive."""
    return f"run {run_id} is being trained by another process: {why}"


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
    """The newest state the run holds that can be read (None when it holds none): of the state files in
    its `state/` directory (the two slots, `names.state_artifact`; or an earlier version's names), the one of
    the latest epoch, with a warning naming what could not be read."""
    listed = sorted(item.path for item in client.list_artifacts(run_id, names.STATE_DIR)
                    if not item.is_dir and item.path.endswith(".npz"))
    states, unreadable = [], []
    with tempfile.TemporaryDirectory(prefix="mnist-resume-") as tmp:
        for artifact in listed:
            try:
                states.append((TrainingState.load(Path(client.download_artifacts(run_id, artifact, tmp))), artifact))
            except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as error:  # truncated, damaged
                unreadable.append(f"{artifact} ({type(error).__name__}: {first_line(error, 120)})")
    if not states:
        if unreadable:
            raise RunNotResumable(f"run {run_id}: no saved training state can be read: {'; '.join(unreadable)}; "
                                  "start a new run")
        return None
    state, artifact = max(states, key=lambda loaded: loaded[0].epoch)
    if unreadable:
        logger.warning("Run %s: %s cannot be read; continuing from %s, the state of epoch %d",
                       run_id, "; ".join(unreadable), artifact, state.epoch + 1)
    return state


def resend_missing_metrics(client: MlflowClient, recorder: RunRecorder, history: Sequence[dict[str, float]]) -> int:
    """Logs the metrics of the saved epochs that the run does not hold yet (the state of an epoch
    is delivered before its metrics, so a kill can leave the last epoch's metrics out). Returns how
    many values were sent. The stored values are given to the recorder, which links a model's
    metrics from what it holds (a best epoch before the kill included)."""
    sent = 0
    for key in sorted({key for row in history for key in row}):
        stored = client.get_metric_history(recorder.run_id, key)
        recorder.remember_metrics(stored)
        present = {metric.step for metric in stored}
        for epoch, row in enumerate(history):
            if key in row and epoch not in present:
                recorder.log_metrics({key: row[key]}, step=epoch)
                sent += 1
    return sent
