"""Tests for the data you bring: ImageFolder (decode rules, layouts, the decode cache across processes), arrays
(.npz / .npy, in-memory API), torchvision classes from tiny real-format files, streaming, ResizedCropFlip. CPU."""

from __future__ import annotations

import bz2
import json
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ackd_search.config import ConfigError, DataConfig, from_dict
from ackd_search.data import (
    AUGMENT_SETTINGS,
    DATASETS,
    Augment,
    DataError,
    DeviceLoader,
    ResizedCropFlip,
    TensorSplit,
    augment_for,
    data_key,
    get_splits,
    load_splits,
    splits_from_arrays,
    splits_from_dataset,
)
from ackd_search.data.resized_crop import resized_crop_flip

CLASSES = ("ant", "bee", "cat")
REPO = Path(__file__).resolve().parents[1]

# --- writing image folders ------------------------------------------------------------------------------------------


def _rgb(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_folder(root: Path, per_class: dict[str, int], size: int = 12, seed: int = 0, grey: bool = False,
                 modes: bool = False) -> None:
    """root/<split>/<class>/<i>.png; `modes`: in the first class one L, one RGBA and one palette image."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(_rgb(rng, size, size))
                if grey:
                    img = img.convert("L")
                elif modes and c == CLASSES[0] and i < 3:
                    img = img.convert(("L", "RGBA", "P")[i])
                img.save(folder / f"{i:03d}.png")


def _expected(root: Path, split: str, size: int | None = None) -> tuple[np.ndarray, list[int]]:
    """What torchvision's ImageFolder + Resize/CenterCrop would give, in its file order."""
    xs, ys = [], []
    for label, c in enumerate(CLASSES):
        for path in sorted((root / split / c).iterdir()):
            img = Image.open(path).convert("RGB")
            if size is not None:
                img = T.CenterCrop(size)(T.Resize(size)(img))
            xs.append(np.asarray(img).transpose(2, 0, 1))
            ys.append(label)
    return np.stack(xs), ys


def _load(root: Path, tmp_path: Path, **kw):
    return load_splits("imagefolder", root, cache_dir=str(tmp_path / "decoded"), **kw)


# --- imagefolder ----------------------------------------------------------------------------------------------------


def test_imagefolder_train_val_modes_classes_labels(tmp_path, capsys):
    root = tmp_path / "folder"
    write_folder(root, {"train": 10, "val": 3}, modes=True)
    s = _load(root, tmp_path)
    assert s.classes == CLASSES and s.num_classes == 3 and (s.in_channels, s.image_size) == (3, 12)
    val_x, val_y = _expected(root, "val")  # RGBA drops alpha, palette and grey become RGB, as torchvision's loader
    assert torch.equal(s.val.x, torch.from_numpy(val_x)) and s.val.y.tolist() == val_y
    assert len(s.train) + len(s.test) == 30 and len(s.test) == 6  # no test folder: a fixed 20% carved
    assert sorted(torch.bincount(s.test.y).tolist()) == [2, 2, 2]
    train_x, train_y = _expected(root, "train")
    pool = {img.tobytes(): lab for img, lab in zip(train_x, train_y)}
    for part in (s.train, s.test):
        assert all(pool[img.tobytes()] == lab for img, lab in zip(part.x.numpy(), part.y.tolist()))
    assert s.augment == Augment(pad=1, flip=True)  # 12 px: pad-crop (an eighth of the side) + flip
    x = s.train.x.double() / 255
    assert s.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()))
    err = capsys.readouterr().err
    assert "decoded 39 images" in err and "test carved from train" in err


def test_all_grey_folder_keeps_one_channel_and_16_bit_scales(tmp_path):
    root = tmp_path / "grey"
    write_folder(root, {"train": 6}, grey=True)
    deep = (np.arange(144, dtype=np.uint16).reshape(12, 12) * 450)
    Image.fromarray(deep).save(root / "train" / "ant" / "016.png")  # 16-bit grey ("I;16")
    s = _load(root, tmp_path)
    assert s.in_channels == 1 and len(s.mean) == 1 and s.train.x.shape[1:] == (1, 12, 12)
    everything = torch.cat([s.train.x, s.val.x, s.test.x])
    assert any(torch.equal(img[0], torch.from_numpy((deep >> 8).astype(np.uint8))) for img in everything)


def test_train_only_carves_val_and_test_like_the_builtin_sets(tmp_path):
    root = tmp_path / "only"
    write_folder(root, {"train": 10})
    a, b = _load(root, tmp_path, split_seed=0), _load(root, tmp_path, split_seed=1)
    assert (len(a.train), len(a.val), len(a.test)) == (21, 3, 6)
    assert torch.equal(a.test.x, b.test.x)  # the test carve is fixed
    assert not torch.equal(a.val.x, b.val.x)  # val moves with split_seed
    assert sorted(torch.bincount(a.val.y).tolist()) == [1, 1, 1]


def test_image_size_is_torchvision_resize_and_centre_crop(tmp_path):
    root = tmp_path / "sizes"
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i, (w, h) in enumerate([(20, 14), (9, 30), (16, 16)]):
                Image.fromarray(_rgb(rng, w, h)).save(root / split / c / f"{i}.png")
    s = _load(root, tmp_path, image_size=8)
    assert s.image_size == 8 and s.train.x.shape[1:] == (3, 8, 8)
    x, y = _expected(root, "test", size=8)
    assert torch.equal(s.test.x, torch.from_numpy(x)) and s.test.y.tolist() == y


def test_mixed_sizes_without_image_size_is_one_line(tmp_path):
    root = tmp_path / "mixed"
    write_folder(root, {"train": 3})
    Image.fromarray(_rgb(np.random.default_rng(0), 20, 10)).save(root / "train" / "bee" / "big.png")
    with pytest.raises(DataError) as info:
        _load(root, tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "different sizes" in msg and "12x12" in msg
    assert "train/bee/big.png 20x10" in msg and "data.image_size" in msg


def _layout(root: Path, case: str) -> None:
    if case == "missing":
        return
    root.mkdir()
    if case == "no train":
        (root / "cats").mkdir()
        return
    (root / "train").mkdir()
    if case == "empty train":
        return
    if case == "files only":
        Image.new("RGB", (4, 4)).save(root / "train" / "a.png")
        return
    write_folder(root, {"train": 2, "val": 1}, size=4)
    if case == "class without images":
        for p in (root / "train" / "bee").iterdir():
            p.unlink()
        (root / "train" / "bee" / "notes.txt").write_text("not an image")
    elif case == "class missing from val":
        for p in (root / "val" / "cat").iterdir():
            p.unlink()
        (root / "val" / "cat").rmdir()
    elif case == "extra class in val":
        (root / "val" / "dog").mkdir()
        Image.new("RGB", (4, 4)).save(root / "val" / "dog" / "0.png")
    elif case == "one class":
        for c in ("bee", "cat"):
            for split in ("train", "val"):
                for p in (root / split / c).iterdir():
                    p.unlink()
                (root / split / c).rmdir()


@pytest.mark.parametrize("case, text", [
    ("missing", "not found"),
    ("no train", "no train folder"),
    ("empty train", "is empty"),
    ("files only", "holds no class folders, only 1 file"),
    ("class without images", "class folder"),
    ("class missing from val", "class 'cat' of"),
    ("extra class in val", "has class folder 'dog'"),
    ("one class", "at least two"),
])
def test_bad_layouts_are_one_line(tmp_path, case, text):
    root = tmp_path / "bad"
    _layout(root, case)
    with pytest.raises(DataError) as info:
        _load(root, tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("imagefolder: ") and text in msg
    if case == "class missing from val":
        assert str(root / "val") in msg
    if case == "class without images":
        assert str(root / "train" / "bee") in msg


def test_unreadable_images_skip_up_to_the_rule_then_refuse(tmp_path, capsys):
    root = tmp_path / "broken"
    write_folder(root, {"train": 10})
    good = root / "train" / "bee" / "000.png"
    good.write_bytes(good.read_bytes()[:60])  # truncated: the header opens, the pixels fail (dropped after decoding)
    s = _load(root, tmp_path)
    assert len(s.train) + len(s.val) + len(s.test) == 29
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s) of 30" in err and "000.png" in err
    (root / "train" / "cat" / "001.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError) as info:
        _load(root, tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "2 unreadable image(s) of 30" in msg and "at most 1%" in msg and "001.png" in msg


# --- the decode cache -----------------------------------------------------------------------------------------------

_CHILD = """
import sys
from ackd_search.config import DataConfig
from ackd_search.data import get_splits
s = get_splits(DataConfig(name="imagefolder", data_root=sys.argv[1], cache_dir=sys.argv[2], image_size=16))
print(len(s.train), int(s.train.x.sum()))
"""


def _spawn(root: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(cache)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return out, err


def test_decode_cache_built_once_across_processes_then_reused_and_rebuilt(tmp_path):
    root, cache = tmp_path / "shared", tmp_path / "decoded"
    write_folder(root, {"train": 12, "val": 2})
    first = [_finish(p) for p in [_spawn(root, cache), _spawn(root, cache)]]  # started at the same moment
    errs = [err for _, err in first]
    assert sum("data: decoded" in e for e in errs) == 1 and sum("data: read" in e for e in errs) == 1
    assert first[0][0] == first[1][0]  # the same tensors either way
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    manifest = json.loads((entry / "manifest.json").read_text())
    out, err = _finish(_spawn(root, cache))  # a later trial or worker
    assert "data: read" in err and "memory-mapped" in err and "data: decoded" not in err
    assert json.loads((entry / "manifest.json").read_text())["created"] == manifest["created"] and out == first[0][0]
    array = entry / "train_x.npy"
    data = bytearray(array.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    array.write_bytes(bytes(data))
    out, err = _finish(_spawn(root, cache))
    (line,) = [ln for ln in err.splitlines() if "does not match its manifest" in ln]
    assert str(array) in line and "decoding again" in line and "data: decoded" in err and out == first[0][0]


def test_a_changed_file_is_a_new_cache_entry(tmp_path):
    root = tmp_path / "change"
    write_folder(root, {"train": 6, "val": 2, "test": 2})
    a = _load(root, tmp_path)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / "test" / "ant" / "000.png")
    b = _load(root, tmp_path)
    assert torch.equal(a.train.x, b.train.x) and not torch.equal(a.test.x, b.test.x)
    assert len([p for p in (tmp_path / "decoded").iterdir() if p.is_dir()]) == 2


# --- loader: streaming and ResizedCropFlip --------------------------------------------------------------------------


def _split(n: int = 37, c: int = 3, size: int = 16) -> TensorSplit:
    g = torch.Generator().manual_seed(0)
    return TensorSplit(x=torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8), y=torch.arange(n))


def _loaders(split: TensorSplit, augment, **kw) -> tuple[DeviceLoader, DeviceLoader]:
    c = split.x.shape[1]
    return tuple(DeviceLoader(split, 8, "cpu", (0.5,) * c, (0.25,) * c, augment=augment, shuffle=True, seed=3,
                              resident=resident, **kw) for resident in (True, False))


@pytest.mark.parametrize("augment", [None, Augment(pad=2, flip=True), ResizedCropFlip()])
def test_streaming_gives_the_resident_batches(augment):
    resident, streaming = _loaders(_split(), augment)
    assert resident.resident and not streaming.resident
    for epoch in (0, 2):
        resident.set_epoch(epoch)
        streaming.set_epoch(epoch)
        pairs = list(zip(resident, streaming))
        assert len(pairs) == len(resident) == 5
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
        if not isinstance(augment, ResizedCropFlip):
            assert all(torch.equal(a[2], b[2]) for a, b in zip(resident.iter_views(), streaming.iter_views()))
            views = torch.arange(0, 37 * resident.num_views, 5)
            assert torch.equal(resident.view_images(views), streaming.view_images(views))


def test_memory_mapped_split_streams(tmp_path):
    x = _split().x.numpy()
    np.save(tmp_path / "x.npy", x)
    mapped = TensorSplit(x=torch.from_numpy(np.load(tmp_path / "x.npy", mmap_mode="c")), y=torch.arange(37))
    a, b = _loaders(mapped, Augment(pad=1, flip=True))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_resized_crop_flip_deterministic_shape_range():
    split, aug = _split(size=64), ResizedCropFlip()
    a, b = _loaders(split, aug)
    a.set_epoch(1)
    b.set_epoch(1)
    xa, xb = [x for x, _ in a], [x for x, _ in b]
    assert all(torch.equal(p, q) for p, q in zip(xa, xb))
    a.set_epoch(2)
    assert not torch.equal(next(iter(a))[0], xa[0])
    raw = (xa[0] * 0.25 + 0.5) * 255
    assert xa[0].shape == (8, 3, 64, 64) and raw.min() >= -1e-3 and raw.max() <= 255 + 1e-3
    with pytest.raises(DataError, match="cannot be enumerated"):
        a.iter_views()
    assert type(aug) is not Augment and a.num_views == 1  # the teacher-output cache sees another type: off


def test_resized_crop_flip_matches_torchvision_crop_resize_flip():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    params = ResizedCropFlip().draw(6, 32, 32, torch.Generator().manual_seed(4))
    out = resized_crop_flip(x, params)
    for img, got, (top, left, h, w, flip) in zip(x, out, params.tolist()):
        want = TF.resized_crop(img.float(), top, left, h, w, [32, 32], antialias=False)
        want = want.flip(-1) if flip else want
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert (params[:, 2] <= 32).all() and (params[:, 3] <= 32).all() and params[:, 4].sum() > 0


def test_augmentation_follows_the_resolution():
    assert augment_for("imagefolder", 32) == Augment(pad=4, flip=True)
    assert augment_for("imagefolder", 63) == Augment(pad=7, flip=True)
    assert isinstance(augment_for("imagefolder", 64), ResizedCropFlip)
    assert augment_for("digits", 8) == Augment(pad=1, flip=False) and augment_for("cifar100", 32).pad == 4
    assert augment_for("arrays", 96, "crop") == Augment(pad=12, flip=False)
    assert augment_for("arrays", 16, "resized_crop") == ResizedCropFlip(flip=False)


# --- arrays ---------------------------------------------------------------------------------------------------------


def _arrays(n: int = 40, layout: str = "nhwc", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    y = np.arange(n) % 4
    return {"nhwc": x, "nchw": x.transpose(0, 3, 1, 2), "nhw": x[..., 0]}[layout], y


@pytest.mark.parametrize("layout", ["nhwc", "nchw", "nhw"])
def test_npz_layouts(tmp_path, layout):
    x, y = _arrays(layout=layout)
    xt, yt = _arrays(10, layout, seed=1)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, classes=np.array(list("abcd")))
    s = load_splits("arrays", tmp_path / "d.npz")
    chw = (1, 8, 8) if layout == "nhw" else (3, 8, 8)
    assert s.train.x.shape[1:] == chw and s.num_classes == 4 and s.classes == tuple("abcd")
    assert len(s.train) + len(s.val) == 40 and len(s.test) == 10
    want = xt[:, None] if layout == "nhw" else (xt if layout == "nchw" else xt.transpose(0, 3, 1, 2))
    assert torch.equal(s.test.x, torch.from_numpy(np.ascontiguousarray(want)))


def test_npy_folder_with_val_and_classes(tmp_path):
    x, y = _arrays()
    for key, value in {"x_train": x, "y_train": y, "x_val": x[:8], "y_val": y[:8]}.items():
        np.save(tmp_path / f"{key}.npy", value)
    (tmp_path / "classes.txt").write_text("w\nx\ny\nz\n")
    s = load_splits("arrays", tmp_path, num_classes=4)
    assert len(s.val) == 8 and torch.equal(s.val.y, torch.from_numpy(y[:8]))
    assert len(s.train) + len(s.test) == 40 and s.classes == ("w", "x", "y", "z")


@pytest.mark.parametrize("arrays, kw, text", [
    ({"x_train": "x", "y_train": "y", "X_val": "x"}, {}, "unknown key 'X_val'"),
    ({"x_train": "float", "y_train": "y"}, {}, "[x_train]: images have dtype float32"),
    ({"x_train": "x", "y_train": "yfloat"}, {}, "[y_train]: labels have dtype float64"),
    ({"x_train": "x", "y_train": "y"}, {"num_classes": 3}, "[y_train]: label 3 is outside 0..2"),
    ({"x_train": "x", "y_train": "short"}, {}, "[y_train]: (39,) labels for 40 images"),
    ({"x_train": "x"}, {}, "lacks y_train"),
    ({"x_train": "wide", "y_train": "y"}, {}, "[x_train]: images are 8x6"),
    ({"x_train": "x", "y_train": "y", "x_test": "x4", "y_test": "y"}, {}, "[x_test]: images have shape"),
])
def test_bad_npz_is_one_line_naming_file_and_key(tmp_path, arrays, kw, text):
    x, y = _arrays()
    values = {"x": x, "y": y, "float": x.astype(np.float32), "yfloat": y.astype(np.float64), "short": y[:-1],
              "wide": x[:, :, :6], "x4": np.zeros((40, 8, 8, 4), np.uint8)}
    np.savez(tmp_path / "bad.npz", **{k: values[v] for k, v in arrays.items()})
    with pytest.raises(DataError) as info:
        load_splits("arrays", tmp_path / "bad.npz", **kw)
    msg = str(info.value)
    assert "\n" not in msg and text in msg and "bad.npz" in msg


def test_unknown_npy_file_is_named(tmp_path):
    x, y = _arrays()
    np.save(tmp_path / "x_train.npy", x)
    np.save(tmp_path / "train_labels.npy", y)
    with pytest.raises(DataError, match="train_labels.npy is not one of x_train.npy"):
        load_splits("arrays", tmp_path)


def test_splits_from_arrays_and_tensors():
    x, y = _arrays(layout="nchw")
    s = splits_from_arrays((torch.from_numpy(x), torch.from_numpy(y)), val=(x[:8], y[:8]), classes=list("abcd"),
                           augment="none")
    assert s.name == "arrays" and len(s.val) == 8 and len(s.train) + len(s.test) == 40 and s.classes == tuple("abcd")
    assert s.augment == Augment(pad=0, flip=False)
    with pytest.raises(DataError, match="at least two classes"):
        splits_from_arrays((x, np.zeros(40, np.int64)))


class _Pictures(torch.utils.data.Dataset):
    classes: typing.ClassVar[list[str]] = ["even", "odd"]

    def __init__(self, n: int, tensors: bool = False):
        self.items = []
        rng = np.random.default_rng(n)
        for i in range(n):
            img = Image.fromarray(_rgb(rng, 10 + i % 3, 10))
            img = img.convert("L") if i % 4 == 0 else img
            self.items.append((T.functional.to_tensor(img) if tensors else img, i % 2))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def test_splits_from_dataset_pil_and_tensors():
    s = splits_from_dataset(_Pictures(30), test=_Pictures(10, tensors=True), image_size=8)
    assert s.classes == ("even", "odd") and s.in_channels == 3 and s.image_size == 8
    assert len(s.train) + len(s.val) == 30 and len(s.test) == 10
    img = _Pictures(30).items[4][0]  # a grey image, widened as Pillow's L -> RGB
    want = np.asarray(T.CenterCrop(8)(T.Resize(8)(img.convert("RGB")))).transpose(2, 0, 1)
    everything = torch.cat([s.train.x, s.val.x])
    assert any(torch.equal(e, torch.from_numpy(np.ascontiguousarray(want))) for e in everything)
    with pytest.raises(DataError, match="different sizes"):
        splits_from_dataset(_Pictures(30))


# --- torchvision classes --------------------------------------------------------------------------------------------


def _idx(path: Path, array: np.ndarray) -> None:
    # The MNIST idx format: zero, zero, type 0x08 (uint8), the rank; big-endian int32 dims; the bytes.
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist(root: Path, cls: str = "MNIST") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raw = root / cls / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", 50), ("t10k", 20)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10
        _idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", y)
        out[prefix] = (x, y)
    return out


@pytest.mark.parametrize("cls", ["MNIST", "FashionMNIST"])
def test_mnist_idx_round_trip(tmp_path, cls):
    fake = _write_mnist(tmp_path, cls)
    s = load_splits(f"torchvision:{cls}", tmp_path, download=False)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, 28) and len(s.classes) == 10
    assert torch.equal(s.test.x, torch.from_numpy(fake["t10k"][0][:, None]))
    assert s.test.y.tolist() == fake["t10k"][1].tolist() and len(s.train) + len(s.val) == 50
    assert s.augment == Augment(pad=2, flip=cls == "FashionMNIST")


def test_svhn_stl10_usps_files(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": rng.integers(0, 256, (32, 32, 3, 20), dtype=np.uint8),
                                                           "y": (np.arange(20) % 10 + 1)[:, None]})
    s = load_splits("torchvision:SVHN", tmp_path, download=False)
    assert s.train.x.shape[1:] == (3, 32, 32) and sorted(set(s.test.y.tolist())) == list(range(10))
    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    for split in ("train", "test"):
        (stl / f"{split}_X.bin").write_bytes(rng.integers(0, 256, 20 * 3 * 96 * 96, dtype=np.uint8).tobytes())
        (stl / f"{split}_y.bin").write_bytes((np.arange(20) % 10 + 1).astype(np.uint8).tobytes())
    s = load_splits("torchvision:STL10", tmp_path, download=False)
    assert s.train.x.shape[1:] == (3, 96, 96) and isinstance(s.augment, ResizedCropFlip)
    for name in ("usps.bz2", "usps.t.bz2"):
        lines = [f"{i % 10 + 1} " + " ".join(f"{j + 1}:{v:.3f}" for j, v in enumerate(rng.uniform(-1, 1, 256)))
                 for i in range(20)]
        (tmp_path / name).write_bytes(bz2.compress("\n".join(lines).encode()))
    s = load_splits("torchvision:USPS", tmp_path, download=False)
    assert s.train.x.shape[1:] == (1, 16, 16) and s.num_classes == 10


@pytest.mark.parametrize("name", [n for n in DATASETS if n.startswith("torchvision:")])
def test_every_torchvision_name_has_a_reader(tmp_path, name):
    with pytest.raises(DataError, match="not found in") as info:
        load_splits(name, tmp_path, download=False)
    assert "\n" not in str(info.value)


def test_torchvision_missing_files_and_unknown_names(tmp_path):
    with pytest.raises(DataError) as info:
        load_splits("torchvision:KMNIST", tmp_path, download=False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "KMNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg
    for wrong, hint in (("torchvision:FashionMnist", "torchvision:FashionMNIST"), ("mnist", "torchvision:MNIST"),
                        ("image_folder", "imagefolder")):
        with pytest.raises(DataError, match=f"did you mean {hint}"):
            load_splits(wrong, tmp_path)


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_keys_and_get_splits_with_given_stats(tmp_path):
    cfg = from_dict(DataConfig, {"name": "imagefolder", "data_root": "x", "image_size": 64, "channels": "grey",
                                 "mean": [0.5], "std": [0.25], "augment": "crop", "cache_dir": "c"})
    assert cfg.mean == [0.5] and cfg.image_size == 64
    with pytest.raises(ConfigError, match="name: 'imagefolders' is not allowed; allowed: digits, cifar10"):
        from_dict(DataConfig, {"name": "imagefolders"})
    hints = typing.get_type_hints(DataConfig)
    assert typing.get_args(hints["augment"]) == AUGMENT_SETTINGS
    assert data_key(DataConfig(name="digits", limit=300)) == {"name": "digits", "val_fraction": 0.1,
                                                             "split_seed": 0, "limit": 300}
    assert "image_size" in data_key(DataConfig(name="imagefolder", image_size=32))
    x, y = _arrays()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y)
    s = get_splits(DataConfig(name="arrays", data_root=str(tmp_path / "d.npz"), mean=[0.1, 0.2, 0.3],
                              std=[1.0, 1.0, 1.0]))
    assert s.mean == (0.1, 0.2, 0.3)
    with pytest.raises(DataError, match="image_size 16 is read by the imagefolder source only"):
        load_splits("arrays", tmp_path / "d.npz", image_size=16)
