"""Datasets as uint8 tensors, deterministic epoch orders and batched on-device augmentation.

A dataset is loaded once into CPU uint8 tensors (N x C x H x W) with int64 labels. Training
augments whole batches on the model's device (random crop with zero padding, horizontal flip,
normalisation) with per-sample random parameters and no per-image Python. Every random draw is
a pure function of integers: the sample order of epoch e is a function of (seed, e) and an
augmentation of its `seed` argument, so K students in K processes see identical batches
without communicating. This module imports no Ray.

Datasets (`load_dataset(name, data_dir)`):

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, 1 channel, 10 classes), values
  0..16 scaled to 0..255. A fixed stratified split, independent of the run's seed: 20 % of each
  class (rounded) is the test set, giving 1,438 train and 359 test images. Needs no files.
* ``cifar10`` / ``cifar100``: torchvision's on-disk format under ``data_dir`` (default
  ``./data``): ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``, or
  ``cifar-100-python/train`` and ``test`` (``data_dir`` may also be that folder itself). The
  files are read by a small reader here (no checksum test, so trimmed files work; the pickles
  are read with an unpickler that only admits numpy arrays). When the files are missing and
  ``download`` is true, torchvision downloads them first; offline, that fails with a
  ``DataError`` naming ``--data-dir``.
* ``fashion-mnist`` / ``mnist``: the four idx files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
  optionally ``.gz``) in torchvision's layout (``data_dir/FashionMNIST/raw/``,
  ``data_dir/MNIST/raw/``) or directly in ``data_dir``; downloaded by torchvision where a
  network exists. Fashion-MNIST defaults to ``/usr/share/datasets/fashion-mnist`` when the
  Debian package ``dataset-fashion-mnist`` is installed. 28x28, 1 channel, 10 classes.
* ``parquet``: ``data_dir`` is a ``.parquet`` file or a directory. Schema:

  - ``label``: integer class, 0 <= label < num_classes, no nulls.
  - ``image``: one of
      * encoded image bytes (PNG, JPEG, ...; ``binary``/``large_binary``, or a struct with a
        ``bytes`` field as Hugging Face datasets write), decoded at load time with
        ``torchvision.io.decode_image``; all images must share one height and width (alpha is
        dropped, and mixed grey and colour images all become RGB);
      * raw pixels as ``list<uint8>`` / ``large_list<uint8>`` / ``fixed_size_list<uint8>`` of
        H*W*C values in HWC order, with integer columns ``height``, ``width`` and
        ``channels`` (``channels`` may be left out for 1) that are equal on every row;
      * pyarrow's ``fixed_shape_tensor`` extension type of uint8 with shape (H, W, C) or (H, W).
  - the split: a string column ``split`` with values ``"train"`` / ``"test"``, or, in a
    directory, files named ``train*.parquet`` and ``test*.parquet`` (several of each are
    concatenated in name order). A directory without such files is read whole and needs the
    ``split`` column.
  - ``num_classes``: the schema metadata key ``b"num_classes"`` if present, else the largest
    label + 1.
* ``synthetic``: random uint8 images and labels from a fixed generator (throughput tests only).

Bad input raises `DataError`, a one-line `UsageError` naming the flag to fix (``--dataset``,
``--data-dir``, ``--val-fraction``, ``--batch-size``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import operator
import os
import pickle
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import UsageError

DATASETS = ("cifar10", "cifar100", "digits", "fashion-mnist", "mnist", "parquet", "synthetic")

# Seed domains of derive_seed (the students use 101 and 202), so no two draws share a seed.
_ORDER_STREAM, _VAL_STREAM, _SYNTHETIC_STREAM = 303, 404, 505
_DIGITS_TEST_FRACTION = 0.2
_DOWNLOAD_SOCKET_TIMEOUT = 20.0  # seconds without progress before a CIFAR download gives up
_DEFAULT_CIFAR_DIR = "data"
_SEED_MASK = (1 << 63) - 1


class DataError(UsageError):
    """Bad dataset input; the message is one line that names the flag (e.g. --data-dir, --dataset).

    A ValueError (through UsageError), so the CLI reports it as `error: <flag>: <message>`.
    """

    def __init__(self, flag: str, message: str | None = None):
        if message is None:   # DataError("--flag: message") also works
            flag, _, message = flag.partition(": ") if flag.startswith("--") else ("", "", flag)
        super().__init__(flag, " ".join(str(message).split()))


@dataclass
class Dataset:
    name: str
    train_images: torch.Tensor   # uint8, N x C x H x W, contiguous, CPU
    train_labels: torch.Tensor   # int64, N
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]      # per channel, of train_images / 255
    std: tuple[float, ...]
    crop_padding: int            # default augmentation padding (about image size / 8)
    flip: bool = True            # random horizontal flips (off where a mirror changes the class)
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_images.shape[2]), int(self.train_images.shape[3])

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])


# ---- seeds and sample order -------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a deterministic function of the integers `parts` (any process,
    any platform, any Python hash seed)."""
    text = ",".join(str(operator.index(p)) for p in parts).encode("ascii")
    digest = hashlib.blake2b(b"cohort.seed:" + text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(operator.index(seed) & _SEED_MASK)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of epoch `epoch`: a CPU int64 permutation of range(num_samples) that
    depends only on (num_samples, seed, epoch)."""
    num_samples = operator.index(num_samples)
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0 (got {num_samples})")
    return torch.randperm(num_samples, generator=_generator(derive_seed(seed, _ORDER_STREAM, epoch)),
                          dtype=torch.int64)


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of epoch `epoch`: consecutive slices of `epoch_order`, full batches only
    (the last num_samples % batch_size samples of the order are dropped; BatchNorm needs > 1)."""
    if batch_size < 1 or batch_size > num_samples:
        raise DataError("--batch-size", f"must be between 1 and the training set size "
                                        f"{num_samples} (got {batch_size})")
    order = epoch_order(num_samples, seed, epoch)
    full = num_samples // batch_size
    return list(order[:full * batch_size].view(full, batch_size).unbind(0))


# ---- augmentation -----------------------------------------------------------------------------
def _channel_tensor(values, channels: int, device, what: str) -> torch.Tensor:
    t = torch.as_tensor(tuple(float(v) for v in values), dtype=torch.float32)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{what} has {t.numel()} values for {channels} channels")
    return t.to(device).view(1, channels, 1, 1)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
               if isinstance(images, torch.Tensor) else type(images).__name__)
        raise ValueError(f"images must be a uint8 B x C x H x W tensor (got {got})")


def normalize_batch(images: torch.Tensor, *, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float32 (images / 255 - mean) / std per channel, on the images' device (eval path)."""
    _check_images(images)
    channels = images.shape[1]
    m = _channel_tensor(mean, channels, images.device, "mean")
    s = _channel_tensor(std, channels, images.device, "std")
    return images.to(torch.float32).div_(255.0).sub_(m).div_(s)


def augment_batch(images: torch.Tensor, *, seed: int, padding: int, flip: bool = True,
                  mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-sample random crop and horizontal flip of a uint8 batch, then normalisation.

    Sample b is cropped from the image padded with `padding` zero pixels on each side at offset
    (dy, dx), each uniform in [0, 2 * padding] (padding=0: no crop), then mirrored with
    probability 1/2 when `flip`. The parameters are drawn on a CPU generator seeded with `seed`
    (dy for all samples, then dx, then the flips), so the result is a pure function of `seed`
    and the images, the same on every device. The crop and flip are one batched gather.
    Returns float32 B x C x H x W on the images' device.
    """
    _check_images(images)
    padding = operator.index(padding)
    if padding < 0:
        raise ValueError(f"padding must be >= 0 (got {padding})")
    batch, channels, height, width = images.shape
    if batch == 0 or (padding == 0 and not flip):
        return normalize_batch(images, mean=mean, std=std)
    gen = _generator(seed)
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=gen, dtype=torch.int64)
    else:
        offsets = torch.zeros(2, batch, dtype=torch.int64)
    flips = (torch.randint(0, 2, (batch,), generator=gen, dtype=torch.int64) if flip
             else torch.zeros(batch, dtype=torch.int64))
    params = torch.cat([offsets, flips.view(1, batch)]).to(images.device, non_blocking=True)
    dy, dx, mirrored = params[0:1].T, params[1:2].T, params[2:3].T   # B x 1 each

    device = images.device
    ys = torch.arange(height, device=device).view(1, height)
    xs = torch.arange(width, device=device).view(1, width)
    xs = torch.where(mirrored.bool(), width - 1 - xs, xs)            # B x W output -> crop column
    rows = dy - padding + ys                                          # B x H source rows
    cols = dx - padding + xs                                          # B x W source columns
    inside = (((rows >= 0) & (rows < height)).unsqueeze(2)
              & ((cols >= 0) & (cols < width)).unsqueeze(1))         # B x H x W
    source = rows.clamp(0, height - 1).unsqueeze(2) * width + cols.clamp(0, width - 1).unsqueeze(1)
    flat = images.reshape(batch, channels, height * width)
    index = source.view(batch, 1, height * width).expand(batch, channels, height * width)
    views = flat.gather(2, index).view(batch, channels, height, width)
    views = views * inside.unsqueeze(1).to(torch.uint8)               # the zero padding
    return normalize_batch(views, mean=mean, std=std)


# ---- building Datasets ------------------------------------------------------------------------
def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of images / 255, from value histograms."""
    if images.shape[0] == 0:
        raise ValueError("no training images")
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean) / 255.0)
        stds.append(max(math.sqrt(float(var)) / 255.0, 1e-6))   # a constant channel stays finite
    return tuple(means), tuple(stds)


def _default_padding(height: int, width: int) -> int:
    return max(1, round(min(height, width) / 8))


# A mirrored handwritten digit is often another class or none (2, 3, 4, 5, 7, 9): no flips.
_MIRROR_SENSITIVE = frozenset({"digits", "mnist"})


def _make_dataset(name, train_images, train_labels, test_images, test_labels, num_classes) -> Dataset:
    train_images = train_images.contiguous()
    mean, std = _channel_stats(train_images)
    return Dataset(name=name, train_images=train_images,
                   train_labels=train_labels.to(torch.int64).contiguous(),
                   test_images=test_images.contiguous(),
                   test_labels=test_labels.to(torch.int64).contiguous(),
                   num_classes=int(num_classes), mean=mean, std=std,
                   crop_padding=_default_padding(*train_images.shape[2:]),
                   flip=name not in _MIRROR_SENSITIVE)


def validation_split(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """A copy of `dataset` with round(fraction * num_train) training images moved to
    val_images / val_labels: the same fraction of every class (largest remainders settle the
    rounding), the images of each class chosen at random by (seed). Both parts keep their
    original order; mean and std are recomputed from the remaining training images.
    fraction == 0 returns `dataset` unchanged."""
    if not 0 <= fraction < 1:
        raise DataError("--val-fraction", f"must be in [0, 1) (got {fraction})")
    if fraction == 0:
        return dataset
    if dataset.val_images is not None:
        raise DataError("--val-fraction", f"dataset {dataset.name!r} already has a validation split")
    n = dataset.num_train
    k = math.floor(fraction * n + 0.5)
    if k < 1 or k >= n:
        raise DataError("--val-fraction", f"{fraction} of {n} training images leaves an empty "
                                          f"{'validation' if k < 1 else 'training'} set")
    labels = dataset.train_labels
    counts = torch.bincount(labels, minlength=dataset.num_classes).to(torch.float64)
    exact = counts * fraction
    quota = exact.floor()
    remainder = k - int(quota.sum())
    if remainder > 0:   # largest fractional parts first, ties by class index
        order = torch.sort(-(exact - quota), stable=True).indices
        quota[order[:remainder]] += 1
    quota = quota.to(torch.int64)

    perm = torch.randperm(n, generator=_generator(derive_seed(seed, _VAL_STREAM)))
    grouped_labels, order = torch.sort(labels[perm], stable=True)
    grouped = perm[order]                       # by class, random within a class
    starts = torch.cumsum(counts.to(torch.int64), 0) - counts.to(torch.int64)
    rank = torch.arange(n) - starts[grouped_labels]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[grouped[rank < quota[grouped_labels]]] = True

    train_images = dataset.train_images[~chosen].contiguous()
    mean, std = _channel_stats(train_images)
    return dataclasses.replace(
        dataset, train_images=train_images, train_labels=labels[~chosen].contiguous(),
        val_images=dataset.train_images[chosen].contiguous(),
        val_labels=labels[chosen].contiguous(), mean=mean, std=std)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, val_fraction: float = 0.0,
                 seed: int = 0, download: bool = True,
                 synthetic_samples: tuple[int, int] = (4096, 1024),
                 synthetic_shape: tuple[int, int, int] = (3, 32, 32),
                 synthetic_classes: int = 10) -> Dataset:
    """Load dataset `name` (one of DATASETS) into CPU uint8 tensors; with val_fraction > 0,
    move that fraction of the training set into a validation split (see validation_split)."""
    if name not in DATASETS:
        raise DataError("--dataset", f"{name!r} is not one of: {', '.join(DATASETS)}")
    if name == "digits":
        dataset = _load_digits()
    elif name == "synthetic":
        dataset = _load_synthetic(synthetic_samples, synthetic_shape, synthetic_classes)
    elif name == "parquet":
        dataset = _load_parquet(data_dir)
    elif name in _IDX:
        dataset = _load_idx(name, data_dir, download)
    else:
        dataset = _load_cifar(name, data_dir, download)
    return validation_split(dataset, val_fraction, seed) if val_fraction else dataset


def _existing_dir(data_dir) -> Path:
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise DataError("--data-dir", f"{path} does not exist")
    if not os.access(path, os.R_OK):
        raise DataError("--data-dir", f"{path} is not readable")
    return path


# ---- digits -----------------------------------------------------------------------------------
def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    test = _fixed_stratified_test_mask(labels, _DIGITS_TEST_FRACTION, b"digits")
    return _make_dataset("digits", images[~test], labels[~test], images[test], labels[test], 10)


def _fixed_stratified_test_mask(labels: torch.Tensor, fraction: float, tag: bytes) -> torch.Tensor:
    """round(fraction * count) samples of every class, chosen by a hash of (tag, index): the
    same forever, whatever the library versions or the run's seed."""
    keys = [int.from_bytes(hashlib.blake2b(tag + b":%d" % i, digest_size=8).digest(), "little")
            for i in range(len(labels))]
    test = torch.zeros(len(labels), dtype=torch.bool)
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten().tolist()
        members.sort(key=lambda i: keys[i])
        take = math.floor(fraction * len(members) + 0.5)
        test[members[:take]] = True
    return test


# ---- synthetic --------------------------------------------------------------------------------
def _load_synthetic(samples, shape, classes) -> Dataset:
    samples, shape = tuple(int(s) for s in samples), tuple(int(s) for s in shape)
    if len(samples) != 2 or min(samples) < 1 or len(shape) != 3 or min(shape) < 1 or classes < 1:
        raise DataError("--dataset", f"synthetic data needs 2 positive sample counts, a positive "
                                     f"C x H x W shape and >= 1 class (got {samples}, {shape}, {classes})")
    gen = _generator(derive_seed(_SYNTHETIC_STREAM))
    parts = []
    for count in samples:
        images = torch.randint(0, 256, (count, *shape), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, classes, (count,), generator=gen, dtype=torch.int64)
        parts += [images, labels]
    return _make_dataset("synthetic", *parts, classes)


# ---- CIFAR ------------------------------------------------------------------------------------
_CIFAR = {
    # name: (folder, train files, test files, label key, classes, torchvision class, title)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", 10, "CIFAR10", "CIFAR-10"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100, "CIFAR100", "CIFAR-100"),
}

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers only: a data file cannot run code."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _read_cifar_file(path: Path, label_key: bytes, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as handle:
            entry = _ArrayUnpickler(handle, encoding="bytes").load()
        data = np.asarray(entry[b"data"])
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
            AttributeError, IndexError) as exc:
        raise DataError("--data-dir", f"{path} is not a CIFAR batch file ({type(exc).__name__}: {exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
            or labels.shape != (data.shape[0],):
        raise DataError("--data-dir", f"{path}: expected uint8 data of N x 3072 and N labels "
                                      f"(got {data.dtype} {data.shape} and {labels.shape[0]} labels)")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError("--data-dir", f"{path}: labels must be in [0, {classes - 1}]")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels)


def _cifar_folder(root: Path, folder: str, files: list[str]) -> Path | None:
    for candidate in (root / folder, root):
        if all((candidate / f).is_file() for f in files):
            return candidate
    return None


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_cifar(name: str, root: Path) -> None:
    """torchvision's download (verifies its checksums). Offline it fails at once where names
    do not resolve, and a silent network gives up after 20 s without socket progress."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _CIFAR[name][5])
    with _socket_timeout(_DOWNLOAD_SOCKET_TIMEOUT), contextlib.redirect_stdout(io.StringIO()):
        cls(str(root), train=True, download=True)


def _load_cifar(name: str, data_dir, download: bool) -> Dataset:
    folder, train_files, test_files, label_key, classes, _, title = _CIFAR[name]
    files = train_files + test_files
    created = False
    if data_dir is None:
        root = Path(_DEFAULT_CIFAR_DIR)
        if not root.exists() and download:
            root.mkdir(parents=True, exist_ok=True)
            created = True
        elif not root.exists():
            raise DataError("--data-dir", f"{title} needs --data-dir, a directory holding {folder}/ "
                                          f"(or use --dataset digits, which needs no files)")
    else:
        root = _existing_dir(data_dir)
        if not root.is_dir():
            raise DataError("--data-dir", f"{root} is not a directory (expected one holding {folder}/)")
    where = _cifar_folder(root, folder, files)
    if where is None and download:
        try:
            _download_cifar(name, root)
        except Exception as exc:   # URLError, timeouts, checksum failures: all one message
            if created and root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise DataError("--data-dir", f"{title} is not under {root} and could not be downloaded "
                                          f"({reason}); put {folder}/ there, or use --dataset digits "
                                          f"for an offline run") from None
        where = _cifar_folder(root, folder, files)
    if where is None:
        missing = [f for f in files if not (root / folder / f).is_file()]
        raise DataError("--data-dir", f"{title} files missing under {root / folder} "
                                      f"({', '.join(missing)}); download them there, or use "
                                      f"--dataset digits for an offline run")
    train = [_read_cifar_file(where / f, label_key, classes) for f in train_files]
    test = [_read_cifar_file(where / f, label_key, classes) for f in test_files]
    return _make_dataset(name, torch.cat([i for i, _ in train]), torch.cat([l for _, l in train]),
                         torch.cat([i for i, _ in test]), torch.cat([l for _, l in test]), classes)


# ---- MNIST and Fashion-MNIST (idx files) ---------------------------------------------------------
# name -> (torchvision's folder, torchvision class, the Debian package's folder or None, title)
_IDX = {"fashion-mnist": ("FashionMNIST", "FashionMNIST", "/usr/share/datasets/fashion-mnist",
                          "Fashion-MNIST"),
        "mnist": ("MNIST", "MNIST", None, "MNIST")}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder(root: Path, folder: str) -> Path | None:
    """Where the four idx files are: torchvision's ROOT/FOLDER/raw, ROOT/FOLDER, or ROOT."""
    for candidate in (root / folder / "raw", root / folder, root):
        if all(_idx_file(candidate, stem) for stem in _IDX_FILES):
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzipped) as a uint8 array: a big-endian
    header (0, 0, type 0x08 = uint8, number of dimensions), the dimensions as int32, the data."""
    import gzip
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError("--data-dir", f"{path} cannot be read ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError("--data-dir", f"{path} is not an idx file of uint8 (bad header)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    body = 4 + 4 * ndim
    if len(data) - body != int(np.prod(dims)):
        raise DataError("--data-dir", f"{path}: {len(data) - body} bytes of data for dimensions "
                                      f"{tuple(dims.tolist())}")
    return np.frombuffer(data, dtype=np.uint8, offset=body).reshape(tuple(dims.tolist()))


def _download_idx(name: str, root: Path) -> None:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _IDX[name][1])
    with _socket_timeout(_DOWNLOAD_SOCKET_TIMEOUT), contextlib.redirect_stdout(io.StringIO()):
        cls(str(root), train=True, download=True)


def _load_idx(name: str, data_dir, download: bool) -> Dataset:
    """MNIST-format files: torchvision's layout under --data-dir (downloaded there where a
    network exists), or a directory holding the four idx files; Fashion-MNIST defaults to
    the Debian package's /usr/share/datasets/fashion-mnist when it is installed."""
    folder, _, packaged, title = _IDX[name]
    if data_dir is None:
        root = Path(packaged) if packaged and Path(packaged).is_dir() else Path(_DEFAULT_CIFAR_DIR)
    else:
        root = _existing_dir(data_dir)
    where = _idx_folder(root, folder) if root.is_dir() else None
    if where is None and download:
        created = not root.exists()
        try:
            root.mkdir(parents=True, exist_ok=True)
            _download_idx(name, root)
        except Exception as exc:   # offline, timeouts, checksums: one message
            if created:   # leave nothing behind (torchvision may have made its folders)
                shutil.rmtree(root, ignore_errors=True)
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise DataError("--data-dir", f"{title} is not under {root} and could not be "
                                          f"downloaded ({reason}); put its four idx files there"
                                          + (" or apt-get install dataset-fashion-mnist"
                                             if packaged else "")) from None
        where = _idx_folder(root, folder)
    if where is None:
        raise DataError("--data-dir", f"{title}'s idx files ({', '.join(_IDX_FILES)}, optionally "
                                      f".gz) are not under {root}")
    arrays = [read_idx(_idx_file(where, stem)) for stem in _IDX_FILES]
    images = [torch.from_numpy(a.copy()).unsqueeze(1) for a in (arrays[0], arrays[2])]
    labels = [torch.from_numpy(a.astype(np.int64)) for a in (arrays[1], arrays[3])]
    for kind, imgs, labs in (("train", images[0], labels[0]), ("test", images[1], labels[1])):
        if imgs.dim() != 4 or len(imgs) != len(labs):
            raise DataError("--data-dir", f"{where}: {kind} images {tuple(imgs.shape)} do not "
                                          f"match {len(labs)} labels")
    return _make_dataset(name, images[0], labels[0], images[1], labels[1],
                         int(max(labels[0].max(), labels[1].max())) + 1 if len(labels[0]) else 10)


# ---- Parquet ----------------------------------------------------------------------------------
def _read_parquet_files(paths: list[Path]):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in paths:
        try:
            tables.append(pq.read_table(path))
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise DataError("--data-dir", f"cannot read {path} as Parquet ({type(exc).__name__}: "
                                          f"{exc})") from None
    if len(tables) == 1:
        return tables[0]
    try:
        return pa.concat_tables(tables, promote_options="default")
    except (pa.ArrowException, ValueError) as exc:
        raise DataError("--data-dir", f"the Parquet files {', '.join(p.name for p in paths)} do "
                                      f"not share a schema ({exc})") from None


def _num_classes_metadata(tables, where) -> int | None:
    for table in tables:
        meta = table.schema.metadata or {}
        if b"num_classes" in meta:
            try:
                value = int(meta[b"num_classes"].decode().strip())
            except ValueError:
                value = 0
            if value < 1:
                raise DataError("--data-dir", f"{where}: schema metadata num_classes="
                                              f"{meta[b'num_classes']!r} is not a positive integer")
            return value
    return None


def _load_parquet(data_dir) -> Dataset:
    if data_dir is None:
        raise DataError("--data-dir", "the parquet dataset needs --data-dir, a .parquet file or "
                                      "a directory of them")
    path = _existing_dir(data_dir)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
        train_files = [p for p in files if p.name.startswith("train")]
        test_files = [p for p in files if p.name.startswith("test")]
        if train_files or test_files:
            if not train_files:
                raise DataError("--data-dir", f"{path} has test*.parquet but no train*.parquet")
            if not test_files:
                raise DataError("--data-dir", f"{path} has train*.parquet but no test split "
                                              f"(add test*.parquet files)")
            tables = [_read_parquet_files(train_files), _read_parquet_files(test_files)]
            for table, files_ in zip(tables, (train_files, test_files)):
                _require_columns(table, files_[0].parent)
            splits = [(_images(tables[0], path), _labels(tables[0], path)),
                      (_images(tables[1], path), _labels(tables[1], path))]
            return _finish_parquet(path, tables, splits)
        if not files:
            raise DataError("--data-dir", f"{path} holds no .parquet files")
        table = _read_parquet_files(files)
    else:
        table = _read_parquet_files([path])
    _require_columns(table, path)
    if "split" not in table.column_names:
        raise DataError("--data-dir", f"{path}: no 'split' column with train/test values (or give "
                                      f"a directory with train*.parquet and test*.parquet)")
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    unknown = sorted({str(s) for s in split} - {"train", "test"})
    if unknown:
        raise DataError("--data-dir", f"{path}: split values must be 'train' or 'test' "
                                      f"(found {', '.join(map(repr, unknown[:5]))})")
    images, labels = _images(table, path), _labels(table, path)
    is_test = torch.from_numpy(split == "test")
    if not bool(is_test.any()):
        raise DataError("--data-dir", f"{path}: no test split (no rows with split == 'test')")
    splits = [(images[~is_test], labels[~is_test]), (images[is_test], labels[is_test])]
    return _finish_parquet(path, [table], splits)


def _finish_parquet(path, tables, splits) -> Dataset:
    (train_images, train_labels), (test_images, test_labels) = splits
    if len(train_labels) == 0:
        raise DataError("--data-dir", f"{path}: the training split is empty")
    if len(test_labels) == 0:
        raise DataError("--data-dir", f"{path}: no test split (it is empty)")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError("--data-dir", f"{path}: train images are {tuple(train_images.shape[1:])} "
                                      f"but test images {tuple(test_images.shape[1:])}")
    num_classes = _num_classes_metadata(tables, path)
    top = int(max(train_labels.max(), test_labels.max()))
    if num_classes is None:
        num_classes = top + 1
    low = int(min(train_labels.min(), test_labels.min()))
    if low < 0 or top >= num_classes:
        raise DataError("--data-dir", f"{path}: labels must be in [0, {num_classes - 1}] "
                                      f"(found {low if low < 0 else top})")
    return _make_dataset("parquet", train_images, train_labels, test_images, test_labels, num_classes)


def _require_columns(table, where) -> None:
    for column in ("image", "label"):
        if column not in table.column_names:
            raise DataError("--data-dir", f"{where}: no {column!r} column (columns: "
                                          f"{', '.join(table.column_names)})")


def _labels(table, where) -> torch.Tensor:
    import pyarrow as pa

    column = table.column("label")
    if not pa.types.is_integer(column.type):
        raise DataError("--data-dir", f"{where}: column 'label' must be integer (got {column.type})")
    if column.null_count:
        raise DataError("--data-dir", f"{where}: column 'label' has {column.null_count} nulls")
    return torch.from_numpy(column.to_numpy().astype(np.int64))


def _images(table, where) -> torch.Tensor:
    """N x C x H x W uint8 from the 'image' column in any of the documented forms."""
    import pyarrow as pa

    column = table.column("image")
    if column.null_count:
        raise DataError("--data-dir", f"{where}: column 'image' has {column.null_count} nulls")
    kind = column.type
    if isinstance(kind, pa.FixedShapeTensorType):
        return _tensor_images(column, where)
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks],
                                  type=kind.field("bytes").type)
        kind = column.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return _decode_images(column.to_pylist(), where)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _array_images(table, column, where)
    raise DataError("--data-dir", f"{where}: column 'image' has type {kind}; expected encoded "
                                  f"image bytes, a list<uint8> with height/width/channels columns "
                                  f"or a fixed_shape_tensor")


def _tensor_images(column, where) -> torch.Tensor:
    import pyarrow as pa

    kind = column.type
    shape = tuple(kind.shape)
    if kind.value_type != pa.uint8() or len(shape) not in (2, 3):
        raise DataError("--data-dir", f"{where}: fixed_shape_tensor images must be uint8 with "
                                      f"shape (H, W, C) or (H, W) (got {kind.value_type} {shape})")
    chunks = [chunk.to_numpy_ndarray() for chunk in column.chunks if len(chunk)]
    array = np.concatenate(chunks) if chunks else np.zeros((0, *shape), np.uint8)
    if array.ndim == 3:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def _shape_column(table, name, where, default=None) -> int:
    if name not in table.column_names:
        if default is not None:
            return default
        raise DataError("--data-dir", f"{where}: raw-pixel images need a {name!r} column")
    values = table.column(name)
    if values.null_count:
        raise DataError("--data-dir", f"{where}: column {name!r} has nulls")
    distinct = np.unique(values.to_numpy())
    if len(distinct) != 1 or distinct[0] < 1:
        raise DataError("--data-dir", f"{where}: all images must share one positive {name} "
                                      f"(found {', '.join(map(str, distinct[:5]))})")
    return int(distinct[0])


def _array_images(table, column, where) -> torch.Tensor:
    import pyarrow as pa
    import pyarrow.compute as pc

    value_type = column.type.value_type
    if not pa.types.is_integer(value_type):
        raise DataError("--data-dir", f"{where}: image pixel lists must hold uint8 (got {value_type})")
    n = len(column)
    height, width = _shape_column(table, "height", where), _shape_column(table, "width", where)
    channels = _shape_column(table, "channels", where, default=1)
    size = height * width * channels
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if n and (lengths != size).any():
        bad = int(np.flatnonzero(lengths != size)[0])
        raise DataError("--data-dir", f"{where}: image row {bad} has {lengths[bad]} values, expected "
                                      f"height*width*channels = {size}")
    values = pc.list_flatten(column).to_numpy()
    if values.size and (values.min() < 0 or values.max() > 255):
        raise DataError("--data-dir", f"{where}: pixel values must be in [0, 255]")
    array = values.astype(np.uint8, copy=False).reshape(n, height, width, channels)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def _decode_images(blobs: list[bytes], where) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    def decode(i, blob, mode):
        try:
            return decode_image(torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy()), mode=mode)
        except (RuntimeError, ValueError) as exc:
            message = " ".join(str(exc).split())[:120]
            raise DataError("--data-dir", f"{where}: image row {i} cannot be decoded ({message})") from None

    if not blobs:
        return torch.zeros((0, 1, 1, 1), dtype=torch.uint8)
    with warnings.catch_warnings():   # torchvision 0.29 deprecates its codecs for TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        images = [decode(i, blob, ImageReadMode.UNCHANGED) for i, blob in enumerate(blobs)]
        sizes = {tuple(im.shape[1:]) for im in images}
        if len(sizes) > 1:
            raise DataError("--data-dir", f"{where}: all images must share one height and width "
                                          f"(found {', '.join(map(str, sorted(sizes)[:4]))})")
        channels = {im.shape[0] for im in images}
        target = 3 if max(channels) >= 3 else 1
        if channels != {target}:   # alpha or mixed grey / colour: convert all to RGB or grey
            mode = ImageReadMode.RGB if target == 3 else ImageReadMode.GRAY
            images = [decode(i, blob, mode) for i, blob in enumerate(blobs)]
    return torch.stack(images).contiguous()
