"""Checkpoint files and state dicts: reading .pt/.pth/.bin (weights only, never unpickling objects) and .safetensors,
unwrapping training wrappers, loading library-named weights into a staged net and back, and the head check."""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path

import safetensors.torch
import torch

from ackd_search.errors import WeightsError, one_line
from ackd_search.models.base import StagedNet

# Training scripts save {"state_dict": ..., "epoch": ...}; DataParallel, Lightning and torch.compile prefix keys.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_KEY_PREFIXES = ("module.", "model.", "_orig_mod.")
_SHOWN = 3  # keys named in an error line


def _pickled_globals(path: Path) -> list[str]:
    """The classes a torch.save file's pickle refers to, read by pickletools without running the pickle."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(member)
    except (zipfile.BadZipFile, StopIteration, OSError):
        return []
    found, strings = [], []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                strings.append(str(arg))
            elif opcode.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a damaged pickle: the caller falls back to torch's own reason
        return found
    return found


def _is_object(name: str) -> bool:
    # torch's own tensor-rebuilding globals are fine; torch.nn.modules.* means a whole module was pickled.
    return name.startswith("torch.nn.modules.") or not name.startswith(
        ("torch.", "collections.", "builtins.", "__builtin__.", "_codecs."))


def _refusal(path: Path, err: BaseException) -> str:
    """One line for a weights_only refusal: torch's message is paragraphs of advice to load unsafely."""
    objects = [c for c in _pickled_globals(path) if _is_object(c)]
    if any(c.startswith("torch.nn.modules.") for c in objects):
        model = next((c for c in objects if not c.startswith("torch.nn.modules.")), objects[0])
        return (f"{path} holds a pickled model ({model}), not a state dict; save its weights with "
                "`torch.save(model.state_dict(), path)` and give that file")
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    if not objects and not match:  # no object inside: not a torch.save file at all (random bytes, truncated)
        return f"cannot read checkpoint {path}: {load_failure(err)}"
    what = objects[0] if objects else match.group(1)
    return (f"{path} holds pickled Python objects ({what}), not only tensors (refused by weights_only=True "
            "loading); save a plain state dict with `torch.save(model.state_dict(), path)`")


_WEIGHTS_ONLY_ADVICE = ("Weights only load failed", "(1) In PyTorch", "(2) Alternatively", "Please file an issue",
                        "Check the documentation")


def load_failure(err: BaseException) -> str:
    """One line of why torch.load failed. Its weights_only message opens with advice to load unsafely (even for
    a file of random bytes) and carries terminal colour codes; the actual reason is on a later line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    if not text.startswith(_WEIGHTS_ONLY_ADVICE[0]):
        return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)[:200]
    detail = text.split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    reason = next((line for line in lines if not line.startswith(_WEIGHTS_ONLY_ADVICE)), "not a plain state dict")
    return f"refused by weights_only=True loading: {reason}"[:200]


def _load_file(path: Path) -> object:
    if not path.exists():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise WeightsError(f"{path} is a directory, not a checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise WeightsError(f"cannot read safetensors file {path}: {one_line(err)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle objects
    except Exception as err:
        if "Weights only load failed" in str(err):
            raise WeightsError(_refusal(path, err)) from None
        raise WeightsError(f"cannot read checkpoint {path}: {one_line(err)}") from None


def _is_state_dict(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def unwrap(content: object, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside common wrappers, with a prefix every key shares (DataParallel's `module.`,
    Lightning's `model.`, torch.compile's `_orig_mod.`) removed."""
    for _ in range(3):  # wrappers nest: {"model": {"state_dict": ...}}
        if _is_state_dict(content) or not isinstance(content, dict):
            break
        inner = next((content[k] for k in _WRAPPER_KEYS if isinstance(content.get(k), dict)), None)
        if inner is None:
            break
        content = inner
    if not isinstance(content, dict):
        raise WeightsError(f"{source} holds a {type(content).__name__}, not a state dict (names -> tensors)")
    bad = next((k for k, v in content.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None or not content:
        detail = f"{bad!r} is a {type(content[bad]).__name__}" if bad is not None else "it is empty"
        raise WeightsError(f"{source} is not a state dict of tensors ({detail}); expected keys like 'conv1.weight'")
    state = {str(k): v for k, v in content.items()}
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file on the CPU: .safetensors, or anything torch.save wrote, loaded with
    `weights_only=True` ALWAYS. Every failure is one WeightsError line."""
    path = Path(path)
    return unwrap(_load_file(path), str(path))


def _translate(net: StagedNet, state: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """(key as given, staged key, tensor) for a state in the library's names or already in the staged names."""
    mapping, staged = net.original_keys, net.state_dict().keys()
    if mapping is None or (not all(k in mapping for k in state) and all(k in staged for k in state)):
        return [(k, k, v) for k, v in state.items()]
    return [(k, mapping.get(k, k), v) for k, v in state.items()]


def _listing(keys: list[str]) -> str:
    more = f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_original_state_dict(net: StagedNet, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
    """Load `state` (the library's own key names, e.g. torchvision's `layer1.0.bn1.running_mean`, or the staged
    names) strictly into `net`; a mismatch is one WeightsError line naming the first keys, in the library's names."""
    entries = _translate(net, state)
    expected = net.state_dict()
    names = {staged: original for original, staged in reversed((net.original_keys or {}).items())}
    given = {staged for _, staged, _ in entries}
    missing = [names.get(k, k) for k in expected if k not in given]
    unexpected = [key for key, staged, _ in entries if staged not in expected]
    shapes = [f"{key} is {tuple(v.shape)} in it, {tuple(expected[staged].shape)} in the model"
              for key, staged, v in entries if staged in expected and v.shape != expected[staged].shape]
    problems = [f"missing keys: {_listing(missing)}"] * bool(missing)
    problems += [f"unexpected keys: {_listing(unexpected)}"] * bool(unexpected)
    problems += [f"shape mismatch: {_listing(shapes)}"] * bool(shapes)
    if problems:
        raise WeightsError(f"{source} does not fit the model: {'; '.join(problems)}")
    net.load_state_dict({staged: v for _, staged, v in entries}, strict=True)


def original_state_dict(net: StagedNet) -> dict[str, torch.Tensor]:
    """`net`'s state in the library's own names, to load into e.g. `torchvision.models.resnet18(num_classes=K)`."""
    state = net.state_dict()
    if net.original_keys is None:
        return state
    return {original: state[staged] for original, staged in net.original_keys.items()}


def checkpoint_classes(net: StagedNet, state: dict[str, torch.Tensor]) -> int | None:
    """The number of outputs of the checkpoint's final Linear (found by `net`'s names for it), or None."""
    candidates = ["head.fc.weight"] + [o for o, s in (net.original_keys or {}).items() if s == "head.fc.weight"]
    weight = next((state[k] for k in candidates if k in state), None)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None


def head_mismatch(net: StagedNet, state: dict[str, torch.Tensor], num_classes: int) -> str | None:
    """'head has 1000 outputs, the data set has 3 classes' when the checkpoint's final Linear does not match the
    data's classes (the caller adds whose head and what to do), else None."""
    outputs = checkpoint_classes(net, state)
    if outputs is None or outputs == num_classes:
        return None
    return f"head has {outputs} outputs, the data set has {num_classes} classes"
