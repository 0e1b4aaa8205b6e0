"""Tests for ackd_search.data: digits / CIFAR loading (CIFAR from tiny files in the real on-disk layout)
and DeviceLoader batching, determinism, normalization and augmentation. CPU only, no network."""

from __future__ import annotations

import pickle
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.utils as tv_utils

from ackd_search.data import (
    DATASETS,
    Augment,
    DataError,
    DeviceLoader,
    TensorSplit,
    load_splits,
)

# --- fake CIFAR files ----------------------------------------------------------------------------------------------


def _dump(path: Path, obj: dict) -> None:
    # Protocol 2 and str keys: what the real Python-2 pickles look like once read with encoding="latin1".
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng: np.random.Generator, n: int, classes: int) -> tuple[np.ndarray, list[int]]:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows are CHW-flattened, as in the release
    labels = (np.arange(n) % classes).tolist()  # every class present
    rng.shuffle(labels)
    return data, labels


def write_fake_cifar100(root: Path, n_train: int = 400, n_test: int = 100, seed: int = 0) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data, labels = _images(rng, n, 100)
        _dump(folder / split, {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
                               "fine_labels": labels, "coarse_labels": [lab // 5 for lab in labels], "data": data})
        out[split] = (data, labels)
    _dump(folder / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                            "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return out


def write_fake_cifar10(root: Path, per_batch: int = 40, n_test: int = 50, seed: int = 1) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    out = {}
    for name in names:
        data, labels = _images(rng, n_test if name == "test_batch" else per_batch, 10)
        _dump(folder / name, {"batch_label": name, "labels": labels, "data": data,
                              "filenames": [f"{i}.png" for i in range(len(labels))]})
        out[name] = (data, labels)
    _dump(folder / "batches.meta", {"num_cases_per_batch": per_batch, "num_vis": 3072,
                                    "label_names": [f"class{i}" for i in range(10)]})
    return out


def _as_chw(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.reshape(-1, 3, 32, 32))


def _assert_round_trip(splits, train_data: np.ndarray, train_labels: list[int], test_data, test_labels) -> None:
    # train+val is a subset-partition of the training files: match images by their bytes.
    original = {img.tobytes(): lab for img, lab in zip(_as_chw(train_data).numpy(), train_labels)}
    seen = set()
    for part in (splits.train, splits.val):
        assert part.x.dtype == torch.uint8 and part.y.dtype == torch.int64
        for img, lab in zip(part.x.numpy(), part.y.tolist()):
            key = img.tobytes()
            assert original[key] == lab
            seen.add(key)
    assert len(seen) == len(original) == len(splits.train) + len(splits.val)
    assert torch.equal(splits.test.x, _as_chw(test_data))
    assert splits.test.y.tolist() == list(test_labels)


# --- load_splits ---------------------------------------------------------------------------------------------------


def test_digits_shapes_and_stratified_val():
    s = load_splits("digits", val_fraction=0.2, split_seed=0)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, 8)
    assert len(s.train) + len(s.val) == 1437 and len(s.test) == 360
    for part in (s.train, s.val, s.test):
        assert part.x.dtype == torch.uint8 and part.x.shape[1:] == (1, 8, 8) and part.y.dtype == torch.int64
    assert int(s.train.x.max()) == 255  # 16 * 16 clipped
    val_p = torch.bincount(s.val.y, minlength=10).double() / len(s.val)
    train_p = torch.bincount(s.train.y, minlength=10).double() / len(s.train)
    assert (val_p > 0).all() and (val_p - train_p).abs().max() < 0.02
    assert s.augment == Augment(pad=1, flip=False)
    x = s.train.x.double() / 255
    assert s.mean[0] == pytest.approx(x.mean().item()) and s.std[0] == pytest.approx(x.std(unbiased=False).item())


def test_digits_split_fixed_by_seed():
    a, b, c = (load_splits("digits", split_seed=seed) for seed in (3, 3, 4))
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.x, c.test.x)  # the test carve never moves


def test_limit_caps_pool_and_test():
    s = load_splits("digits", limit=200)
    assert len(s.train) + len(s.val) == 200 and len(s.test) == 200
    assert torch.bincount(s.val.y, minlength=10).min() > 0


@pytest.mark.parametrize("kwargs, field", [
    ({"name": "mnist"}, f"allowed: {', '.join(DATASETS)}"),
    ({"name": "digits", "val_fraction": 0.0}, "val_fraction must be in (0, 0.5]"),
    ({"name": "digits", "val_fraction": 0.6}, "val_fraction must be in (0, 0.5]"),
    ({"name": "digits", "limit": 1}, "limit"),
])
def test_bad_arguments(kwargs, field):
    with pytest.raises(DataError) as info:
        load_splits(**kwargs)
    assert field in str(info.value)


def test_cifar100_files_round_trip(tmp_path):
    fake = write_fake_cifar100(tmp_path)
    s = load_splits("cifar100", tmp_path, val_fraction=0.25, download=False)
    assert (s.num_classes, s.in_channels, s.image_size) == (100, 3, 32)
    assert s.augment == Augment(pad=4, flip=True)
    assert len(s.val) == 100 and len(torch.unique(s.val.y)) == 100  # stratified: one of each class
    _assert_round_trip(s, *fake["train"], *fake["test"])
    x = s.train.x.double() / 255
    assert s.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()))


def test_cifar100_limit_too_small_to_stratify(tmp_path):
    write_fake_cifar100(tmp_path)
    s = load_splits("cifar100", tmp_path, download=False, limit=150)  # 15 val images < 100 classes
    assert len(s.train) + len(s.val) == 150 and len(s.test) == 100


def test_cifar10_files_round_trip(tmp_path):
    fake = write_fake_cifar10(tmp_path)
    s = load_splits("cifar10", str(tmp_path), download=False)
    train = [fake[f"data_batch_{i}"] for i in range(1, 6)]
    data = np.concatenate([d for d, _ in train])
    labels = [lab for _, batch in train for lab in batch]
    _assert_round_trip(s, data, labels, *fake["test_batch"])
    assert s.num_classes == 10 and len(s.train) + len(s.val) == 200


def test_missing_folder_is_one_clear_line(tmp_path):
    with pytest.raises(DataError) as info:
        load_splits("cifar10", tmp_path / "nowhere", download=False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "nowhere" / "cifar-10-batches-py") in msg
    assert "data_batch_1" in msg and "test_batch" in msg and "batches.meta" in msg


def test_missing_meta_counts_as_missing(tmp_path):
    write_fake_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DataError, match="expected train, test, meta"):
        load_splits("cifar100", tmp_path, download=False)


def test_failed_download_cleans_partial_archive(tmp_path, monkeypatch):
    def broken_download(url, root, filename=None, md5=None, **_):
        Path(root).mkdir(parents=True, exist_ok=True)
        Path(root, filename).write_bytes(b"partial")  # what an interrupted transfer leaves behind
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", broken_download)
    with pytest.raises(DataError) as info:
        load_splits("cifar100", tmp_path, download=True)
    msg = str(info.value)
    assert "\n" not in msg and "download failed" in msg and "network is unreachable" in msg
    assert "expected train, test, meta" in msg
    assert not (tmp_path / "cifar-100-python.tar.gz").exists()


def test_download_path_extracts_and_loads(tmp_path, monkeypatch):
    # The archive is built locally; torchvision's own extract step and the loader run for real.
    staging = tmp_path / "staging"
    fake = write_fake_cifar100(staging)
    archive = tmp_path / "made.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-100-python", arcname="cifar-100-python")

    def local_download(url, root, filename=None, md5=None, **_):
        Path(root).mkdir(parents=True, exist_ok=True)  # as torchvision's download_url does
        shutil.copy(archive, Path(root, filename))

    monkeypatch.setattr(tv_utils, "download_url", local_download)
    s = load_splits("cifar100", tmp_path / "data", val_fraction=0.25, download=True)
    _assert_round_trip(s, *fake["train"], *fake["test"])


def test_corrupt_file_is_one_line(tmp_path):
    write_fake_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="could not read") as info:
        load_splits("cifar100", tmp_path, download=False)
    assert "\n" not in str(info.value)


# --- DeviceLoader --------------------------------------------------------------------------------------------------


def _split(n: int = 50, c: int = 3, size: int = 8, seed: int = 0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 256, (n, c, size, size), generator=g, dtype=torch.uint8)  # no raw 0: padding is visible
    return TensorSplit(x=x, y=torch.arange(n))  # label = sample id, to track coverage


def _loader(split: TensorSplit, **kw) -> DeviceLoader:
    c = split.x.shape[1]
    return DeviceLoader(split, kw.pop("batch_size", 16), "cpu", mean=(0.5,) * c, std=(0.25,) * c, **kw)


def _batches(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_every_sample_once_per_epoch():
    loader = _loader(_split(), shuffle=True)
    batches = _batches(loader)
    assert len(loader) == len(batches) == 4 and loader.num_samples == 50
    ids = torch.cat([y for _, y in batches])
    assert sorted(ids.tolist()) == list(range(50)) and ids.tolist() != list(range(50))
    assert all(y.dtype == torch.int64 for _, y in batches)


def test_drop_last():
    loader = _loader(_split(), shuffle=True, drop_last=True)
    assert len(loader) == 3 and all(len(y) == 16 for _, y in loader)


def test_same_seed_epoch_gives_identical_batches():
    aug = Augment(pad=2, flip=True)
    a = _loader(_split(), shuffle=True, augment=aug, seed=7)
    b = _loader(_split(), shuffle=True, augment=aug, seed=7)
    _batches(a)  # history must not matter
    a.set_epoch(3)
    b.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    order3 = torch.cat([y for _, y in b])
    b.set_epoch(4)
    assert not torch.equal(order3, torch.cat([y for _, y in b]))


def test_eval_loader_is_plain_and_normalized():
    split = _split(n=64)
    mean = split.x.double().div(255).mean(dim=(0, 2, 3))
    std = split.x.double().div(255).std(dim=(0, 2, 3), unbiased=False)
    loader = DeviceLoader(split, 64, "cpu", mean=tuple(mean.tolist()), std=tuple(std.tolist()))
    (x, y), = list(loader)
    assert x.dtype == torch.float32 and torch.equal(y, split.y)
    expected = (split.x.float() / 255 - mean.float().view(1, -1, 1, 1)) / std.float().view(1, -1, 1, 1)
    torch.testing.assert_close(x, expected)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4


def _raw(loader: DeviceLoader, x: torch.Tensor) -> torch.Tensor:
    # Undo normalization back to raw 0..255 values.
    return (x * loader.std + loader.mean).mul(255).round()


def test_crop_shifts_content_with_zero_padding():
    split, pad = _split(n=40), 2
    loader = _loader(split, batch_size=40, augment=Augment(pad=pad, flip=False))
    (x, _), = list(loader)
    assert x.shape == split.x.shape
    out = _raw(loader, x)
    padded = torch.nn.functional.pad(split.x.float(), (pad,) * 4)
    shifted = 0
    for i in range(len(split)):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(matches) == 1
        shifted += matches[0] != (pad, pad)
    assert shifted > 30  # 24 of 25 offsets move the image


def test_flip_flips():
    split = _split(n=40)
    loader = _loader(split, batch_size=40, augment=Augment(pad=0, flip=True))
    (x, _), = list(loader)
    out = _raw(loader, x)
    flipped = [bool(torch.equal(out[i], split.x[i].float().flip(-1))) for i in range(40)]
    same = [bool(torch.equal(out[i], split.x[i].float())) for i in range(40)]
    assert all(f != s for f, s in zip(flipped, same))
    assert 5 < sum(flipped) < 35


def test_channels_last_and_dtype():
    loader = _loader(_split(), channels_last=True, dtype=torch.bfloat16, augment=Augment(pad=1, flip=True))
    x, _ = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_digits_end_to_end():
    s = load_splits("digits", limit=300)
    loader = DeviceLoader(s.train, 32, "cpu", s.mean, s.std, augment=s.augment, shuffle=True)
    x, y = next(iter(loader))
    assert x.shape == (32, 1, 8, 8) and y.max() < s.num_classes
