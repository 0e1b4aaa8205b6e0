"""The core's data: sources (digits, CIFAR) read into uint8 tensor splits with a fixed validation split, and the
device-resident loader. This face re-exports the public names; modules inside import from the owning sibling."""

from ackd_search.data.loader import DeviceLoader, crop_flip
from ackd_search.data.sources import DATASETS, get_splits, load_splits
from ackd_search.data.splits import Augment, DataSplits, TensorSplit, channel_stats
from ackd_search.errors import DataError

__all__ = ["DATASETS", "Augment", "DataError", "DataSplits", "DeviceLoader", "TensorSplit", "channel_stats",
           "crop_flip", "get_splits", "load_splits"]
