"""Keras callbacks, one job each, each usable on its own in a plain `model.fit`. The pipeline's list
of them, in order and why, is `pipeline.training.callback_list`."""

from pipeline.callbacks.batch_timing import BatchTiming
from pipeline.callbacks.best_checkpoint import BestCheckpoint
from pipeline.callbacks.divergence_guard import DivergenceGuard
from pipeline.callbacks.epoch_metrics import EpochMetricsLogger
from pipeline.callbacks.lr_changes import LearningRateChanges
from pipeline.callbacks.stop_request_check import StopRequestCheck
from pipeline.callbacks.target_accuracy import TargetAccuracyStop
from pipeline.callbacks.training_backup import CarriedCallbacks, TrainingStateBackup
from pipeline.callbacks.trial_pruning import TrialPruning
from pipeline.callbacks.worker_timing import WorkerTiming

__all__ = [
    "BatchTiming", "BestCheckpoint", "CarriedCallbacks", "DivergenceGuard", "EpochMetricsLogger",
    "LearningRateChanges", "StopRequestCheck", "TargetAccuracyStop", "TrainingStateBackup", "TrialPruning",
    "WorkerTiming",
]
