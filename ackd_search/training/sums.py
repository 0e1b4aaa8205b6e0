"""The epoch's running sums of the loss and its named terms, and the non-finite flag, kept as device tensors."""

from __future__ import annotations

import torch


class EpochSums:
    """Running sums of the loss and its named terms over an epoch, and the non-finite flag, as device tensors added
    to in place: a captured step adds into the same memory on every replay, and nothing syncs with the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.bad = torch.zeros((), device=device, dtype=torch.bool)
        self.terms: dict[str, torch.Tensor] = {}
        self.seen: set[str] = set()  # names the epoch's steps produced (a captured step's are added per replay)

    def reset(self) -> None:
        self.loss.zero_()
        self.bad.zero_()
        for total in self.terms.values():
            total.zero_()
        self.seen = set()

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        loss = loss.detach()
        self.loss += loss
        self.bad |= ~torch.isfinite(loss)
        for name, value in terms.items():
            total = self.terms.get(name)
            if total is None:
                total = self.terms[name] = torch.zeros((), device=self.device)
            total += value.float()
            self.seen.add(name)

    def means(self, batches: int) -> dict[str, float]:
        out = {name: self.terms[name].item() / batches for name in self.terms if name in self.seen}
        out["loss"] = self.loss.item() / batches
        return out

