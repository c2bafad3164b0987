"""Loading ``flywheel.yaml`` with errors that name the file, the line and the problem."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from flywheel.config.schema import FlywheelConfig

Location = tuple[str | int, ...]
# What YAML counts as a line break (its marks number lines by these).
_LINE_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")


class ConfigError(ValueError):
    """An invalid config file; ``problems`` holds one ``file:line: where: what`` line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _line_index(
    node: yaml.Node,
    path: Location,
    index: dict[Location, int],
    seen: set[int] | None = None,
) -> None:
    index[path] = node.start_mark.line + 1
    # An alias is the node it names: indexing it once keeps a document of aliases of
    # aliases (a "billion laughs") linear, and a recursive alias finite.
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # a complex key: safe_load refuses it as unhashable
            name = key.value
            index[(*path, name)] = key.start_mark.line + 1
            _line_index(value, (*path, name), index, seen)
            index[(*path, name)] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_index(item, (*path, i), index, seen)


def _parse(text: str, filename: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the data of ``text``; a ConfigError naming the
    line for anything that is not YAML."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{filename}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.reader.ReaderError as exc:
        # A character YAML does not allow (a control character, a lone surrogate).
        line = len(_LINE_BREAK.split(text[: exc.position]))
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else exc.character
        raise ConfigError(
            [f"{filename}:{line}: invalid YAML: character {char} is not allowed"]
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{filename}:1: invalid YAML: {exc}"]) from None
    except RecursionError:
        # The parser recurses per nesting level; no config nests anywhere near that deep.
        raise ConfigError([f"{filename}:1: invalid YAML: nested too deeply"]) from None


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
    except (yaml.YAMLError, RecursionError):
        root = None
    if root is not None:
        _line_index(root, (), index)
    return f"{filename}:{_line_of(loc, index)}: {_where(loc)}: {message}"


def load_config_text(text: str, filename: str = "flywheel.yaml") -> FlywheelConfig:
    """Parse and validate config text; raise :class:`ConfigError` naming file, line and problem."""
    root, data = _parse(text, filename)
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
