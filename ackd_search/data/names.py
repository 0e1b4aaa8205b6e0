"""The data source names a config may give (`data.name`, listed by the config schema) and the check that turns an
unknown one into one line with the closest known names."""

from __future__ import annotations

import difflib
import typing

from ackd_search.config import DataConfig
from ackd_search.errors import DataError

DATASETS: tuple[str, ...] = typing.get_args(typing.get_type_hints(DataConfig)["name"])  # the schema's Literal
BUILTIN = ("digits", "cifar10", "cifar100")  # today's sources: their tensors and splits never change
TORCHVISION_PREFIX = "torchvision:"
# torchvision dataset classes read from their own on-disk files (downloaded by torchvision when allowed). The CIFAR
# entries are the built-in cifar10 / cifar100 under torchvision's class names: same files, same tensors.
TORCHVISION_CLASSES = tuple(n[len(TORCHVISION_PREFIX):] for n in DATASETS if n.startswith(TORCHVISION_PREFIX))


def close_matches(name: str) -> list[str]:
    """Known names close to `name`, case-insensitively, also when the `torchvision:` prefix is left out."""
    by_lower: dict[str, str] = {}
    for known in DATASETS:
        by_lower[known.lower()] = known
        if known.startswith(TORCHVISION_PREFIX):
            by_lower.setdefault(known[len(TORCHVISION_PREFIX):].lower(), known)
    wanted = name.strip().lower()
    hits = difflib.get_close_matches(wanted, list(by_lower), n=3, cutoff=0.6)
    if wanted.startswith(TORCHVISION_PREFIX):
        hits += difflib.get_close_matches(wanted[len(TORCHVISION_PREFIX):], list(by_lower), n=3, cutoff=0.6)
    return list(dict.fromkeys(by_lower[h] for h in hits))


def check_name(name: str) -> None:
    """A DataError (one line) unless `name` is a known data source."""
    if name in DATASETS:
        return
    hint = close_matches(name)
    near = f" (did you mean {' or '.join(hint)}?)" if hint else ""
    raise DataError(f"unknown dataset {name!r}{near}; allowed: {', '.join(DATASETS)}")
