"""The one place that decides each source's training augmentation: the standard one of a known data set, else the
resolution's (pad-crop + flip below LARGE_IMAGE pixels, random-resized-crop + flip from there), or the config's."""

from __future__ import annotations

from ackd_search.data.resized_crop import LARGE_IMAGE, ResizedCropFlip
from ackd_search.data.splits import Augment
from ackd_search.errors import DataError

# `data.augment`: auto = the table below, else the resolution rule; the others name the augmentation outright.
AUGMENT_SETTINGS = ("auto", "none", "crop", "crop_flip", "resized_crop", "resized_crop_flip")

# Known data sets' usual training augmentation (the built-in three are today's, unchanged). Digits are not
# mirror-invariant, so digit sets crop without flipping; clothes (FashionMNIST) are.
_STANDARD: dict[str, Augment | ResizedCropFlip] = {
    "digits": Augment(pad=1, flip=False),
    "cifar10": Augment(pad=4, flip=True),
    "cifar100": Augment(pad=4, flip=True),
    "torchvision:CIFAR10": Augment(pad=4, flip=True),
    "torchvision:CIFAR100": Augment(pad=4, flip=True),
    "torchvision:MNIST": Augment(pad=2, flip=False),
    "torchvision:KMNIST": Augment(pad=2, flip=False),
    "torchvision:FashionMNIST": Augment(pad=2, flip=True),
    "torchvision:USPS": Augment(pad=1, flip=False),
    "torchvision:SVHN": Augment(pad=4, flip=False),
}


def crop_pad(image_size: int) -> int:
    """The pad-crop's padding for a resolution: an eighth of the side (CIFAR's 4 at 32 px), at least one pixel."""
    return max(1, image_size // 8)


def augment_for(name: str, image_size: int, setting: str = "auto") -> Augment | ResizedCropFlip:
    """The training augmentation of source `name` at `image_size` under the config's `data.augment` setting."""
    if setting not in AUGMENT_SETTINGS:
        raise DataError(f"unknown augment {setting!r}; allowed: {', '.join(AUGMENT_SETTINGS)}")
    if setting == "auto":
        if name in _STANDARD:
            return _STANDARD[name]
        setting = "resized_crop_flip" if image_size >= LARGE_IMAGE else "crop_flip"
    if setting == "none":
        return Augment(pad=0, flip=False)
    if setting in ("crop", "crop_flip"):
        return Augment(pad=crop_pad(image_size), flip=setting == "crop_flip")
    return ResizedCropFlip(flip=setting == "resized_crop_flip")
