"""Tests of cohort.data: datasets, deterministic epoch orders and batched augmentation."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cohort import data
from cohort.data import (DATASETS, DataError, Dataset, augment_batch, derive_seed, epoch_batches,
                         epoch_order, load_dataset, normalize_batch, validation_split)

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits")


def coordinate_images(batch: int, channels: int = 3, size: int = 8) -> torch.Tensor:
    """Pixel (c, y, x) holds 1 + y*size + x + 64*c: every value names its place; 0 is padding."""
    c, y, x = torch.meshgrid(torch.arange(channels), torch.arange(size), torch.arange(size),
                             indexing="ij")
    image = (1 + y * size + x + 64 * c).to(torch.uint8)
    return image.expand(batch, channels, size, size).contiguous()


def raw(views: torch.Tensor) -> torch.Tensor:
    """Undo normalisation with mean 0 and std 1: back to uint8 pixel values."""
    return (views * 255).round().to(torch.uint8)


def write_cifar_batch(path: Path, images: np.ndarray, labels, label_key: str = "labels", **extra):
    entry = {b"batch_label": b"test batch", b"data": images.reshape(len(images), -1),
             label_key.encode(): list(labels), b"filenames": [b"x.png"] * len(images)}
    entry.update({k.encode(): v for k, v in extra.items()})
    with open(path, "wb") as handle:
        pickle.dump(entry, handle)


def random_images(n, seed, shape=(3, 32, 32)):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def png_bytes(image: torch.Tensor) -> bytes:
    from torchvision.io import encode_png
    with warnings.catch_warnings():   # torchvision 0.29 deprecates its image codecs
        warnings.simplefilter("ignore", DeprecationWarning)
        return encode_png(image).numpy().tobytes()


def write_parquet(path: Path, columns: dict, metadata: dict | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table(columns)
    if metadata:
        table = table.replace_schema_metadata(metadata)
    pq.write_table(table, path)


# ---- names and errors -------------------------------------------------------------------------
def test_unknown_dataset_names_flag_and_choices():
    with pytest.raises(DataError) as info:
        load_dataset("imagenet")
    message = str(info.value)
    assert "--dataset" in message and all(name in message for name in DATASETS)
    assert "\n" not in message and isinstance(info.value, ValueError)


def test_data_error_message_is_one_line_with_flag():
    error = DataError("--data-dir", "first line\nsecond line")
    assert str(error) == "--data-dir: first line second line" and error.flag == "--data-dir"
    assert str(DataError("--dataset: bad")) == "--dataset: bad"


# ---- digits -----------------------------------------------------------------------------------
def test_digits_shapes_sizes_and_stats(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.train_images.shape == (1438, 1, 8, 8) and digits.test_images.shape == (359, 1, 8, 8)
    assert digits.num_train == 1438 and digits.in_channels == 1 and digits.image_size == (8, 8)
    assert digits.crop_padding == 1 and digits.val_images is None and digits.flip is False
    for images, labels in ((digits.train_images, digits.train_labels),
                           (digits.test_images, digits.test_labels)):
        assert images.dtype == torch.uint8 and images.is_contiguous() and images.device.type == "cpu"
        assert labels.dtype == torch.int64 and len(labels) == len(images)
    assert int(digits.train_images.max()) == 255 and int(digits.train_images.min()) == 0
    # stratified: every class holds 20 % (rounded) of its images in the test set
    test_counts = torch.bincount(digits.test_labels, minlength=10)
    all_counts = test_counts + torch.bincount(digits.train_labels, minlength=10)
    assert torch.equal(test_counts, torch.floor(all_counts * 0.2 + 0.5).long())
    x = digits.train_images.double() / 255
    assert digits.mean == pytest.approx([x.mean().item()], abs=1e-9)
    assert digits.std == pytest.approx([x.std(unbiased=False).item()], abs=1e-9)


def test_digits_split_is_fixed(digits):
    again = load_dataset("digits", seed=12345)
    for name in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(digits, name), getattr(again, name))


# ---- seeds and epoch order --------------------------------------------------------------------
def test_derive_seed_is_deterministic_63_bit_and_order_sensitive():
    values = {derive_seed(a, b) for a in range(20) for b in range(20)}
    assert len(values) == 400 and all(0 <= v < 2 ** 63 for v in values)
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(1) != derive_seed(1, 0) and derive_seed(-1) != derive_seed(1)
    assert derive_seed(np.int64(7), 3) == derive_seed(7, 3)


SCRIPT = ("import json; from cohort.data import epoch_order, epoch_batches, derive_seed; "
          "print(json.dumps([epoch_order(1000, 7, 3).tolist(), "
          "[b.tolist() for b in epoch_batches(100, 32, 7, 3)], derive_seed(7, 3, 2)]))")


def test_epoch_order_is_identical_across_processes():
    """A fresh interpreter (another hash seed) computes the same order as this process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)
    here = [epoch_order(1000, 7, 3).tolist(), [b.tolist() for b in epoch_batches(100, 32, 7, 3)],
            derive_seed(7, 3, 2)]
    assert first == here


def test_epoch_order_is_a_permutation_that_depends_on_seed_and_epoch():
    order = epoch_order(500, 0, 0)
    assert order.dtype == torch.int64 and order.device.type == "cpu"
    assert torch.equal(torch.sort(order).values, torch.arange(500))
    assert torch.equal(order, epoch_order(500, 0, 0))
    others = [epoch_order(500, 0, 1), epoch_order(500, 1, 0), epoch_order(500, 1, 1)]
    assert all(not torch.equal(order, other) for other in others)
    assert not torch.equal(others[0], others[1])


def test_epoch_batches_are_full_and_distinct():
    batches = epoch_batches(103, 10, seed=4, epoch=2)
    assert len(batches) == 10 and all(b.shape == (10,) and b.dtype == torch.int64 for b in batches)
    flat = torch.cat(batches)
    assert len(set(flat.tolist())) == 100 and 0 <= int(flat.min()) and int(flat.max()) < 103
    assert torch.equal(flat, epoch_order(103, 4, 2)[:100])
    assert [b.tolist() for b in epoch_batches(103, 103, 4, 2)] == [epoch_order(103, 4, 2).tolist()]


@pytest.mark.parametrize("batch_size", [0, -1, 104])
def test_epoch_batches_rejects_bad_batch_size(batch_size):
    with pytest.raises(DataError, match="--batch-size"):
        epoch_batches(103, batch_size, 0, 0)


# ---- augmentation -----------------------------------------------------------------------------
ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def test_augmentation_is_per_sample():
    images = coordinate_images(64)
    views = augment_batch(images, seed=3, padding=2, mean=ZERO, std=ONE)
    distinct = {tuple(raw(v).flatten().tolist()) for v in views}
    assert len(distinct) > 10   # identical inputs, different crops / flips


def recover(view: torch.Tensor, size: int = 8):
    """(dy, dx, flipped) of one augmented coordinate image, read from its pixel values."""
    channel0 = view[0].long()
    ys, xs = torch.nonzero(channel0, as_tuple=True)
    assert len(ys) >= 2
    i, j = int(ys[0]), int(xs[0])
    value = int(channel0[i, j]) - 1
    y, x = divmod(value, size)
    row = channel0[i][channel0[i] > 0]
    flipped = len(row) > 1 and int(row[1]) < int(row[0])
    dy = y - i
    dx = (x - (size - 1 - j)) if flipped else (x - j)
    return dy, dx, flipped


@pytest.mark.parametrize("padding", [1, 2, 3])
def test_crop_offsets_in_range_and_content_exact(padding):
    images = coordinate_images(200)
    views = raw(augment_batch(images, seed=11, padding=padding, mean=ZERO, std=ONE))
    padded = F.pad(images, (padding,) * 4)
    seen, flips = set(), 0
    for view in views:
        shift_y, shift_x, flipped = recover(view)
        dy, dx = shift_y + padding, shift_x + padding   # offsets into the padded image
        assert 0 <= dy <= 2 * padding and 0 <= dx <= 2 * padding
        expected = padded[0, :, dy:dy + 8, dx:dx + 8]
        if flipped:
            expected = expected.flip(-1)
        assert torch.equal(view, expected)
        seen.add((dy, dx))
        flips += flipped
    assert seen == {(a, b) for a in range(2 * padding + 1) for b in range(2 * padding + 1)}
    assert 60 < flips < 140


def test_flips_are_exact_mirrors():
    images = torch.randint(0, 256, (40, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = raw(augment_batch(images, seed=5, padding=0, mean=ZERO, std=ONE))
    mirrored = 0
    for image, view in zip(images, views):
        if torch.equal(view, image):
            continue
        assert torch.equal(view, image.flip(-1))
        mirrored += 1
    assert 5 < mirrored < 35


def test_no_flip_and_no_padding_is_plain_normalisation():
    images = coordinate_images(8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    plain = normalize_batch(images, mean=mean, std=std)
    assert torch.equal(augment_batch(images, seed=1, padding=0, flip=False, mean=mean, std=std), plain)
    # crop only: no sample is mirrored
    for view in raw(augment_batch(images, seed=1, padding=2, flip=False, mean=ZERO, std=ONE)):
        assert not recover(view)[2]


def test_same_seed_same_output_and_different_seed_different_output():
    images = coordinate_images(32)
    kw = dict(padding=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    first = augment_batch(images, seed=99, **kw)
    assert torch.equal(first, augment_batch(images, seed=99, **kw))
    assert not torch.equal(first, augment_batch(images, seed=100, **kw))
    assert torch.equal(images, coordinate_images(32))   # input untouched


def test_normalisation_matches_formula():
    images = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    expected = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    out = normalize_batch(images, mean=mean, std=std)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert (out.double() - expected).abs().max().item() < 1e-5
    # padded pixels are zeros before normalisation: -mean / std
    views = augment_batch(torch.full((64, 3, 4, 4), 255, dtype=torch.uint8), seed=0, padding=2,
                          mean=mean, std=std)
    pad_values = {round(v, 4) for v in views[:, 0].flatten().tolist()}
    assert pad_values == {round((1 - mean[0]) / std[0], 4), round(-mean[0] / std[0], 4)}


def test_augment_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(torch.zeros(2, 3, 4, 4), seed=0, padding=1, mean=ZERO, std=ONE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentation_is_identical_on_gpu():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    kw = dict(seed=7, padding=4, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    cpu = augment_batch(images, **kw)
    gpu = augment_batch(images.cuda(), **kw)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() < 1e-6


# ---- CIFAR ------------------------------------------------------------------------------------
def make_cifar10(root: Path):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train, test = random_images(20, 1), random_images(10, 2)
    train_labels, test_labels = [i % 10 for i in range(20)], [(3 * i) % 10 for i in range(10)]
    for k in range(5):
        write_cifar_batch(folder / f"data_batch_{k + 1}", train[4 * k:4 * k + 4], train_labels[4 * k:4 * k + 4])
    write_cifar_batch(folder / "test_batch", test, test_labels)
    return train, train_labels, test, test_labels


def test_cifar10_reader(tmp_path):
    train, train_labels, test, test_labels = make_cifar10(tmp_path)
    for where in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = load_dataset("cifar10", str(where), download=False)
        assert ds.name == "cifar10" and ds.num_classes == 10 and ds.crop_padding == 4
        assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (10, 3, 32, 32)
        assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
        assert np.array_equal(ds.train_images.numpy(), train) and np.array_equal(ds.test_images.numpy(), test)
        assert ds.train_labels.tolist() == train_labels and ds.test_labels.tolist() == test_labels
        assert ds.mean == pytest.approx((train / 255).mean(axis=(0, 2, 3)).tolist(), abs=1e-9)
        assert ds.std == pytest.approx((train / 255).std(axis=(0, 2, 3)).tolist(), abs=1e-9)


def test_cifar100_reader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = random_images(20, 3), random_images(10, 4)
    fine_train, fine_test = [5 * i for i in range(20)], [99 - i for i in range(10)]
    write_cifar_batch(folder / "train", train, fine_train, "fine_labels", coarse_labels=[0] * 20)
    write_cifar_batch(folder / "test", test, fine_test, "fine_labels", coarse_labels=[1] * 10)
    ds = load_dataset("cifar100", tmp_path, download=False, val_fraction=0.25, seed=1)
    assert ds.num_classes == 100 and ds.num_train == 15 and len(ds.val_labels) == 5
    assert ds.test_labels.tolist() == fine_test and np.array_equal(ds.test_images.numpy(), test)
    assert sorted(ds.train_labels.tolist() + ds.val_labels.tolist()) == fine_train


def test_missing_cifar_directory(tmp_path):
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("cifar10", tmp_path / "nowhere")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="--data-dir") as info:
        load_dataset("cifar100", tmp_path, download=False)
    assert "--dataset digits" in str(info.value)


def test_cifar_download_failure_is_one_line_data_error(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def offline(root, train=True, download=False, **kw):
        calls.append((root, download))
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path, download=True)
    message = str(info.value)
    assert calls == [(str(tmp_path), True)]
    assert message.startswith("--data-dir:") and "--dataset digits" in message and "\n" not in message


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("train", "test"):
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": Evil(), b"fine_labels": [0]}, handle)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar100", tmp_path, download=False)
    assert not marker.exists()


# ---- Parquet ----------------------------------------------------------------------------------
def test_parquet_png_bytes_with_split_column(tmp_path):
    images = torch.from_numpy(random_images(12, 5, shape=(3, 6, 6)))
    labels = [i % 4 for i in range(12)]
    split = ["train"] * 8 + ["test"] * 4
    path = tmp_path / "d.parquet"
    write_parquet(path, {"image": [png_bytes(im) for im in images], "label": labels, "split": split})
    ds = load_dataset("parquet", path)
    assert ds.name == "parquet" and ds.num_classes == 4 and ds.image_size == (6, 6)
    assert torch.equal(ds.train_images, images[:8]) and torch.equal(ds.test_images, images[8:])
    assert ds.train_labels.tolist() == labels[:8] and ds.test_labels.tolist() == labels[8:]
    assert ds.crop_padding == 1 and ds.train_images.is_contiguous()


def test_parquet_grey_png_and_schema_num_classes(tmp_path):
    images = torch.from_numpy(random_images(6, 6, shape=(1, 16, 16)))
    path = tmp_path / "grey.parquet"
    write_parquet(path, {"image": [png_bytes(im) for im in images], "label": [0, 1, 2, 0, 1, 2],
                         "split": ["train", "train", "train", "train", "test", "test"]},
                  metadata={b"num_classes": b"7"})
    ds = load_dataset("parquet", path)
    assert ds.num_classes == 7 and ds.in_channels == 1 and ds.crop_padding == 2
    assert torch.equal(torch.cat([ds.train_images, ds.test_images]), images)


def test_parquet_array_images_in_train_and_test_files(tmp_path):
    import pyarrow as pa

    hwc = random_images(10, 7, shape=(5, 4, 3))   # N x H x W x C
    flat = [row.flatten().tolist() for row in hwc]
    common = {"height": [5] * 10, "width": [4] * 10, "channels": [3] * 10}
    write_parquet(tmp_path / "train-0.parquet",
                  {"image": pa.array(flat[:7], type=pa.list_(pa.uint8())), "label": list(range(7)),
                   **{k: v[:7] for k, v in common.items()}})
    write_parquet(tmp_path / "test-0.parquet",
                  {"image": pa.array(flat[7:], type=pa.list_(pa.uint8(), 60)), "label": [1, 2, 3],
                   **{k: v[7:] for k, v in common.items()}})
    ds = load_dataset("parquet", str(tmp_path))
    chw = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    assert ds.train_images.shape == (7, 3, 5, 4) and ds.num_classes == 7
    assert torch.equal(ds.train_images, chw[:7]) and torch.equal(ds.test_images, chw[7:])
    assert ds.test_labels.tolist() == [1, 2, 3]


def test_parquet_fixed_shape_tensor_column(tmp_path):
    import pyarrow as pa

    hwc = random_images(6, 8, shape=(4, 4, 3))
    kind = pa.fixed_shape_tensor(pa.uint8(), (4, 4, 3))
    column = pa.ExtensionArray.from_storage(kind, pa.array([r.flatten() for r in hwc],
                                                          type=pa.list_(pa.uint8(), 48)))
    path = tmp_path / "t.parquet"
    write_parquet(path, {"image": column, "label": [0, 1, 0, 1, 0, 1],
                         "split": ["train"] * 4 + ["test"] * 2})
    ds = load_dataset("parquet", path)
    assert torch.equal(ds.train_images, torch.from_numpy(hwc[:4]).permute(0, 3, 1, 2))


def _small_columns(n=4):
    images = torch.from_numpy(random_images(n, 9, shape=(1, 4, 4)))
    return {"image": [png_bytes(im) for im in images], "label": [0, 1] * (n // 2),
            "split": ["train"] * (n - 1) + ["test"]}


@pytest.mark.parametrize("drop", ["image", "label"])
def test_parquet_missing_column(tmp_path, drop):
    columns = _small_columns()
    del columns[drop]
    write_parquet(tmp_path / "d.parquet", columns)
    with pytest.raises(DataError, match=f"--data-dir.*'{drop}'"):
        load_dataset("parquet", tmp_path / "d.parquet")


@pytest.mark.parametrize("labels,metadata", [([0, 5, 1, 0], {b"num_classes": b"3"}),
                                             ([0, -1, 1, 0], None)])
def test_parquet_label_out_of_range(tmp_path, labels, metadata):
    columns = {**_small_columns(), "label": labels}
    write_parquet(tmp_path / "d.parquet", columns, metadata)
    with pytest.raises(DataError, match="--data-dir.*labels must be in"):
        load_dataset("parquet", tmp_path / "d.parquet")


def test_parquet_without_test_split(tmp_path):
    write_parquet(tmp_path / "d.parquet", {**_small_columns(), "split": ["train"] * 4})
    with pytest.raises(DataError, match="--data-dir.*no test split"):
        load_dataset("parquet", tmp_path / "d.parquet")
    only_train = tmp_path / "dir"
    only_train.mkdir()
    columns = _small_columns()
    del columns["split"]
    write_parquet(only_train / "train.parquet", columns)
    with pytest.raises(DataError, match="--data-dir.*no test split"):
        load_dataset("parquet", only_train)


def test_parquet_missing_path_and_unreadable_file(tmp_path):
    with pytest.raises(DataError, match="--data-dir.*does not exist"):
        load_dataset("parquet", tmp_path / "missing.parquet")
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("parquet", None)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="--data-dir.*cannot read"):
        load_dataset("parquet", tmp_path / "junk.parquet")


# ---- validation split and synthetic -----------------------------------------------------------
def indexed_dataset(n=200, classes=4) -> Dataset:
    """Image i holds i in its first two pixels, so every image is identifiable."""
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) // 256
    images[:, 0, 0, 1] = torch.arange(n) % 256
    labels = torch.arange(n) % classes
    return data._make_dataset("indexed", images, labels, images[:10], labels[:10], classes)


def ids(images):
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def test_validation_split_sizes_disjoint_and_stratified():
    ds = indexed_dataset(203, 4)
    split = validation_split(ds, 0.1, seed=0)
    assert split.num_train == 183 and len(split.val_images) == 20 == len(split.val_labels)
    train_ids, val_ids = ids(split.train_images), ids(split.val_images)
    assert not set(train_ids) & set(val_ids) and sorted(train_ids + val_ids) == list(range(203))
    assert train_ids == sorted(train_ids) and val_ids == sorted(val_ids)
    assert torch.equal(split.val_labels, torch.tensor(val_ids) % 4)
    assert torch.equal(split.train_labels, torch.tensor(train_ids) % 4)
    assert sorted(torch.bincount(split.val_labels, minlength=4).tolist()) == [5, 5, 5, 5]
    assert torch.equal(split.test_images, ds.test_images)
    assert split.mean != ds.mean   # recomputed on the remaining training images
    assert ids(validation_split(ds, 0.1, seed=0).val_images) == val_ids
    assert ids(validation_split(ds, 0.1, seed=1).val_images) != val_ids
    assert validation_split(ds, 0.0, seed=0) is ds


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 0.001])
def test_validation_split_rejects_bad_fraction(fraction):
    with pytest.raises(DataError, match="--val-fraction"):
        validation_split(indexed_dataset(100), fraction, 0)


def test_load_dataset_applies_val_fraction(digits):
    split = load_dataset("digits", val_fraction=0.1, seed=3)
    assert split.num_train + len(split.val_labels) == digits.num_train
    assert len(split.val_labels) == round(0.1 * digits.num_train)
    assert torch.equal(split.test_images, digits.test_images)


def test_actors_rebuild_the_dataset_with_its_augmentation_settings(digits):
    from cohort.ray.actors import dataset_arrays, dataset_from_arrays
    rebuilt = dataset_from_arrays(dataset_arrays(digits))
    assert (rebuilt.flip, rebuilt.crop_padding, rebuilt.mean) == (False, 1, digits.mean)
    assert torch.equal(rebuilt.train_images, digits.train_images)


def test_synthetic_is_fixed():
    a = load_dataset("synthetic", synthetic_samples=(64, 16), synthetic_shape=(3, 16, 16),
                     synthetic_classes=5, seed=1)
    b = load_dataset("synthetic", synthetic_samples=(64, 16), synthetic_shape=(3, 16, 16),
                     synthetic_classes=5, seed=2)
    assert a.train_images.shape == (64, 3, 16, 16) and a.test_images.shape == (16, 3, 16, 16)
    assert a.num_classes == 5 and int(a.train_labels.max()) < 5 and a.crop_padding == 2
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)


# ---- MNIST-format files (fashion-mnist, mnist) --------------------------------------------------
def write_idx(path, array, gz=False):
    """An idx file as LeCun's format defines it: 0, 0, 0x08 (uint8), ndim, big-endian dims."""
    import gzip
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + array.tobytes())


def write_mnist(folder, train=40, test=20, gz=False, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    parts = {"train": (g.integers(0, 256, (train, 28, 28)), np.arange(train) % 10),
             "t10k": (g.integers(0, 256, (test, 28, 28)), np.arange(test) % 10)}
    suffix = ".gz" if gz else ""
    for split, (images, labels) in parts.items():
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return parts


@pytest.mark.parametrize("name, layout, gz", [("fashion-mnist", "FashionMNIST/raw", True),
                                              ("mnist", "MNIST/raw", False),
                                              ("fashion-mnist", "", False)])
def test_mnist_format_files_load_from_torchvisions_layout_or_a_plain_folder(tmp_path, name, layout, gz):
    parts = write_mnist(tmp_path / layout if layout else tmp_path, gz=gz)
    dataset = data.load_dataset(name, tmp_path, download=False)
    assert dataset.train_images.shape == (40, 1, 28, 28) and dataset.test_images.shape == (20, 1, 28, 28)
    assert torch.equal(dataset.train_images[:, 0], torch.from_numpy(parts["train"][0].astype(np.uint8)))
    assert dataset.test_labels.tolist() == parts["t10k"][1].tolist()
    assert dataset.num_classes == 10 and dataset.crop_padding == 4 and len(dataset.mean) == 1
    assert dataset.flip is (name == "fashion-mnist")   # a mirrored digit is another class or none


def test_bad_or_missing_idx_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"--data-dir.*idx files"):
        data.load_dataset("mnist", tmp_path, download=False)
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match=r"not an idx file of uint8"):
        data.load_dataset("mnist", tmp_path, download=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(19))   # 19 labels for 20 images
    with pytest.raises(DataError, match=r"do not match 19 labels"):
        data.load_dataset("mnist", tmp_path, download=False)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_loads_fast_and_a_cohort_learns_on_it(tmp_path):
    """Where the Debian package is installed: the real 60,000 + 10,000 images, and two resnet8
    students learning on a slice of them (1,024 images, 2 epochs)."""
    import time
    from cohort.runtime import run
    from conftest import small, tiny_cohort
    started = time.perf_counter()
    fashion = data.load_dataset("fashion-mnist")
    assert time.perf_counter() - started < 10.0
    assert (len(fashion.train_images), len(fashion.test_images)) == (60000, 10000)
    summary = run(tiny_cohort(tmp_path / "f", dataset="fashion-mnist", epochs=2, runtime="local"),
                  small(fashion, train=1024, test=1000))
    assert summary["members"]["ensemble"]["final_test_acc"] > 40.0, summary["members"]   # chance: 10


def test_an_offline_idx_download_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # the default root is ./data

    def offline(name, root):
        (root / "MNIST" / "raw").mkdir(parents=True)
        raise OSError("Name or service not known")

    monkeypatch.setattr(data, "_download_idx", offline)
    with pytest.raises(DataError, match=r"--data-dir: MNIST is not under data and could not be downloaded"):
        data.load_dataset("mnist")
    assert not (tmp_path / "data").exists()
