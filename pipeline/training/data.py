"""Loading and validating the digit / fashion-article datasets.

Every source ends as the same `ImageDataset`: float32 images in [0, 1] flattened to 784 columns and
one-hot float32 labels over 10 classes (as the seed notebook prepares them). Any defect in a source
is reported as one `DataError` line naming the file and what is wrong; files are only read, never
executed or unpickled.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from pipeline.constants import IMAGE_SIDE, NUM_CLASSES, NUM_PIXELS
from pipeline.errors import DataError, ParameterError

logger = logging.getLogger(__name__)

KERAS_DATASETS = ("mnist", "fashion_mnist")
KERAS_DATASET_URLS = {
    "mnist": "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
    "fashion_mnist": "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
}
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
ALLOWED_SOURCES = (
    "'mnist', 'fashion_mnist', an .npz with x_train/y_train/x_test/y_test, "
    "or a directory with the four MNIST-format IDX .gz files"
)


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """A validated dataset, ready for the model.

    Args:
        name: short name for MLflow (`mnist`, `fashion_mnist`, or the file/directory name).
        source: where it came from (a download URL or an absolute path).
        digest: sha256 prefix of the raw arrays; equal data gives an equal digest.
        x_train, y_train, x_test, y_test: float32 images (n, 784) in [0, 1] and one-hot labels (n, 10).
    """

    name: str
    source: str
    digest: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_dataset(spec: str) -> ImageDataset:
    """Loads `spec` (a Keras dataset name, an .npz path or an IDX directory) and validates it."""
    if spec in KERAS_DATASETS:
        arrays = _load_keras(spec)
        name, source = spec, KERAS_DATASET_URLS[spec]
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            arrays = {key: _read_idx(path / filename, key) for key, filename in IDX_FILES.items()}
        elif path.is_file():
            arrays = _read_npz(path)
        else:
            raise DataError(spec, f"no such file or directory; allowed: {ALLOWED_SOURCES}")
        name, source = path.resolve().name, str(path.resolve())
    return _prepare(name, source, arrays)


def split_validation(
    x: np.ndarray, y: np.ndarray, validation_split: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Holds out the last `validation_split` of (x, y), exactly as Keras' `validation_split` does."""
    split_at = int(math.floor(len(x) * (1.0 - validation_split)))
    if split_at == 0 or split_at == len(x):
        raise ParameterError(
            "validation_split",
            validation_split,
            f"a fraction that leaves both parts non-empty for {len(x)} training examples",
        )
    return x[:split_at], y[:split_at], x[split_at:], y[split_at:]


def _load_keras(name: str) -> dict[str, np.ndarray]:
    import keras

    loader = getattr(keras.datasets, name)
    try:
        (x_train, y_train), (x_test, y_test) = loader.load_data()
    except Exception as error:  # noqa: BLE001 - Keras raises bare Exceptions for failed downloads
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            name,
            f"download failed ({reason[:160]}); with no network, pass a local copy: "
            "dataset=PATH (an .npz or a directory of IDX .gz files)",
        ) from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise DataError(str(path), "is not an .npz (zip) file; " f"allowed: {ALLOWED_SOURCES}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in NPZ_KEYS if key not in npz.files]
            if missing:
                raise DataError(
                    str(path),
                    f"is missing arrays {', '.join(missing)}; expected keys "
                    f"{', '.join(NPZ_KEYS)} (found: {', '.join(npz.files) or 'none'})",
                )
            return {key: npz[key] for key in NPZ_KEYS}
    except DataError:
        raise
    except ValueError as error:  # object arrays need pickle; we never unpickle
        raise DataError(str(path), f"holds unreadable arrays ({error})") from None
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise DataError(str(path), f"is corrupt or truncated ({error})") from None


def _read_idx(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(
            str(path.parent),
            f"has no {path.name}; an IDX directory needs {', '.join(IDX_FILES.values())}",
        )
    try:
        raw = gzip.decompress(path.read_bytes())  # one call: zlib releases the GIL throughout
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(str(path), f"is not a valid gzip file, truncated or corrupt ({error})") from None
    is_images = key.startswith("x_")
    magic, dims = (_IDX_IMAGES_MAGIC, 3) if is_images else (_IDX_LABELS_MAGIC, 1)
    header_size = 4 + 4 * dims
    if len(raw) < header_size or struct.unpack(">I", raw[:4])[0] != magic:
        kind = "images (magic 2051)" if is_images else "labels (magic 2049)"
        raise DataError(str(path), f"is not an IDX file of uint8 {kind}")
    shape = struct.unpack(f">{dims}I", raw[4:header_size])
    expected = int(np.prod(shape))
    if len(raw) - header_size != expected:
        raise DataError(
            str(path),
            f"holds {len(raw) - header_size} data bytes but its header {shape} says {expected}",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _prepare(name: str, source: str, arrays: dict[str, np.ndarray]) -> ImageDataset:
    digest = hashlib.sha256()
    prepared: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check_images(source, f"x_{split}", images)
        _check_labels(source, f"y_{split}", labels)
        if len(images) != len(labels):
            raise DataError(
                source, f"x_{split} has {len(images)} images but y_{split} has {len(labels)} labels"
            )
        for array in (images, labels):
            digest.update(str((array.dtype.str, array.shape)).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        prepared[f"x_{split}"] = _normalize_images(images)
        prepared[f"y_{split}"] = np.eye(NUM_CLASSES, dtype=np.float32)[labels.astype(np.int64)]
    logger.info(
        "Dataset %s: %d training and %d test images from %s",
        name, len(prepared["x_train"]), len(prepared["x_test"]), source,
    )
    return ImageDataset(name=name, source=source, digest=digest.hexdigest()[:16], **prepared)


def _check_images(source: str, key: str, images: np.ndarray) -> None:
    shape_ok = (images.ndim == 3 and images.shape[1:] == (IMAGE_SIDE, IMAGE_SIDE)) or (
        images.ndim == 2 and images.shape[1] == NUM_PIXELS
    )
    if not shape_ok:
        raise DataError(source, f"{key} has shape {images.shape}; expected (n, 28, 28) or (n, 784)")
    if len(images) == 0:
        raise DataError(source, f"{key} is empty; expected at least one image")
    if images.dtype.kind not in "uif":
        raise DataError(source, f"{key} has dtype {images.dtype}; expected integers or floats")
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise DataError(source, f"{key} contains NaN or infinite pixels")
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise DataError(source, f"{key} has pixels in [{low}, {high}]; expected 0..255 (or 0..1)")


def _check_labels(source: str, key: str, labels: np.ndarray) -> None:
    if labels.ndim != 1:
        raise DataError(source, f"{key} has shape {labels.shape}; expected (n,) class indices")
    if len(labels) == 0:
        raise DataError(source, f"{key} is empty; expected at least one label")
    integral = labels.dtype.kind in "ui" or (
        labels.dtype.kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all()
    )
    if not integral:
        raise DataError(source, f"{key} has dtype {labels.dtype} with non-integer labels; expected 0..9")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(
            source, f"{key} has labels in [{labels.min()}, {labels.max()}]; expected 0..9"
        )


def _normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8-range pixels -> float32 in [0, 1], flattened to 784 columns."""
    flat = images.reshape(len(images), NUM_PIXELS)
    if flat.dtype.kind == "f" and flat.max() <= 1.0:
        return flat.astype(np.float32, copy=False)
    normalized = flat.astype(np.float32)
    normalized /= np.float32(255.0)
    return normalized

