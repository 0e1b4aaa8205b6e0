"""Strict YAML: safe loading that refuses duplicate keys and names the file, line and column of a problem; a run
config written back as readable YAML with comments above chosen keys."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import yaml

from ackd_search.config.convert import from_dict, get_path, to_dict
from ackd_search.config.schema import RunConfig
from ackd_search.errors import ConfigError


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

