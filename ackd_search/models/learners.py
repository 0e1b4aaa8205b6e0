"""Fresh parts of any staged net for ACKD's auxiliary learners (copies of later stages and of the head, re-initialised),
and head surgery for fine-tuning (a new final Linear for other classes)."""

from __future__ import annotations

import copy

from torch import nn

from ackd_search.models.base import StagedNet


def reinitialise(module: nn.Module) -> nn.Module:
    """Call `reset_parameters()` on every submodule that has one, in place (BatchNorm's also resets its running
    statistics). Parameters of modules without it (e.g. ConvNeXt's layer-scale gammas) keep the copied values,
    which are the library's constant init when the source net is freshly built, as the student is when learners
    are made. Note: torch's own reset is used, not the library's custom init (e.g. torchvision's fan_out He)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return module


def fresh_stages(net: StagedNet, start: int) -> nn.ModuleList:
    """Independent copies of `net.stages[start:]` (same structure and shapes, new parameter values): the stages of
    a learner that branches after stage `start` (1-based placement), for any model, zoo or library."""
    if not 0 <= start <= net.num_stages:
        raise ValueError(f"start {start} is out of range for a net with {net.num_stages} stages")
    return nn.ModuleList(reinitialise(copy.deepcopy(stage)) for stage in net.stages[start:])


def fresh_head(net: StagedNet) -> nn.Module:
    """An independent copy of `net.head` (with `pooled(x)` and `fc`), re-initialised."""
    return reinitialise(copy.deepcopy(net.head))


def replace_head(net: StagedNet, num_classes: int) -> StagedNet:
    """Swap `net.head.fc` for a fresh Linear with `num_classes` outputs (same input width, bias, device, dtype), in
    place, e.g. to fine-tune pretrained 1000-class weights. The staged and library key names stay the same."""
    old = net.head.fc
    net.head.fc = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
    return net
