"""Names of everything the pipeline records in MLflow: metrics, artifacts, tags, registry names.

This module is the one place these names are spelled. The README's "What a run records" table,
the callbacks, the reporting code, the registry, comparison and sweep code and the tests all read
them from here.
"""

# The images and classes every dataset must have (28x28 grayscale digits or articles, 10 classes).
NUM_CLASSES = 10
IMAGE_SIDE = 28
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE

# Per-epoch metrics (step = epoch index, starting at 0; one value per completed epoch).
LOSS = "loss"
ACCURACY = "accuracy"
VAL_LOSS = "val_loss"
VAL_ACCURACY = "val_accuracy"
LEARNING_RATE = "learning_rate"
EPOCH_SECONDS = "epoch_seconds"
SAMPLES_PER_SECOND = "samples_per_second"
BATCH_MS_MEAN = "batch_ms_mean"
BATCH_MS_P95 = "batch_ms_p95"
EPOCH_METRICS = (
    LOSS,
    ACCURACY,
    VAL_LOSS,
    VAL_ACCURACY,
    LEARNING_RATE,
    EPOCH_SECONDS,
    SAMPLES_PER_SECOND,
    BATCH_MS_MEAN,
    BATCH_MS_P95,
)
# Per-epoch metric of distributed trainings (strategy mirrored or multi_worker) only.
SLOWEST_WORKER_EPOCH_SECONDS = "slowest_worker_epoch_seconds"

# Metrics logged when something happens (new best checkpoint) or once at the end.
BEST_VAL_ACCURACY = "best_val_accuracy"
EPOCHS_COMPLETED = "epochs_completed"
TEST_LOSS = "test_loss"
TEST_ACCURACY = "test_accuracy"
# What every training run records, whatever its strategy or stop (slowest_worker_epoch_seconds is left out:
# only distributed trainings have it). Runs are ranked by a metric's last value; a sweep's trials by one of these.
RUN_METRICS = (*EPOCH_METRICS, BEST_VAL_ACCURACY, EPOCHS_COMPLETED, TEST_LOSS, TEST_ACCURACY)

# Artifacts (paths inside the run's artifact root).
# Each new best checkpoint: checkpoints/epoch_<epoch>/best_model.keras and its description best_model.json (MLflow's
# own layout, so that mlflow.tensorflow.load_checkpoint(run_id=..., epoch=E) finds it); the tag
# TAG_LATEST_CHECKPOINT points at the newest complete one, and is written only once both files are stored.
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_EPOCH_PREFIX = "epoch_"
BEST_MODEL_FILE = "best_model.keras"
BEST_MODEL_INFO_FILE = "best_model.json"
LR_CHANGES_FILE = "lr_changes.json"
TRAINING_LOG_FILE = "training_log.csv"
MODEL_SUMMARY_FILE = "model_summary.txt"
PLOTS_DIR = "plots"
TRAINING_CURVES_FILE = "training_curves.png"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
CLASSIFICATION_REPORT_FILE = "classification_report.json"
WORKER_TIMING_FILE = "worker_epoch_seconds.json"  # distributed trainings: each worker's epoch times
MODEL_NAME = "model"  # the logged MLflow model: runs:/<run_id>/model
# Each new best checkpoint is also an MLflow model, a LoggedModel of the run named `checkpoint`: output of the
# run at step = its epoch, tag `epoch`, and the run's metrics of that epoch linked to it (model_id). At the end the
# best one is logged as MODEL_NAME the same way, and its `checkpoint` deleted: one LoggedModel per set of weights.
CHECKPOINT_MODEL_NAME = "checkpoint"
MODEL_TAG_EPOCH = "epoch"

# Tags.
TAG_CALLBACKS = "callbacks"
TAG_LR_REDUCTIONS = "lr_reductions"
TAG_BEST_EPOCH = "best_epoch"
TAG_STOP_REASON = "stop_reason"
TAG_RUN_TYPE = "run_type"
TAG_NAN_AT = "nan_at"
# MLflow's pointer to a run's checkpoint (mlflow.tensorflow.load_checkpoint reads it): the artifact path of the best
# checkpoint's .keras file, checkpoints/epoch_<best_epoch>/best_model.keras.
TAG_LATEST_CHECKPOINT = "mlflow.latest_checkpoint_artifact"

# Values of the run_type tag. Only `training` runs are compared, swept over and registered; the
# runs of the other entry points carry their own type so that they are never mistaken for one.
RUN_TYPE_TRAINING = "training"
RUN_TYPE_REGISTRATION = "registration"
RUN_TYPE_COMPARISON = "comparison"
RUN_TYPE_SWEEP = "sweep"

# Values of the stop_reason tag.
STOP_COMPLETED = "completed"
STOP_EARLY_STOPPING = "early_stopping"
STOP_TARGET_ACCURACY = "target_accuracy"
STOP_NAN_LOSS = "nan_loss"
STOP_PRUNED = "pruned"  # a sweep trial its pruner stopped

# Derived params logged beside the user's parameters.
PARAM_TOTAL_PARAMETERS = "total_parameters"
PARAM_TRAIN_SIZE = "train_size"
PARAM_VAL_SIZE = "val_size"
PARAM_TEST_SIZE = "test_size"
PARAM_STEPS_PER_EPOCH = "steps_per_epoch"
PARAM_NUM_REPLICAS = "num_replicas"
PARAM_NUM_WORKERS = "num_workers"

DATASET_CONTEXT_TRAINING = "training"
TAG_DATASET_DIGEST = "dataset_digest"

# Resumable training state: two slots written in turn, epoch after epoch (state_artifact), so the run always
# holds its last two states and the older one is never sent again.
STATE_DIR = "state"
STATE_FILES = ("training_state_a.npz", "training_state_b.npz")
TAG_RESUMED_FROM_EPOCH = "resumed_from_epoch"
# Set when the tracking store fell behind a training (or was away) and caught up: the longest a record
# waited to be sent, in seconds (pipeline.tracking.recorder).
TAG_RECORDING_MAX_LAG = "recording_max_lag_seconds"
TAG_TRAINING_OWNER = "training_owner"  # the training process's heartbeat (pipeline.tracking.run_owner)

# Model registry: the alias of the serving model, and the tags of a version (beside its metrics).
CHAMPION_ALIAS = "champion"
TAG_VERSION_RUN_ID = "run_id"
# A version's tag: a token of the one create call that made it (every re-send of that call carries it).
TAG_REGISTRATION_TOKEN = "registration_token"
# A registered model's tag: the one rule that picks its champion, "<metric> <mode>" (e.g. "test_accuracy max").
# Its first registration sets it; only `register` with change_rule=true changes it.
TAG_CHAMPION_RULE = "champion_rule"

# A registration run (`mlflow run -e register`): what it decided.
TAG_REGISTERED_MODEL = "registered_model"
TAG_REGISTERED_VERSION = "registered_version"
TAG_REGISTERED_RUN_ID = "registered_run_id"
TAG_CHAMPION_VERSION = "champion_version"
TAG_REGISTRATION_DECISION = "registration_decision"

# A comparison run (`mlflow run -e compare`, or `compare --log-run true`): its outputs.
COMPARISON_TABLE_FILE = "comparison.csv"
COMPARISON_PLOT_FILE = "comparison.png"
TAG_COMPARED_RUNS = "compared_runs"
TAG_COMPARE_URL = "compare_url"

# A sweep: the parent's trials table and best trial; each child's trial number.
SWEEP_TRIALS_FILE = "sweep_trials.csv"
TAG_SWEEP_TRIAL = "sweep_trial"
TAG_BEST_RUN_ID = "best_run_id"
TAG_BEST_TRIAL = "best_trial"
TAG_TRIAL_STATE = "trial_state"  # a child's state in the study: finished, pruned, failed (running meanwhile)
TAG_CONTINUED_BY_TRIAL = "continued_by_trial"  # a paused trial's run: the trial that continued it
TAG_FINISHED_TRIALS = "finished_trials"
TAG_PRUNED_TRIALS = "pruned_trials"
TAG_FAILED_TRIALS = "failed_trials"
TAG_STUDY_NAME = "study_name"
TAG_STUDY_STORAGE = "study_storage"
# MLflow's system tags that say where a run comes from (the UI's Source and User columns): `mlflow run` sets
# them on the runs it creates, `mlflow.start_run` on a new run; a sweep sets them on its parent and copies them
# to its trials (runs it creates through the client, which sets none).
SOURCE_TAGS = (
    "mlflow.source.name",
    "mlflow.source.type",
    "mlflow.source.git.commit",
    "mlflow.source.git.repoURL",
    "mlflow.source.git.branch",
    "mlflow.gitRepoURL",
    "mlflow.project.entryPoint",
    "mlflow.project.env",
    "mlflow.project.backend",
    "mlflow.user",
)
SWEEP_HISTORY_PLOT = "optimization_history.png"
SWEEP_IMPORTANCE_PLOT = "param_importances.png"
BEST_METRIC_PREFIX = "best_"  # the parent's metric best_<metric>, e.g. best_test_accuracy


def checkpoint_dir(epoch: int) -> str:
    """The artifact directory of the best checkpoint of `epoch` (0-based): `checkpoints/epoch_<epoch>`."""
    return f"{CHECKPOINT_DIR}/{CHECKPOINT_EPOCH_PREFIX}{epoch}"


def checkpoint_file(epoch: int) -> str:
    """The artifact path of the best checkpoint of `epoch`, the value of TAG_LATEST_CHECKPOINT."""
    return f"{checkpoint_dir(epoch)}/{BEST_MODEL_FILE}"


def state_artifact(epoch: int) -> str:
    """The artifact path of the training state of `epoch` (0-based): the slot of its parity, which holds
    the state of epoch `epoch - 2` until this one replaces it."""
    return f"{STATE_DIR}/{STATE_FILES[epoch % len(STATE_FILES)]}"
