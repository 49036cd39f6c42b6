"""Loading real data (the committed fixtures) and refusing every kind of broken file in one line."""

from __future__ import annotations

import gzip
import logging
import math
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import DataError, ParameterError
from pipeline.training.data import IDX_FILES, load_dataset, split_validation
from tests.helpers import FASHION_SMALL, MNIST_SMALL


def _real_arrays() -> dict[str, np.ndarray]:
    with np.load(MNIST_SMALL, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


def test_npz_in_keras_layout_loads_as_float_images_and_one_hot_labels():
    dataset = load_dataset(str(MNIST_SMALL))
    raw = _real_arrays()
    assert dataset.x_train.shape == (1500, 784) and dataset.x_train.dtype == np.float32
    assert dataset.x_test.shape == (300, 784)
    assert dataset.x_train.min() >= 0.0 and dataset.x_train.max() <= 1.0
    np.testing.assert_allclose(dataset.x_train[0], raw["x_train"][0].reshape(784) / 255.0, rtol=1e-6)
    assert dataset.y_train.shape == (1500, 10)
    np.testing.assert_array_equal(dataset.y_train.argmax(axis=1), raw["y_train"])
    assert dataset.y_train.sum(axis=1).tolist() == [1.0] * 1500
    assert dataset.name == "mnist-small.npz" and dataset.source == str(MNIST_SMALL)


def test_directory_of_idx_files_loads():
    dataset = load_dataset(str(FASHION_SMALL))
    assert dataset.x_train.shape == (500, 784) and dataset.x_test.shape == (100, 784)
    assert dataset.y_test.shape == (100, 10)
    assert dataset.x_train.max() <= 1.0 and dataset.x_train.max() > 0.9


def test_digest_identifies_the_data(tmp_path):
    first, again = load_dataset(str(MNIST_SMALL)), load_dataset(str(MNIST_SMALL))
    other = load_dataset(str(FASHION_SMALL))
    assert first.digest == again.digest != other.digest
    arrays = _real_arrays()
    arrays["y_train"] = arrays["y_train"].copy()
    arrays["y_train"][-1] = (arrays["y_train"][-1] + 1) % 10  # one label changed
    np.savez(tmp_path / "changed.npz", **arrays)
    assert load_dataset(str(tmp_path / "changed.npz")).digest != first.digest


def test_flat_and_float_images_are_accepted(tmp_path):
    arrays = _real_arrays()
    arrays["x_train"] = arrays["x_train"].reshape(-1, 784).astype(np.float64) / 255.0
    np.savez(tmp_path / "flat.npz", **arrays)
    reference = load_dataset(str(MNIST_SMALL))
    np.testing.assert_allclose(load_dataset(str(tmp_path / "flat.npz")).x_train, reference.x_train, atol=1e-6)


def test_validation_split_holds_out_the_end_like_keras():
    x, y = np.arange(10).reshape(10, 1), np.arange(10)
    x_train, y_train, x_val, y_val = split_validation(x, y, 0.2)
    assert x_train[:, 0].tolist() == list(range(8)) and x_val[:, 0].tolist() == [8, 9]
    assert y_val.tolist() == [8, 9]
    with pytest.raises(ParameterError, match="validation_split"):
        split_validation(x[:1], y[:1], 0.5)


def _npz(tmp_path: Path, **changes) -> Path:
    arrays = _real_arrays()
    arrays.update(changes)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    path = tmp_path / "broken.npz"
    np.savez(path, **arrays)
    return path


def _assert_one_line(error: DataError, *fragments: str) -> None:
    message = str(error)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_path(tmp_path):
    with pytest.raises(DataError) as raised:
        load_dataset(str(tmp_path / "nowhere.npz"))
    _assert_one_line(raised.value, "nowhere.npz", "no such file", "mnist")


def test_not_a_zip(tmp_path):
    path = tmp_path / "digits.npz"
    path.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError) as raised:
        load_dataset(str(path))
    _assert_one_line(raised.value, str(path), "not an .npz")


def test_truncated_npz(tmp_path):
    path = tmp_path / "cut.npz"
    path.write_bytes(MNIST_SMALL.read_bytes()[: MNIST_SMALL.stat().st_size // 2])
    with pytest.raises(DataError) as raised:
        load_dataset(str(path))
    _assert_one_line(raised.value, str(path))


def test_missing_keys(tmp_path):
    with pytest.raises(DataError) as raised:
        load_dataset(str(_npz(tmp_path, y_test=None)))
    _assert_one_line(raised.value, "missing arrays y_test", "x_train, y_train, x_test, y_test")


def test_object_arrays_are_never_unpickled(tmp_path):
    arrays = _real_arrays()
    arrays["y_train"] = np.array([{"label": 1}] * 1500, dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)  # numpy pickles object arrays
    with pytest.raises(DataError) as raised:
        load_dataset(str(path))
    _assert_one_line(raised.value, str(path), "unreadable")


def _one_pixel(dtype: type, value: float, images: int = 1500) -> np.ndarray:
    """Valid images (0 and 255 pixels) of `dtype` with one pixel set to `value`."""
    array = np.zeros((images, 28, 28), dtype)
    array[0, 0, 1] = 255
    array[-1, 27, 27] = value
    return array


def test_pixels_and_labels_at_their_bounds_are_accepted(tmp_path):
    """0 and 255 are pixels, 0 and 9 labels: the bounds are inclusive (a `<=` for a `<` fails here)."""
    labels = np.arange(1500) % 10
    dataset = load_dataset(str(_npz(tmp_path, x_train=_one_pixel(np.int16, 0), y_train=labels)))
    assert dataset.x_train.min() == 0.0 and dataset.x_train.max() == 1.0
    assert dataset.y_train.argmax(axis=1).tolist() == labels.tolist()


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"x_train": np.zeros((10, 32, 32), np.uint8), "y_train": np.zeros(10, np.uint8)},
         ("x_train has shape (10, 32, 32)", "(n, 28, 28) or (n, 784)")),
        ({"x_test": np.zeros((300, 783), np.uint8)}, ("x_test has shape (300, 783)",)),
        ({"x_train": np.full((1500, 28, 28), "a")}, ("x_train has dtype <U1",)),
        ({"y_train": np.full(1500, 10, np.int64)}, ("y_train has labels in [10, 10]", "0..9")),
        ({"y_test": -np.ones(300, np.int16)}, ("y_test has labels in [-1, -1]",)),
        ({"y_train": np.full(1500, 0.5)}, ("y_train", "non-integer labels")),
        ({"y_train": np.zeros((1500, 10), np.uint8)}, ("y_train has shape (1500, 10)",)),
        ({"y_train": np.zeros(1499, np.uint8)}, ("x_train has 1500 images but y_train has 1499 labels",)),
        ({"x_test": np.zeros((0, 28, 28), np.uint8), "y_test": np.zeros(0, np.uint8)}, ("x_test is empty",)),
        ({"x_train": np.full((1500, 28, 28), np.nan, np.float32)}, ("x_train contains NaN or infinite",)),
        ({"x_train": np.full((1500, 784), np.inf)}, ("x_train contains NaN or infinite",)),
        ({"x_train": np.full((1500, 784), 300.0)}, ("x_train has pixels in [300.0, 300.0]",)),
        # one pixel just outside 0..255 among valid ones: each bound on its own
        ({"x_train": _one_pixel(np.int16, -1)}, ("x_train has pixels in [-1, 255]", "expected 0..255")),
        ({"x_test": _one_pixel(np.float32, -0.5, 300)}, ("x_test has pixels in [-0.5, 255.0]",)),
        ({"x_train": _one_pixel(np.int16, 256)}, ("x_train has pixels in [0, 256]",)),
        ({"x_train": _one_pixel(np.float64, math.nan)}, ("x_train contains NaN or infinite",)),
        ({"x_test": _one_pixel(np.float32, -math.inf, 300)}, ("x_test contains NaN or infinite",)),
    ],
)
def test_invalid_arrays(tmp_path, changes, fragments):
    path = _npz(tmp_path, **changes)
    with pytest.raises(DataError) as raised:
        load_dataset(str(path))
    _assert_one_line(raised.value, str(path), *fragments)


def _idx_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "idx"
    shutil.copytree(FASHION_SMALL, directory)
    return directory


def test_idx_directory_missing_a_file(tmp_path):
    directory = _idx_copy(tmp_path)
    (directory / IDX_FILES["y_test"]).unlink()
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, str(directory), "t10k-labels-idx1-ubyte.gz")


def test_truncated_gz(tmp_path):
    directory = _idx_copy(tmp_path)
    path = directory / IDX_FILES["x_train"]
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, str(path), "gzip", "truncated")


def test_not_gzip(tmp_path):
    directory = _idx_copy(tmp_path)
    (directory / IDX_FILES["y_train"]).write_bytes(b"plain bytes, not gzip")
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, "train-labels-idx1-ubyte.gz", "gzip")


def test_wrong_magic_and_short_payload(tmp_path):
    directory = _idx_copy(tmp_path)
    labels = directory / IDX_FILES["y_train"]
    images = directory / IDX_FILES["x_train"]
    labels.write_bytes(images.read_bytes())  # images where labels belong
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, str(labels), "magic 2049")
    shutil.copy(FASHION_SMALL / IDX_FILES["y_train"], labels)
    with gzip.open(images, "wb") as stream:
        stream.write(struct.pack(">IIII", 2051, 500, 28, 28) + bytes(1000))
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, str(images), "holds 1000 data bytes", "392000")


def test_failed_keras_download_suggests_a_local_path(tmp_path, monkeypatch):
    # An empty Keras cache and a proxy nobody listens on: the download fails here, as offline.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(DataError) as raised:
        load_dataset("mnist")
    _assert_one_line(raised.value, "dataset mnist", "download failed", "dataset=PATH")


# Each refusal in full, where a looser check would let a changed message or bound through.


def test_labels_and_images_are_float32_with_a_16_character_digest_and_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.training.data"):
        dataset = load_dataset(str(MNIST_SMALL))
    assert {array.dtype for array in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test)} == {
        np.dtype(np.float32)
    }
    assert len(dataset.digest) == 16 and int(dataset.digest, 16) >= 0
    assert [record.getMessage() for record in caplog.records] == [
        f"Dataset mnist-small.npz: 1500 training and 300 test images from {MNIST_SMALL}"
    ]


def test_the_digest_covers_the_arrays_shapes_not_only_their_bytes(tmp_path):
    arrays = _real_arrays()
    arrays["x_train"] = arrays["x_train"].reshape(-1, 784)  # the same bytes, flat
    np.savez(tmp_path / "flat.npz", **arrays)
    assert load_dataset(str(tmp_path / "flat.npz")).digest != load_dataset(str(MNIST_SMALL)).digest


def test_float_images_are_scaled_unless_already_in_0_1(tmp_path):
    reference = load_dataset(str(MNIST_SMALL)).x_train
    arrays = _real_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.float64)  # 0..255 as floats
    np.savez(tmp_path / "float255.npz", **arrays)
    np.testing.assert_allclose(load_dataset(str(tmp_path / "float255.npz")).x_train, reference, atol=1e-6)
    arrays["x_train"] = np.minimum(_real_arrays()["x_train"], 2).astype(np.float64)  # 0..2: still 0..255 scale
    np.savez(tmp_path / "float2.npz", **arrays)
    assert load_dataset(str(tmp_path / "float2.npz")).x_train.max() == np.float32(2 / 255)
    arrays["x_train"] = _real_arrays()["x_train"].astype(np.float64) / 255.0  # already 0..1: kept, as float32
    np.savez(tmp_path / "float1.npz", **arrays)
    prepared = load_dataset(str(tmp_path / "float1.npz")).x_train
    assert prepared.dtype == np.float32
    np.testing.assert_allclose(prepared, reference, atol=1e-6)


def test_pixels_from_0_to_255_are_accepted_and_256_is_not(tmp_path):
    arrays = _real_arrays()
    arrays["x_train"] = arrays["x_train"].astype(np.uint16)
    arrays["x_train"][0, 0, 0], arrays["x_train"][1, 0, 0] = 0, 255
    np.savez(tmp_path / "edges.npz", **arrays)
    assert load_dataset(str(tmp_path / "edges.npz")).x_train.max() == 1.0
    arrays["x_train"][1, 0, 0] = 256
    path = tmp_path / "over.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as raised:
        load_dataset(str(path))
    _assert_one_line(raised.value, f"dataset {path}: x_train has pixels in [0, 256]; expected 0..255 (or 0..1)")


def test_float_labels_with_whole_values_are_accepted(tmp_path):
    labels = _real_arrays()["y_train"]
    path = _npz(tmp_path, y_train=labels.astype(np.float32))
    np.testing.assert_array_equal(load_dataset(str(path)).y_train.argmax(axis=1), labels)


def test_empty_labels_beside_images_are_refused_as_empty(tmp_path):
    path = _npz(tmp_path, y_test=np.zeros(0, np.uint8))
    with pytest.raises(DataError) as raised:
        load_dataset(str(path))
    _assert_one_line(raised.value, f"dataset {path}: y_test is empty; expected at least one label")
    arrays = _real_arrays()
    arrays["x_test"], arrays["y_test"] = arrays["x_test"][:1], arrays["y_test"][:1]  # one test example is enough
    np.savez(tmp_path / "one.npz", **arrays)
    assert load_dataset(str(tmp_path / "one.npz")).y_test.shape == (1, 10)


def test_an_npz_error_names_the_file_and_lists_what_is_missing_or_found(tmp_path):
    other = tmp_path / "other.npz"
    np.savez(other, images=np.zeros((2, 784), np.uint8), labels=np.zeros(2, np.uint8))
    with pytest.raises(DataError) as raised:
        load_dataset(str(other))
    _assert_one_line(raised.value, f"dataset {other}: is missing arrays x_train, y_train, x_test, y_test; "
                     "expected keys x_train, y_train, x_test, y_test (found: images, labels)")
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    with pytest.raises(DataError) as raised:
        load_dataset(str(empty))
    _assert_one_line(raised.value, "(found: none)")
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    with pytest.raises(DataError) as raised:
        load_dataset(str(text))
    _assert_one_line(raised.value, f"dataset {text}: is not an .npz (zip) file; allowed: 'mnist', ")


def test_a_corrupt_member_of_a_valid_zip_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "corrupt.npz"
    data = bytearray(MNIST_SMALL.read_bytes())
    middle = len(data) // 3  # inside x_train's pixels: the zip's directory still reads, the CRC does not match
    data[middle:middle + 64] = bytes(255 - byte for byte in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as raised:
        load_dataset(str(path))
    _assert_one_line(raised.value, f"dataset {path}: is corrupt or truncated (")


def test_idx_errors_list_the_four_files_and_say_which_kind_of_file_was_expected(tmp_path):
    directory = _idx_copy(tmp_path)
    (directory / IDX_FILES["y_test"]).unlink()
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, "has no t10k-labels-idx1-ubyte.gz; an IDX directory needs "
                     "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                     "t10k-labels-idx1-ubyte.gz")
    directory = _idx_copy(tmp_path / "again")
    images = directory / IDX_FILES["x_train"]
    images.write_bytes((directory / IDX_FILES["y_train"]).read_bytes())  # labels where images belong
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, f"dataset {images}: is not an IDX file of uint8 images (magic 2051)")
    shutil.copy(FASHION_SMALL / IDX_FILES["x_train"], images)
    labels = directory / IDX_FILES["y_test"]
    labels.write_bytes(images.read_bytes())  # images where labels belong
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, f"dataset {labels}: is not an IDX file of uint8 labels (magic 2049)")


def test_an_idx_file_of_only_a_header_is_read_as_empty(tmp_path):
    directory = _idx_copy(tmp_path)
    labels = directory / IDX_FILES["y_test"]
    labels.write_bytes(gzip.compress(struct.pack(">II", 2049, 0)))  # a header for no label
    with pytest.raises(DataError) as raised:
        load_dataset(str(directory))
    _assert_one_line(raised.value, f"dataset {directory.resolve()}: y_test is empty; expected at least one label")


def test_a_split_that_leaves_a_part_empty_names_the_parameter_its_value_and_the_size():
    with pytest.raises(ParameterError) as raised:
        split_validation(np.zeros((3, 1)), np.zeros(3), 0.9)
    assert (raised.value.name, raised.value.value, raised.value.allowed) == (
        "validation_split", 0.9, "a fraction that leaves both parts non-empty for 3 training examples"
    )
