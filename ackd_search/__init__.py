"""ackd-search: AutoML search over ACKD (adversarial collaborative knowledge distillation) configurations.

The Python API (`ackd_search/api.py`): `search`, `export`, `train` and `load_space`, re-exported by this face."""

__version__ = "0.1.0"  # first: every module of the package reads it from here while the API below is imported

from ackd_search.api import export, load_space, search, train  # noqa: E402

__all__ = ["__version__", "export", "load_space", "search", "train"]
