"""scikit-learn's digits (8x8 grey images, shipped with scikit-learn): the embedded default data set, with a fixed
stratified test carve since it has no official test split."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.model_selection import train_test_split

from ackd_search.data.splits import FIXED_SEED, TensorSplit, take

DIGITS_TEST_FRACTION = 0.2


def load_digits() -> tuple[TensorSplit, TensorSplit]:
    bunch = sklearn_digits()
    x = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255 (16*16 clips to 255)
    y = bunch.target.astype(np.int64)
    # No official test split: carve a fixed stratified one so results compare across runs.
    pool, test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_FRACTION, random_state=FIXED_SEED, stratify=y
    )
    full = TensorSplit(torch.from_numpy(x), torch.from_numpy(y))
    return take(full, np.sort(pool)), take(full, np.sort(test))

