"""How one image file becomes a uint8 (C, H, W) array: the colour rules (RGB, or grey when every image is grey) and
torchvision's Resize(N) + CenterCrop(N); RULES_VERSION names these rules in the decode cache's key."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

# Rules (version 1):
# - RGB output: every mode goes through Pillow's convert("RGB"); alpha is dropped, not composited (as torchvision's
#   ImageFolder loader does); palette images go through RGBA first (same colours, no Pillow transparency warning);
#   CMYK / YCbCr use Pillow's conversion; 16-bit grey ("I;16*", and "I", read as 16-bit) is scaled by 1/256 first
#   (Pillow's own convert would clip it to 255).
# - Grey output (1 channel): when EVERY image of the data is grey ("1", "L", "LA", "I", "I;16*", "F"), or when the
#   config asks for grey (then colour images become Pillow's "L" luma).
# - No EXIF rotation (torchvision's loader applies none either); multi-frame files give their first frame.
# - Size: with image_size N, the shorter side is resized to N (bilinear, Pillow's antialiasing) and the centre N x N
#   is cut, the exact arithmetic of torchvision's Resize(N) + CenterCrop(N); without it, the image is kept as it is.
RULES_VERSION = 1
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# Pillow formats that only identify a file or need an outside program: not images this decoder can read.
_NOT_DECODABLE = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "EPS", "MPEG", "PDF"})


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions of every format Pillow can open and decode here."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in _NOT_DECODABLE)


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in image_extensions()


def header(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file's header, without decoding the pixels."""
    with Image.open(path) as img:
        return img.mode, img.size


def _eight_bit_grey(img: Image.Image) -> Image.Image:
    values = np.asarray(img).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def convert(img: Image.Image, grey: bool) -> Image.Image:
    """`img` in mode "L" (grey) or "RGB" by the rules above."""
    mode = img.mode
    if mode in _SIXTEEN_BIT:
        img, mode = _eight_bit_grey(img), "L"
    if grey:
        return img if mode == "L" else img.convert("L")
    if mode == "P":
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(size): the shorter side becomes `size`, the longer truncates."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_centre_crop(img: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) (bilinear) then CenterCrop(size), on a Pillow image."""
    new_w, new_h = resized_size(*img.size, size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_array(img: Image.Image, size: int | None, grey: bool) -> np.ndarray:
    """A Pillow image as uint8 (C, H, W): colour rule, then resize + centre crop when `size` is set."""
    img = convert(img, grey)
    if size is not None:
        img = resize_centre_crop(img, size)
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def decode(path: Path, size: int | None, grey: bool) -> np.ndarray:
    """The file at `path` as uint8 (C, H, W); Pillow's errors (unreadable, truncated) propagate."""
    with Image.open(path) as img:
        img.load()
        return to_array(img, size, grey)
