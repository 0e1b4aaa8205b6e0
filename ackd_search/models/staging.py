"""Cutting a library's classifier into a StagedNet: the generic assembly from a Layout, the build-time
forward-equivalence check, the original-name key map, and the unstaged (one-stage) fallback."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ackd_search.errors import ModelError, one_line
from ackd_search.models.base import ClassifierHead, StagedNet, StageInfo

Piece = tuple[str, nn.Module]  # (the module's path in the original model, the module); run in order


@dataclass
class Layout:
    """How a model's top-level pieces compose: stem, then each stage, then `tail` (the head up to the final Linear,
    which has been swapped for an Identity in place). `expected` is the library's own metadata for the stages."""

    stem: list[Piece]
    stages: list[list[Piece]]
    tail: list[Piece]
    expected: list[StageInfo] | None = field(default=None)


class StagingProblem(Exception):
    """Raised by a layout function when the model's stages cannot be found; the text is the reason."""


LayoutFn = Callable[[nn.Module, torch.Tensor], Layout]

# Staged logits must equal the model's own up to float reassociation; anything larger means the pieces do not
# compose like the model's forward (a functional step between children, a skipped module).
_RTOL, _ATOL = 1e-4, 1e-5


def probe_input(in_channels: int, size: int) -> torch.Tensor:
    """A fixed random input from a private generator: staging must not consume the global RNG the trainer seeded."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, in_channels, size, size, generator=generator)  # eval mode: one image suffices


def piece_shapes(pieces: Sequence[Piece], x: torch.Tensor) -> list[torch.Size]:
    """Output shape of each piece run in sequence from `x` (shapes only: in-place ops rewrite earlier outputs)."""
    shapes = []
    with torch.no_grad():
        for name, module in pieces:
            try:
                x = module(x)
            except Exception as err:  # the pieces do not compose in this order: not a staging the model allows
                raise StagingProblem(f"its pieces do not run in order ({name}: {one_line(err)})") from None
            if not isinstance(x, torch.Tensor):
                raise StagingProblem(f"{name} returns a {type(x).__name__}, not a tensor")
            shapes.append(x.shape)
    return shapes


def group_by_resolution(pieces: Sequence[Piece], x: torch.Tensor) -> list[list[Piece]]:
    """Consecutive pieces with the same output resolution form one group: a new group starts at each piece that
    changes it (the strided block opening a stage in MobileNets, EfficientNets, ConvNeXt)."""
    groups: list[list[Piece]] = []
    previous: tuple[int, ...] | None = None
    for piece, shape in zip(pieces, piece_shapes(pieces, x)):
        if len(shape) != 4:
            raise StagingProblem(f"{piece[0]} outputs a {len(shape)}-d tensor, not an (N, C, H, W) feature map")
        if tuple(shape[-2:]) != previous:
            groups.append([])
            previous = tuple(shape[-2:])
        groups[-1].append(piece)
    return groups


def find_classifier(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """The model's eval logits on `x`, and the path of the nn.Linear whose output IS those logits (None if the
    last step is not a Linear: a conv classifier, an averaged distillation head)."""
    calls: list[tuple[str, torch.Tensor]] = []
    paths = {module: path for path, module in model.named_modules()}
    handles = [m.register_forward_hook(lambda mod, _in, out: calls.append((paths[mod], out)))
               for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, torch.Tensor):
        raise ModelError(f"returns a {type(logits).__name__} in eval mode, not a logits tensor")
    for path, out in reversed(calls):
        if out is logits or (out.shape == logits.shape and torch.equal(out, logits)):
            return logits, path
    return logits, None


def detach_classifier(model: nn.Module, path: str) -> nn.Linear:
    """Swap the final Linear at `path` for an Identity in place (the model now outputs its pooled features) and
    return the Linear: the staged head owns it, so the weights are the model's own and never copied."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    fc = parent.get_submodule(child)
    setattr(parent, child, nn.Identity())
    return fc


def _sequential(pieces: Sequence[Piece]) -> nn.Module:
    if not pieces:
        return nn.Identity()
    # The original path names each piece ("layer1", "blocks_3"), so staged keys stay readable.
    return nn.Sequential(OrderedDict((name.replace(".", "_"), module) for name, module in pieces))


def assemble(layout: Layout, fc: nn.Linear, x: torch.Tensor) -> tuple[StagedNet, torch.Tensor]:
    """The StagedNet of `layout` and its logits on `x`, from one pass that also measures stage_info (which must
    agree with the library's metadata)."""
    stem, stages = _sequential(layout.stem), [_sequential(stage) for stage in layout.stages]
    if not stages:
        raise StagingProblem("no stage boundaries were found")
    head = ClassifierHead(_sequential(layout.tail), fc)
    info = []
    with torch.no_grad():
        try:
            h = stem(x)
            for stage in stages:
                h = stage(h)
                if not isinstance(h, torch.Tensor) or h.dim() != 4:
                    raise StagingProblem(f"stage {len(info)} does not output an (N, C, H, W) feature map")
                info.append(StageInfo(int(h.shape[1]), max(1, round(x.shape[-2] / h.shape[-2]))))
            logits = head(h)
        except StagingProblem:
            raise
        except Exception as err:  # the cut pieces do not compose like the model's forward
            raise StagingProblem(f"stage {len(info)} does not run on its input ({one_line(err)})") from None
    if layout.expected is not None:
        for i, (got, want) in enumerate(zip(info, layout.expected)):
            if got.channels != want.channels:
                raise StagingProblem(f"stage {i} outputs {got.channels} channels where its metadata says "
                                     f"{want.channels}")
        info = list(layout.expected)  # the library's own reductions (measured ones round on small probes)
    return StagedNet(stem, stages, head, info), logits


def unstaged(model: nn.Module, fc: nn.Linear) -> StagedNet:
    """The whole model (its final Linear detached) as ONE stage: plain KD and the student alone still work, but
    there is no branch point for auxiliary learners. Reduction 0: the stage's output is pooled, not a map."""
    return StagedNet(nn.Identity(), [model], ClassifierHead(nn.Identity(), fc), [StageInfo(fc.in_features, 0)])


def key_map(original: dict[str, torch.Tensor], net: StagedNet) -> dict[str, str]:
    """Original state-dict name -> staged name, matched by tensor identity (the staged net holds the very modules
    of the original model, so each parameter and buffer is the same object under a new name)."""
    staged = {id(t): name for name, t in reversed(net.state_dict(keep_vars=True).items())}  # first name wins
    mapping, outside = {}, []
    for name, tensor in original.items():
        if id(tensor) in staged:
            mapping[name] = staged[id(tensor)]
        else:
            outside.append(name)
    if outside:
        raise StagingProblem(f"some of its weights ({', '.join(outside[:3])}) lie outside the stage chain")
    extra = set(net.state_dict()) - set(mapping.values())
    if extra:  # state the adapter added would not load into the library model
        raise StagingProblem(f"the staged net has state the model lacks ({', '.join(sorted(extra)[:3])})")
    return mapping


def _max_difference(staged: torch.Tensor, logits: torch.Tensor) -> float | None:
    """None when the staged logits equal the model's; else their largest absolute difference."""
    if staged.shape != logits.shape:
        return float("inf")
    atol = _ATOL * max(1.0, float(logits.abs().max()))
    if torch.allclose(staged, logits, rtol=_RTOL, atol=atol):
        return None
    return float((staged - logits).abs().max())


def stage_model(label: str, model: nn.Module, layout_fn: LayoutFn | None, in_channels: int,
                probe_sizes: Sequence[int], unstaged_reason: str | None = None) -> StagedNet:
    """Cut `model` into a StagedNet with `layout_fn` and verify it (eval mode, fixed random input, staged logits ==
    the model's own); without a layout, or when it fails, the model becomes one stage with `staging_problem` set.
    The result is in train mode, like a freshly built library model, and carries `original_keys`."""
    original = dict(model.state_dict(keep_vars=True))  # before the classifier moves: the library's own names
    model.eval()
    x, logits, fc_path, failures = None, None, None, []
    for size in probe_sizes:
        candidate = probe_input(in_channels, size)
        try:
            logits, fc_path = find_classifier(model, candidate)
        except ModelError as err:
            raise ModelError(f"{label} {err}") from None
        except Exception as err:  # this input size does not suit the model: try the next
            failures.append(f"{size}x{size}: {one_line(err)}")
            continue
        x = candidate
        break
    if x is None or logits is None:
        raise ModelError(f"{label} does not run on a {in_channels}-channel probe input ({failures[0]})")
    if fc_path is None:
        raise ModelError(f"{label}: its logits do not come from a final nn.Linear (e.g. a convolutional "
                         "classifier), which the staged head needs")
    fc = detach_classifier(model, fc_path)
    reason = unstaged_reason
    if reason is None and layout_fn is not None:
        try:
            # Clones: a first in-place op would otherwise change the probe between the two forwards.
            net, staged_logits = assemble(layout_fn(model, x.clone()), fc, x.clone())
            net.original_keys = key_map(original, net)
            difference = _max_difference(staged_logits, logits)
            if difference is not None:
                raise StagingProblem(f"its staged forward differs from its own (max |diff| {difference:.3g})")
            return net.train()
        except StagingProblem as problem:
            reason = f"its stages cannot be found ({problem})"
    net = unstaged(model, fc)
    net.original_keys = key_map(original, net)
    with torch.no_grad():
        staged_logits = net(x.clone())
    if _max_difference(staged_logits, logits) is not None:
        raise ModelError(f"{label}: its forward does not end in its final Linear, so no head can be cut off")
    net.staging_problem = f"{label} cannot carry auxiliary learners: {reason or 'its stages cannot be found'}"
    return net.train()
