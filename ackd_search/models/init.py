"""A model to train from given weights: fresh, the library's pretrained ones, or a state dict file's; a head whose
classes differ from the data's is replaced by a fresh one (fine-tuning), and the caller is told so in one line."""

from __future__ import annotations

from pathlib import Path

from ackd_search.errors import ModelError
from ackd_search.models.base import StagedNet
from ackd_search.models.learners import replace_head
from ackd_search.models.names import create_model
from ackd_search.models.weights import checkpoint_classes, load_original_state_dict, read_state_dict


def initial_model(name: str, num_classes: int, in_channels: int = 3, init: str | Path | None = None,
                  pretrained: bool = False) -> tuple[StagedNet, str | None]:
    """(`name` built for `num_classes`, a note on where its weights came from, None when fresh). `init` is a state
    dict file; `pretrained` the library's weights. Without either the model is built exactly as `create_model`."""
    if init is not None and pretrained:
        raise ModelError(f"{name}: give initial weights as a file or as the library's pretrained ones, not both")
    if init is None and not pretrained:
        return create_model(name, num_classes, in_channels=in_channels), None
    if pretrained:
        net, source = create_model(name, num_classes, in_channels=in_channels, pretrained=True), "pretrained weights"
    else:
        state = read_state_dict(init)
        probe = create_model(name, num_classes, in_channels=in_channels)
        outputs = checkpoint_classes(probe, state) or num_classes
        net = probe if outputs == num_classes else create_model(name, outputs, in_channels=in_channels)
        load_original_state_dict(net, state, str(init))
        source = f"weights of {init}"
    outputs = net.head.fc.out_features
    if outputs == num_classes:
        return net, f"{name} starts from the {source}"
    replace_head(net, num_classes)
    return net, (f"{name} starts from the {source}, its {outputs}-output head replaced by a fresh "
                 f"{num_classes}-class one")
