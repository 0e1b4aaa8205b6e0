"""The core's data: sources (digits, CIFAR, ImageFolder, arrays, torchvision classes) read into uint8 tensor splits
and the device loader. This face re-exports the public names; modules inside import from the owning sibling."""

from ackd_search.data.arrays import splits_from_arrays, splits_from_dataset
from ackd_search.data.augment_policy import AUGMENT_SETTINGS, augment_for
from ackd_search.data.loader import RESIDENT_GPU_FRACTION, DeviceLoader, crop_flip, fits_device
from ackd_search.data.names import DATASETS
from ackd_search.data.resized_crop import LARGE_IMAGE, ResizedCropFlip
from ackd_search.data.sources import data_key, get_splits, load_splits
from ackd_search.data.splits import Augment, DataSplits, TensorSplit, channel_stats
from ackd_search.errors import DataError

__all__ = ["AUGMENT_SETTINGS", "DATASETS", "LARGE_IMAGE", "RESIDENT_GPU_FRACTION", "Augment", "DataError",
           "DataSplits", "DeviceLoader", "ResizedCropFlip", "TensorSplit", "augment_for", "channel_stats",
           "crop_flip", "data_key", "fits_device", "get_splits", "load_splits", "splits_from_arrays",
           "splits_from_dataset"]
