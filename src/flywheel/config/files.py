"""Loading ``flywheel.yaml`` with errors that name the file, the line and the problem."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flywheel.config.schema import FlywheelConfig

Location = tuple[str | int, ...]


class ConfigError(ValueError):
    """An invalid config file; ``problems`` holds one ``file:line: where: what`` line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _line_index(node: yaml.Node, path: Location, index: dict[Location, int]) -> None:
    index[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            name = key.value
            index[(*path, name)] = key.start_mark.line + 1
            _line_index(value, (*path, name), index)
            index[(*path, name)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), index)


def _line_of(loc: Location, index: dict[Location, int]) -> int:
    # The deepest located ancestor: a missing key is reported on its parent's line.
    for end in range(len(loc), -1, -1):
        if loc[:end] in index:
            return index[loc[:end]]
    return 1


def _where(loc: Location) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def describe_problem(text: str, filename: str, loc: Location, message: str) -> str:
    """``file:line: where: what`` for a problem found at ``loc`` of the document ``text``."""
    index: dict[Location, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None
    if root is not None:
        _line_index(root, (), index)
    return f"{filename}:{_line_of(loc, index)}: {_where(loc)}: {message}"


def load_config_text(text: str, filename: str = "flywheel.yaml") -> FlywheelConfig:
    """Parse and validate config text; raise :class:`ConfigError` naming file, line and problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{filename}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{filename}:1: the top level must be a mapping"])
    index: dict[Location, int] = {}
    if root is not None:
        _line_index(root, (), index)
    try:
        config = FlywheelConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(
                p for p in err["loc"] if not isinstance(p, str) or not p.startswith("function-")
            )
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{filename}:{_line_of(loc, index)}: {_where(loc)}: {message}")
        raise ConfigError(problems) from None
    errors = config.reference_errors()
    if "models" not in config.model_fields_set:
        # A partial file (routes without the catalog) is checked against the running
        # catalog when it is applied, not against nothing here.
        errors = [(loc, msg) for loc, msg in errors if loc[0] not in ("routes", "models")]
    problems = [f"{filename}:{_line_of(loc, index)}: {_where(loc)}: {msg}" for loc, msg in errors]
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: Path | None) -> FlywheelConfig:
    """Load ``path``, or the built-in defaults (a local chat model and embedder) when None."""
    if path is None:
        text = resources.files("flywheel").joinpath("defaults/flywheel.yaml").read_text("utf-8")
        return load_config_text(text, "<built-in flywheel.yaml>")
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}:0: cannot read the file: {exc.strerror}"]) from None
    return load_config_text(text, str(path))
