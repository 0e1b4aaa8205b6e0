"""The `imagefolder` source: torchvision's ImageFolder layout (ImageNet's extracted train / val folders included),
carved like the built-in sets, decoded once into the memory-mapped decode cache and served as DataSplits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ackd_search.data.augment_policy import augment_for
from ackd_search.data.decode_cache import Request, decoded
from ackd_search.data.folder_scan import SPLIT_FOLDERS, scan
from ackd_search.data.splits import DataSplits, given_stats, plan_splits
from ackd_search.errors import DataError

if TYPE_CHECKING:  # the config package imports the data package's names: no import cycle at run time
    from ackd_search.config import DataConfig


def load_imagefolder(cfg: DataConfig) -> DataSplits:
    """`cfg.data_root` as DataSplits: ROOT/val and ROOT/test when present, else carved from ROOT/train."""
    root = Path(cfg.data_root).expanduser().resolve()
    listing = scan(root)
    labels = {s: np.array([e.label for e in listing.splits[s]], dtype=np.int64) if s in listing.splits else None
              for s in SPLIT_FOLDERS}
    plan = plan_splits("imagefolder", labels, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                       limit=cfg.limit)
    files = {split: [listing.splits[source][i] for i in idx] for split, (source, idx) in plan.rows.items()}
    request = Request(root=root, classes=listing.classes, files=files, image_size=cfg.image_size,
                      channels=cfg.channels, note=plan.note(cfg.val_fraction, cfg.split_seed))
    parts, manifest = decoded(request, Path(cfg.cache_dir).expanduser().resolve())
    classes = tuple(manifest["classes"])
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise DataError(f"imagefolder: num_classes is {cfg.num_classes} but {root / 'train'} has {len(classes)} "
                        f"class folders; leave num_classes unset for an imagefolder")
    channels, side = int(manifest["channels"]), int(manifest["image_size"])
    stats = given_stats("imagefolder", cfg.mean, cfg.std, channels) or (tuple(manifest["mean"]),
                                                                          tuple(manifest["std"]))
    return DataSplits(name=cfg.name, train=parts["train"], val=parts["val"], test=parts["test"],
                      num_classes=len(classes), in_channels=channels, image_size=side, mean=stats[0], std=stats[1],
                      augment=augment_for(cfg.name, side, cfg.augment), classes=classes)
