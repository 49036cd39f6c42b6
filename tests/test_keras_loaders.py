"""`dataset=mnist` / `dataset=fashion_mnist`: the Keras loaders, in real processes, without network.

Keras reads KERAS_HOME (its cache) once, when it is imported, so each case runs in a new process.
A proxy nobody listens on makes any download fail at once, here and on a machine with internet, so
these tests never reach the network. Keras pins the sha256 of `mnist.npz` (and deletes a cached file
that does not match it), so the real MNIST loader can only succeed with the real 11 MB file, which
the tests do not have; `fashion_mnist` pins no hash, so a cache holding the committed fixture's IDX
files is what Keras would have downloaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.training.data import IDX_FILES, KERAS_DATASET_URLS, load_dataset
from tests.helpers import FASHION_SMALL, one_line_error, project_env, run_cli

pytestmark = pytest.mark.slow

NO_NETWORK = {
    **{variable: "http://127.0.0.1:9" for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")},
    "NO_PROXY": "",
    "no_proxy": "",
}

DESCRIBE_DATASET = """
import json, sys
import numpy as np
from pipeline.training.data import load_dataset
dataset = load_dataset(sys.argv[1])
arrays = {key: getattr(dataset, key) for key in ("x_train", "y_train", "x_test", "y_test")}
print(json.dumps({
    "name": dataset.name, "source": dataset.source, "digest": dataset.digest,
    "shapes": {key: list(array.shape) for key, array in arrays.items()},
    "dtypes": {key: str(array.dtype) for key, array in arrays.items()},
    "sums": {key: float(np.sum(array, dtype=np.float64)) for key, array in arrays.items()},
}))
"""


def test_fashion_mnist_loader_reads_the_keras_cache(tmp_path):
    keras_home = tmp_path / "keras"
    cache = keras_home / "datasets" / "fashion-mnist"  # where keras.datasets.fashion_mnist keeps its files
    cache.mkdir(parents=True)
    for filename in IDX_FILES.values():
        shutil.copyfile(FASHION_SMALL / filename, cache / filename)
    done = subprocess.run(
        [sys.executable, "-c", DESCRIBE_DATASET, "fashion_mnist"], cwd=tmp_path, capture_output=True, text=True,
        timeout=120, env=project_env(KERAS_HOME=str(keras_home), **NO_NETWORK),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])

    assert loaded["name"] == "fashion_mnist"
    assert loaded["source"] == KERAS_DATASET_URLS["fashion_mnist"]
    assert loaded["shapes"] == {"x_train": [500, 784], "y_train": [500, 10], "x_test": [100, 784], "y_test": [100, 10]}
    assert loaded["dtypes"] == dict.fromkeys(("x_train", "y_train", "x_test", "y_test"), "float32")
    # the very arrays of the IDX files, prepared as any other source: same digest, same values
    reference = load_dataset(str(FASHION_SMALL))
    assert loaded["digest"] == reference.digest
    for key, total in loaded["sums"].items():
        assert total == pytest.approx(float(np.sum(getattr(reference, key), dtype=np.float64)), rel=1e-9), key
    assert loaded["sums"]["y_train"] == 500.0  # one-hot: one 1 per label
    assert sorted(path.name for path in cache.iterdir()) == sorted(IDX_FILES.values())  # nothing downloaded


def test_failed_mnist_download_is_one_line_through_the_cli(tmp_path):
    dataset = "mnist"
    keras_home = tmp_path / "keras"
    keras_home.mkdir()  # an empty cache (Keras falls back to /tmp/.keras when it is not writable)
    result = run_cli(
        ["train", "--dataset", dataset, "--epochs", "1", "--experiment-name", "offline"],
        cwd=tmp_path, timeout=120, KERAS_HOME=str(keras_home),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", **NO_NETWORK,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    # README, "What happens when things fail": `error: dataset mnist: download failed (...); with no
    # network, pass a local copy: dataset=PATH ...`
    line = one_line_error(result)
    assert line.startswith(f"error: dataset {dataset}: download failed (")
    assert "); with no network, pass a local copy: dataset=PATH " in line
    reason = line.removeprefix(f"error: dataset {dataset}: download failed (").partition("); with no network")[0]
    assert reason.strip(), line  # why it failed, in Keras' words
    assert result.stdout == ""
    # no run: bad data fails before the store is created; if a store exists, it holds nothing
    if (tmp_path / "mlflow.db").exists():
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert client.get_experiment_by_name("offline") is None
        assert client.search_runs([experiment.experiment_id for experiment in client.search_experiments()]) == []
    assert list(keras_home.rglob("*.gz")) == [] and list(keras_home.rglob("*.npz")) == []  # nothing half-kept
