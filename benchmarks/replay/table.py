"""A recorded curve table in memory, and the nearest recorded configuration of a proposal.

Distance (Gower-style, unnormalised L1 over the union of the two configurations' parameters):
  - a float or int knob: |u_a - u_b|, u = the value mapped linearly onto [0, 1] over its range (log scale for a
    log range), so a full-range difference counts 1;
  - a categorical knob: 0 when equal, 1 when different;
  - a knob present in one configuration and absent (not acting, so not sampled) in the other: 1, the same as a
    categorical mismatch (it acts in one run and not in the other); absent in both: 0;
  - the learner counts per branch point are compared as EFFECTIVE counts (after the product's `max_total` cap,
    `Space.capped_placements`), each over 0..max_per_stage: two proposals that train the same structure are at
    distance 0 there, whatever their raw counts.
Ties go to the lowest table id (deterministic)."""

from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import optuna

LEARNER_PREFIX = "distill.ackd.learners_after_stage_"
ABSENT = None


class Table:
    def __init__(self, data: dict[str, Any]):
        self.data = data
        self.task = data["task"]
        self.epochs = int(data["epochs"])
        self.configs = data["configs"]
        self.ids = [c["id"] for c in self.configs]
        self.n, self.n_seeds = len(self.configs), len(data["seeds"])
        # curves[i, s, e]: val_acc of config i, seed s after epoch e + 1; NaN after a failure
        self.curves = np.full((self.n, self.n_seeds, self.epochs), np.nan)
        self.lengths = np.zeros((self.n, self.n_seeds), dtype=int)
        for i, c in enumerate(self.configs):
            for s, curve in enumerate(c["curves"]):
                self.curves[i, s, : len(curve)] = curve
                self.lengths[i, s] = len(curve)
        self.failed = self.lengths < self.epochs
        self.dists = {k: optuna.distributions.json_to_distribution(v) for k, v in data["distributions"].items()}
        self.names = sorted(self.dists)
        self.max_per_stage = int((data["space"].get("learners") or {}).get("max_per_stage", 1))
        self.max_total = int((data["space"].get("learners") or {}).get("max_total", 1))
        self._build_matrix()

    @classmethod
    def load(cls, path: str | Path) -> Table:
        return cls(json.loads(Path(path).read_text()))

    # --- what the replay measures against -------------------------------------------------------------------
    @cached_property
    def final_mean(self) -> np.ndarray:
        """Mean over seeds of the final val_acc; a seed that failed counts as its last value (a search that picks
        it would have to retrain it); a config with every seed failed before its first epoch gets 0."""
        last = np.array([[self.curves[i, s, self.lengths[i, s] - 1] if self.lengths[i, s] else 0.0
                          for s in range(self.n_seeds)] for i in range(self.n)])
        return last.mean(axis=1)

    @cached_property
    def best(self) -> float:
        return float(self.final_mean.max())

    def regret(self, index: int) -> float:
        return self.best - float(self.final_mean[index])

    def mean_curve(self) -> np.ndarray:
        """Per config, per epoch, the mean over seeds (NaN where a seed failed before that epoch)."""
        return self.curves.mean(axis=1)

    # --- nearest neighbour ------------------------------------------------------------------------------------
    def effective(self, params: dict[str, Any]) -> dict[str, Any]:
        """Params with the learner counts replaced by the effective (capped) counts."""
        counts = {int(k[len(LEARNER_PREFIX):]): int(v) for k, v in params.items() if k.startswith(LEARNER_PREFIX)}
        out = {k: v for k, v in params.items() if not k.startswith(LEARNER_PREFIX)}
        excess = sum(counts.values()) - self.max_total
        for stage in sorted(counts):  # the product's rule: over max_total, the earliest branch point loses first
            removed = min(max(excess, 0), counts[stage])
            counts[stage] -= removed
            excess -= removed
        out.update({f"{LEARNER_PREFIX}{stage}": n for stage, n in counts.items()})
        return out

    def _unit(self, name: str, value: Any) -> float:
        d = self.dists[name]
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return float(d.choices.index(value))
        if name.startswith(LEARNER_PREFIX):
            return float(value) / max(self.max_per_stage, 1)
        low, high = float(d.low), float(d.high)
        if getattr(d, "log", False):
            low, high, value = math.log(low), math.log(high), math.log(float(value))
        return (float(value) - low) / (high - low) if high > low else 0.0

    def encode(self, params: dict[str, Any]) -> np.ndarray:
        eff = self.effective(params)
        return np.array([self._unit(k, eff[k]) if k in eff else np.nan for k in self.names])

    def _build_matrix(self) -> None:
        self.matrix = np.stack([self.encode(c["params"]) for c in self.configs])  # (n, p), NaN = absent
        self.categorical = np.array([isinstance(self.dists[k], optuna.distributions.CategoricalDistribution)
                                     for k in self.names])

    def distances(self, params: dict[str, Any]) -> np.ndarray:
        q = self.encode(params)
        return self._distances(q, self.matrix)

    def _distances(self, q: np.ndarray, m: np.ndarray) -> np.ndarray:
        qa, ma = np.isnan(q)[None, :], np.isnan(m)
        diff = np.abs(np.nan_to_num(m) - np.nan_to_num(q)[None, :])
        diff = np.where(self.categorical[None, :], (diff > 0).astype(float), diff)
        diff = np.where(qa ^ ma, 1.0, np.where(qa & ma, 0.0, diff))
        return diff.sum(axis=1)

    def nearest(self, params: dict[str, Any]) -> tuple[int, float]:
        d = self.distances(params)
        i = int(np.argmin(d))  # first minimum: lowest table position (ids are in order)
        return i, float(d[i])

    @cached_property
    def neighbour_scale(self) -> dict[str, float]:
        """Distances between the table's own configurations: each one's nearest other (a yardstick for how close
        a replayed proposal's nearest neighbour is)."""
        nn = []
        for i in range(self.n):
            d = self._distances(self.matrix[i], self.matrix)
            d[i] = np.inf
            nn.append(d.min())
        nn = np.array(nn)
        return {"median_nn_within_table": round(float(np.median(nn)), 3),
                "p10_nn_within_table": round(float(np.percentile(nn, 10)), 3),
                "p90_nn_within_table": round(float(np.percentile(nn, 90)), 3)}


def subsample(data: dict[str, Any], n_configs: int, epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """A smaller table: n_configs of the configurations (the reference preset kept), curves cut to `epochs`."""
    rng = np.random.default_rng(seed)
    configs = data["configs"]
    keep = [0] + sorted(rng.choice(np.arange(1, len(configs)), size=n_configs - 1, replace=False).tolist())
    out = {k: v for k, v in data.items() if k != "configs"}
    out["configs"] = []
    for i in keep:
        c = dict(configs[i])
        if epochs is not None:
            c["curves"] = [curve[:epochs] for curve in c["curves"]]
        out["configs"].append(c)
    if epochs is not None:
        out["epochs"] = epochs
    out["n_configs"] = len(keep)
    return out
