"""YAML config files and dotted ``--set`` overrides, into a :class:`~finetune.config.schema.Config`.

Every problem in a config is collected and reported together in one :class:`FinetuneError` that names the
file, line and key.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from finetune.config.schema import Config, is_weights_name
from finetune.errors import FinetuneError, Problem

# Keys holding paths; in a config file they are relative to the file's folder.
PATH_KEYS = ("model.weights", "data.root", "data.labels", "train.output_dir", "train.mlflow.tracking_uri")
# A tracking URI with a scheme (http://, file:, sqlite:, databricks://) or MLflow's bare "databricks" is no path.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:|^databricks$")


class _Source:
    """Remembers which file, line or --set option each key came from."""

    def __init__(self, path: Optional[Path], lines: dict[str, int], overridden: set[str]):
        self.path, self.lines, self.overridden = path, lines, overridden

    def where(self, key: str) -> str:
        base = key.split("[", 1)[0]
        for set_key in sorted(self.overridden, key=len, reverse=True):
            if set_key in (key, base) or set_key.startswith(base + ".") or base.startswith(set_key + "."):
                return f"--set {set_key}"
        parts = base.split(".")
        for candidate in [key] + [".".join(parts[:i]) for i in range(len(parts), 0, -1)]:
            if candidate in self.lines:
                return f"{self.path}:{self.lines[candidate]}"
        return str(self.path) if self.path else "--set"


def all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema, e.g. ``optim.lr``."""
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += all_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``KEY=VALUE`` overrides.

    Raises FinetuneError listing every problem found.
    """
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        raw, lines = _read_yaml(path)
        _resolve_paths(raw, path.parent)
    overridden = set()
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        overridden.add(key)
    source = _Source(path, lines, overridden)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        raise FinetuneError(_format_problems(path, [_describe(e, source) for e in exc.errors()])) from None
    _resolve_paths_of(config)
    config._source = source
    return config


def config_error(config: Config, problems: list[Problem]) -> FinetuneError:
    """A FinetuneError for problems found after the schema check, each under the file and line of its key."""
    return FinetuneError(_format_problems(config.path, [f"{config.where(k)}  {k}: {m}" for k, m in problems]))


def raise_problems(config: Config, problems: list[Problem]) -> None:
    """Raise :func:`config_error` for ``problems``, if there are any."""
    if problems:
        raise config_error(config, problems)


def _read_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    if not path.is_file():
        raise FinetuneError(f"Config file not found: {path}\nCheck the path given to --config.")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise FinetuneError(f"Invalid YAML in {where}: {problem}\nFix the syntax at that line.") from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise FinetuneError(f"Invalid config {path}: the top level must be a mapping of sections "
                            f"(model, data, freeze, optim, train), not a {type(raw).__name__}.")
    return raw, _key_lines(node)


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    """The line of every key (``optim.lr``) and list item (``freeze.trainable[1]``) in a YAML node."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[f"{prefix.rstrip('.')}[{i}]"] = item.start_mark.line + 1
    return lines


def _resolve_paths(raw: dict, folder: Path) -> None:
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        value = node.get(name) if isinstance(node, dict) else None
        if _is_path(key, value):
            node[name] = str((folder / _expand_user(value)).resolve())


def _resolve_paths_of(config: Config) -> None:
    """Make every path absolute; what is still relative here came from the defaults: the current directory."""
    for key in PATH_KEYS:
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = getattr(node, section)
        value = getattr(node, name)
        if _is_path(key, value) and not Path(value).is_absolute():
            setattr(node, name, str(_expand_user(value).resolve()))


def _expand_user(value: str) -> Path:
    """``~`` and ``~user`` become home folders; nothing else is expanded (``$HOME`` stays literal: no shell).

    An unknown ``~user`` stays literal too, as in a shell, where ``Path.expanduser`` would raise.
    """
    return Path(os.path.expanduser(value))


def _is_path(key: str, value) -> bool:
    if key == "train.mlflow.tracking_uri" and isinstance(value, str) and _URI.match(value):
        return False
    return isinstance(value, str) and not is_weights_name(value) and value != "none"


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FinetuneError(f"Invalid --set {item!r}: expected KEY=VALUE with a dotted key, "
                            "e.g. --set optim.lr=0.001")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise FinetuneError(f"Invalid --set {item!r}: the value is not valid YAML ({exc.problem}).") from None
    if key in PATH_KEYS and _is_path(key, parsed):
        parsed = str(_expand_user(parsed).resolve())  # relative to the current directory
    return key, parsed


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise FinetuneError(f"Invalid --set {key}: {'.'.join(parts[:i + 1])} is not a section.")
        node = child
    node[parts[-1]] = value


def _describe(error: dict, source: _Source) -> str:
    key = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in error["loc"]).replace(".[", "[")
    where = source.where(key)
    if error["type"] == "extra_forbidden":
        return f"{where}  {key}: unknown key{_suggest(key)}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}  {key}: required"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{where}  {key}: {message}{shown}"


def _suggest(key: str) -> str:
    keys = all_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # a key in the wrong section, e.g. 'lr' at the top level
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[near[0]]] if near else []
    return f"; did you mean '{close[0]}'?" if close else f"; valid sections are {', '.join(Config.model_fields)}"


def _format_problems(path: Optional[Path], problems: list[str]) -> str:
    name = str(path) if path else "(defaults and --set)"
    noun = "problem" if len(problems) == 1 else "problems"
    body = "\n".join(f"  {p}" for p in problems)
    return f"Invalid config {name} ({len(problems)} {noun}):\n{body}"
