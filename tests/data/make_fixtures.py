"""Cuts the committed test fixtures from the real data in ../shared/data (run once, by hand).

    python tests/data/make_fixtures.py ../shared/data

- mnist-small.npz: the first 1,500 training and 300 test digits of mnist-10k.npz, Keras layout.
- fashion-small/: the first 500 training and 100 test Fashion-MNIST articles, as the four IDX .gz files.
"""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    dims = 3 if struct.unpack(">I", raw[:4])[0] == 2051 else 1
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def main(shared_data: Path) -> None:
    with np.load(shared_data / "mnist-10k.npz", allow_pickle=False) as npz:
        np.savez_compressed(
            HERE / "mnist-small.npz",
            x_train=npz["x_train"][:1500],
            y_train=npz["y_train"][:1500],
            x_test=npz["x_test"][:300],
            y_test=npz["y_test"][:300],
        )
    out = HERE / "fashion-small"
    out.mkdir(exist_ok=True)
    for prefix, count in (("train", 500), ("t10k", 100)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte.gz"
            write_idx(out / name, read_idx(shared_data / "fashion-mnist" / name)[:count])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
