"""Typed run configuration (data, models, optimiser, distiller) and strict YAML loading.

Every field has a default and a validated range; errors name the file, the key path and the allowed values."""

from __future__ import annotations

import copy
import dataclasses
import os
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ackd_search.models import list_models


class ConfigError(ValueError):
    """All problems found in one config, one line each: `source: key.path: problem; allowed: ...`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _bounds(ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None):
    return {"bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}


def _in(ge=None, gt=None, le=None, lt=None, default=None, **kw):
    return field(default=default, metadata=_bounds(ge, gt, le, lt), **kw)


MODEL_FIELD = {"choices_fn": list_models}


@dataclass
class DataConfig:
    name: Literal["digits", "cifar10", "cifar100"] = "digits"
    data_root: str = "data"
    val_fraction: float = _in(gt=0.0, le=0.5, default=0.1)
    split_seed: int = 0  # fixed so every trial of a search shares one validation set
    download: bool = True
    limit: int | None = _in(ge=10, default=None)  # cap on train+val images, for smoke runs


@dataclass
class OptimConfig:
    """SGD with the benchmark's step schedule; milestones are in recipe epochs, scaled to `epochs`."""

    epochs: int = _in(ge=1, le=10_000, default=240)
    batch_size: int = _in(ge=1, le=65_536, default=64)
    lr: float = _in(gt=0.0, le=10.0, default=0.05)
    momentum: float = _in(ge=0.0, lt=1.0, default=0.9)
    weight_decay: float = _in(ge=0.0, le=0.1, default=5e-4)
    schedule: Literal["step", "cosine"] = "step"
    recipe_epochs: int = _in(ge=1, default=240)
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    lr_decay: float = _in(gt=0.0, le=1.0, default=0.1)

    @property
    def budget_scale(self) -> float:
        """Factor that maps recipe epochs (240-epoch benchmark) to this run's budget."""
        return self.epochs / self.recipe_epochs

    def scaled_milestones(self) -> list[int]:
        """Repeats are kept: when a short budget puts two decays on one epoch, MultiStepLR applies both there."""
        return sorted(max(1, round(m * self.budget_scale)) for m in self.milestones if m < self.recipe_epochs)


@dataclass
class TeacherConfig:
    arch: str = field(default="digits_cnn_large", metadata=MODEL_FIELD)
    checkpoint: str | None = None  # the user's own teacher weights (a state dict) instead of the cached one
    seed: int = 0
    cache_dir: str = "studies/teachers"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=30))
    # The teacher's logits for every augmented view of every training image, computed once per (teacher, data,
    # augmentation) beside the cached teacher and read by every trial instead of running the teacher
    # (ackd_search/output_cache.py). auto: on when the cache fits the memory budget (2 GiB) and, on a CPU, costs no
    # more teacher forwards than the run itself would; on: always (unless the augmentation cannot be enumerated).
    output_cache: Literal["auto", "on", "off"] = "auto"


@dataclass
class AckdConfig:
    """ACKD knobs. The defaults are the `reference` configuration: OUR RECONSTRUCTION, not the paper's.

    Keep the reference values here and nowhere else (see ../shared/ackd-method.md)."""

    aux_placements: list[int] | None = None  # None = reference: three learners before the last stage
    aux_width: float = _in(gt=0.0, le=4.0, default=1.0)
    aggregation: Literal["attention", "mean"] = "attention"
    attn_reduction: int = _in(ge=1, le=64, default=8)
    # False masks A_ii: with the targets' logits detached but the weights trained, the attention can learn to point
    # each learner at itself (measured on digits: A_ii ~0.9 after 20 epochs), which empties the collaborative term.
    attn_self: bool = True
    detach_target: bool = True
    student_target: Literal["attention", "aux_mean"] = "aux_mean"
    collab_weight: float = _in(ge=0.0, le=100.0, default=1.0)
    collab_rampup_epochs: float = _in(ge=0.0, default=80.0)  # recipe epochs, scaled to the budget
    adv_weight: float = _in(ge=0.0, le=100.0, default=0.1)
    adv_warmup_epochs: float = _in(ge=0.0, default=0.0)  # recipe epochs, scaled to the budget
    adv_real: Literal["teacher", "ensemble"] = "teacher"
    adv_input: Literal["probs", "features"] = "probs"
    d_lr: float = _in(gt=0.0, le=1.0, default=2e-4)
    aux_weight: float = _in(ge=0.0, le=100.0, default=1.0)

    def resolved_placements(self, num_stages: int) -> list[int]:
        if self.aux_placements is None:
            return [num_stages - 1] * 3
        return list(self.aux_placements)


# Loss weights a method uses unless the config sets them: ACKD's reference point (our reconstruction) and
# RepDistiller's KD weighting. Keep them here and nowhere else.
METHOD_WEIGHTS = {"ackd": (1.0, 1.0), "kd": (0.1, 0.9), "student": (1.0, 0.0)}


@dataclass
class DistillConfig:
    method: Literal["student", "kd", "ackd"] = "ackd"
    temperature: float = _in(gt=0.0, le=100.0, default=4.0)
    ce_weight: float | None = _in(ge=0.0, le=100.0, default=None)  # None: the method's own (METHOD_WEIGHTS)
    kd_weight: float | None = _in(ge=0.0, le=100.0, default=None)
    ackd: AckdConfig = field(default_factory=AckdConfig)

    def __post_init__(self) -> None:
        ce, kd = METHOD_WEIGHTS.get(self.method, (1.0, 1.0))
        self.ce_weight = ce if self.ce_weight is None else self.ce_weight
        self.kd_weight = kd if self.kd_weight is None else self.kd_weight


@dataclass
class RunConfig:
    seed: int = 0
    student: str = field(default="digits_cnn_small", metadata=MODEL_FIELD)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=20))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    channels_last: bool = True  # applied on CUDA only
    compile: bool = False
    # Capture the training step as one CUDA graph and replay it (auto: on for CUDA, off elsewhere). A capture that
    # fails says why in one line and the run continues eagerly; `on` without CUDA says so and runs eagerly.
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    # torch threads on a CPU device (None: torch's default, one per core). On a quiet 2-core machine one thread ran
    # a digits trial as fast as two (ACKD 5.9 s vs 6.2 s, KD 2.2 s vs 2.5 s, means of 3); with other work on the
    # second core, two threads slowed down several-fold. Set 1 for tiny nets and for several workers per machine.
    cpu_threads: int | None = _in(ge=1, le=1024, default=None)
    eval_test: bool = False  # read the test set once at the end (final training only; the search never does)
    output_dir: str | None = None  # checkpoints and results; None = nothing written


# Every file-system path in a run config: resolved against the driver's folder before a run goes to another process.
PATH_FIELDS = ("output_dir", "data.data_root", "teacher.cache_dir", "teacher.checkpoint")


# Hand-set points every search starts from. ACKD's is our reconstruction; KD's is RepDistiller's KD weighting.
def reference_distill() -> DistillConfig:
    return DistillConfig(method="ackd", temperature=4.0, ackd=AckdConfig())


def kd_distill() -> DistillConfig:
    return DistillConfig(method="kd", temperature=4.0)


# --- dict <-> dataclass, with every problem collected -------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_absolute_paths(data: dict[str, Any], root: str | Path = ".") -> dict[str, Any]:
    """A run config's plain data with every PATH_FIELDS entry resolved against `root`: the same run, wherever it
    was started from (the plain backend keeps relative paths, the Ray backend resolves them on its driver)."""
    out = copy.deepcopy(data)
    for dotted in PATH_FIELDS:
        *parents, leaf = dotted.split(".")
        owner = out
        for key in parents:
            owner = owner.get(key) or {}
        if owner.get(leaf) is not None:
            owner[leaf] = os.path.abspath(os.path.join(root, owner[leaf]))
    return out


def from_dict(cls: type, data: Any, source: str = "<config>") -> Any:
    """Build `cls` from plain data, rejecting unknown keys, wrong types and out-of-range values."""
    problems: list[str] = []
    obj = _convert(cls, data, "", source, problems)
    if problems:
        raise ConfigError(problems)
    return obj


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, refusing a key given twice in one mapping (PyYAML silently keeps the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKeyError(f"line {line}: duplicate key {key!r} (first on line {first_line[key]})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError([f"{path}: cannot read: {err.strerror}"]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        problem = f"{path}: not UTF-8 text (line {line}, byte {data[err.start]:#04x}); save the file as UTF-8"
    raise ConfigError([problem])


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    text = _read_text(path)
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except _DuplicateKeyError as err:
        raise ConfigError([f"{path}: {err}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([f"{path}: malformed YAML{where}: {reason}"]) from None


def load_run_config(path: str | Path) -> RunConfig:
    return from_dict(RunConfig, load_yaml(path) or {}, source=str(path))


class _ReadableDumper(yaml.SafeDumper):
    """Mappings as indented blocks, lists on one line (`milestones: [150, 180, 210]`)."""


_ReadableDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True))


def save_run_config(cfg: RunConfig, path: str | Path, header: str = "", notes: dict[str, str] | None = None,
                    omit: tuple[str, ...] = ()) -> None:
    """Write `cfg` as YAML. `notes` maps a key path (`optim.milestones`) to a comment written above that key;
    `omit` drops key paths whose values do not act (their defaults apply when the file is loaded again)."""
    data = to_dict(cfg)
    for dotted in omit:
        parent, _, leaf = dotted.rpartition(".")
        (get_path(data, parent) if parent else data).pop(leaf, None)
    text = yaml.dump(data, Dumper=_ReadableDumper, sort_keys=False, width=10_000)
    if notes:
        text = _with_notes(text, notes)
    Path(path).write_text((header + "\n" if header else "") + text)


def _with_notes(text: str, notes: dict[str, str]) -> str:
    """Insert each note as comment lines above its key; keys are found by indentation (block mappings only)."""
    out: list[str] = []
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        key, _, _ = line.strip().partition(":")
        indent = len(line) - len(line.lstrip(" "))
        if key.isidentifier():
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, key))
            note = notes.get(".".join(k for _, k in stack))
            if note:
                width = max(40, 118 - indent)
                out += [" " * indent + "# " + part for part in textwrap.wrap(note, width)]
        out.append(line)
    return "\n".join(out) + "\n"


def field_info(cls: type, dotted: str) -> tuple[Any, dict]:
    """The type and metadata of a dotted config path such as `distill.ackd.adv_weight`."""
    hints, meta = typing.get_type_hints(cls), {f.name: f.metadata for f in dataclasses.fields(cls)}
    head, _, rest = dotted.partition(".")
    if head not in hints:
        raise KeyError(dotted)
    tp = _strip_optional(hints[head])
    if rest:
        if not dataclasses.is_dataclass(tp):
            raise KeyError(dotted)
        return field_info(tp, rest)
    return hints[head], dict(meta[head])


def check_value(cls: type, dotted: str, value: Any, source: str) -> list[str]:
    """Problems with `value` as the value of `dotted` in `cls` (empty when it is legal)."""
    problems: list[str] = []
    tp, meta = field_info(cls, dotted)
    _convert(tp, value, dotted, source, problems, meta)
    return problems


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if _is_union(tp) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _allowed_text(tp: Any, meta: dict) -> str:
    if "choices_fn" in meta:
        return ", ".join(meta["choices_fn"]())
    if typing.get_origin(tp) is Literal:
        return ", ".join(str(a) for a in typing.get_args(tp))
    return ""


def _convert(tp: Any, value: Any, path: str, source: str, problems: list[str], meta: dict | None = None) -> Any:
    meta = meta or {}
    where = f"{source}: {path or '<top>'}"
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path, source, problems)
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            problems.append(f"{where}: {value!r} is not allowed; allowed: {_allowed_text(tp, meta)}")
        return value
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return value
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{path}[{i}]", source, problems) for i, v in enumerate(value)]
    value = _convert_scalar(tp, value, where, problems)
    if value is None:
        return None
    if "choices_fn" in meta and value not in meta["choices_fn"]():
        problems.append(f"{where}: unknown value {value!r}; allowed: {_allowed_text(tp, meta)}")
    _check_bounds(value, meta.get("bounds", {}), where, problems)
    return value


def _convert_scalar(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {value!r}")
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {value!r}")
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return None
        return float(value)
    if tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
            return None
        return value
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {value!r}")
            return None
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _check_bounds(value: Any, bounds: dict, where: str, problems: list[str]) -> None:
    failed = [k for k, b in bounds.items() if not _BOUND_OK[k](value, b)]
    if failed:
        allowed = " and ".join(f"{_BOUND_TEXT[k]} {b}" for k, b in bounds.items())
        problems.append(f"{where}: {value!r} is out of range; allowed: {allowed}")


def _convert_dataclass(cls: type, value: Any, path: str, source: str, problems: list[str]) -> Any:
    where = f"{source}: {path or '<top>'}"
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            problems.append(f"{source}: {_join(path, str(key))}: unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], _join(path, name), source, problems, dict(f.metadata))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError):
        return cls()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set `data['a']['b'] = value` for `dotted == 'a.b'`, creating mappings on the way."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def get_path(data: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[key]
    return data

