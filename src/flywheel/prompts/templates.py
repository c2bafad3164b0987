"""Prompt templates: check, introspect and render Jinja text or chat templates, sandboxed.

Templates come from users, so they are checked when a version is stored (shape, syntax and a
static refusal of private-attribute access and template loading) and rendered in Jinja's
immutable sandbox, which refuses at render time what the static walk cannot see. Variable
values are plain data: they are substituted once and never evaluated as template source.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Sized
from typing import Any, NoReturn

import jsonschema
from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2 import Template as JinjaTemplate
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = dict[str, str]
Template = str | list[Message]
ROLES = ("system", "developer", "user", "assistant")
MAX_RENDERED_CHARS = 200_000
_MAX_EXPONENT = 1000  # bounds `10 ** 10 ** 10`, which would otherwise hang a worker


class TemplateError(ValueError):
    """A template or its variables refused; the HTTP edge answers 400 with code and param."""

    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class _Environment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, plus bounds on `*`/`**` and no way to load other templates."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        # The sandbox bounds range() but not repetition or powers: `'a' * 10**12` is one
        # allocation, so it must be refused before it happens, not when the output is counted.
        if operator == "*" and isinstance(left, int) and isinstance(right, Sized):
            left, right = right, left
        if (
            operator == "*"
            and isinstance(left, Sized)
            and isinstance(right, int)
            and len(left) * right > MAX_RENDERED_CHARS
        ):
            raise TemplateError(_too_large(), "render_too_large", "template")
        if operator == "**" and isinstance(right, int) and right > _MAX_EXPONENT:
            raise SecurityError(f"exponents above {_MAX_EXPONENT} are not allowed")
        return super().call_binop(context, operator, left, right)

    def get_template(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise SecurityError(_NO_LOADER)

    select_template = get_or_select_template = get_template


_NO_LOADER = "templates cannot load other templates (there is no loader)"
_ENV = _Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
_LOADING_TAGS: dict[type[nodes.Node], str] = {
    nodes.Import: "import",
    nodes.FromImport: "from",
    nodes.Include: "include",
    nodes.Extends: "extends",
}
_SCHEMA = "invalid_schema"
_UNDEFINED_NAME = re.compile(r"^'([^']+)' is undefined$")


def _too_large() -> str:
    return f"The rendered prompt is longer than {MAX_RENDERED_CHARS} characters."


def _parts(template: Template) -> list[tuple[str, str]]:
    """(where, source) for each part; `where` prefixes error messages ("" for a text template)."""
    if isinstance(template, str):
        return [("", template)]
    if not isinstance(template, list) or not template:
        raise TemplateError(
            "A template is a string or a non-empty list of {role, content} messages.",
            "invalid_template",
            "template",
        )
    parts = []
    for i, message in enumerate(template):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            got = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise TemplateError(
                f"{where}: a message is an object with exactly 'role' and 'content' (got {got}).",
                "invalid_template",
                "template",
            )
        if message["role"] not in ROLES:
            raise TemplateError(
                f"{where}: role must be one of {', '.join(ROLES)}.", "invalid_template", "template"
            )
        if not isinstance(message["content"], str):
            raise TemplateError(
                f"{where}: content must be a string.", "invalid_template", "template"
            )
        parts.append((where, message["content"]))
    return parts


def _at(where: str, line: int | None) -> str:
    return ", ".join(p for p in (where, f"line {line}" if line else "") if p) or "template"


@functools.lru_cache(maxsize=512)
def _parse(source: str) -> nodes.Template:
    return _ENV.parse(source)


@functools.lru_cache(maxsize=512)
def _compile(source: str) -> JinjaTemplate:
    return _ENV.from_string(source)


def _find_unsafe(node: nodes.Node) -> tuple[str, int] | None:
    """The first refused construct, children first so `''.__class__.__mro__` names __class__."""
    for child in node.iter_child_nodes():
        if (found := _find_unsafe(child)) is not None:
            return found
    name: str | None = None
    if isinstance(node, nodes.Getattr):
        name = node.attr
    elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
        name = node.arg.value if isinstance(node.arg.value, str) else None
    if name is not None and name.startswith("_"):
        return f"access to {name!r} is not allowed in templates", node.lineno
    if tag := _LOADING_TAGS.get(type(node)):
        return f"'{{% {tag} %}}' is not allowed: {_NO_LOADER}", node.lineno
    return None


def _refuse_unsafe(where: str, tree: nodes.Template) -> None:
    if (found := _find_unsafe(tree)) is not None:
        message, line = found
        raise TemplateError(f"{_at(where, line)}: {message}", "template_unsafe", "template")


def _checked(template: Template) -> list[tuple[str, str, nodes.Template]]:
    checked = []
    for where, source in _parts(template):
        try:
            tree = _parse(source)
            _refuse_unsafe(where, tree)
        except TemplateSyntaxError as e:
            raise TemplateError(
                f"{_at(where, e.lineno)}: {e.message}", "template_syntax", "template"
            ) from None
        except RecursionError:  # Jinja's parser recurses; a pathological nesting must not 500
            raise TemplateError(
                f"{_at(where, None)}: nested too deeply", "template_syntax", "template"
            ) from None
        checked.append((where, source, tree))
    return checked


def check_template(template: Template) -> None:
    """Refuse a malformed, syntactically invalid or unsafe template (before it is stored)."""
    _checked(template)


def template_variables(template: Template) -> list[str]:
    """The sorted variables the template reads (Jinja globals such as `range` excluded)."""
    names: set[str] = set()
    for _, _, tree in _checked(template):
        names |= meta.find_undeclared_variables(tree)
    return sorted(names - set(_ENV.globals))


def infer_schema(template: Template) -> dict[str, Any]:
    """A JSON Schema requiring exactly the template's variables, of any type."""
    names = template_variables(template)
    return {
        "type": "object",
        "properties": {name: {} for name in names},
        "required": names,
        "additionalProperties": False,
    }


def check_schema(schema: dict[str, Any]) -> None:
    """Refuse anything but a valid Draft 2020-12 JSON Schema of type "object"."""
    if not isinstance(schema, dict):
        raise TemplateError("The variables schema must be a JSON object.", _SCHEMA, "variables")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise TemplateError(
            f"Invalid variables schema: {e.message}", _SCHEMA, "variables"
        ) from None
    if schema.get("type") != "object":
        raise TemplateError('The variables schema needs "type": "object".', _SCHEMA, "variables")


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names)


def validate_variables(schema: dict[str, Any], variables: dict[str, Any]) -> dict[str, Any]:
    """Check variables against the schema; return them with the schema's defaults filled in."""
    check_schema(schema)
    if not isinstance(variables, dict):
        raise TemplateError("Variables must be a JSON object.", "invalid_variable", "variables")
    properties: dict[str, Any] = schema.get("properties", {})
    filled = dict(variables)
    for name, prop in properties.items():
        if name not in filled and isinstance(prop, dict) and "default" in prop:
            filled[name] = copy.deepcopy(prop["default"])  # a mutable default is never shared
    if missing := [n for n in schema.get("required", []) if n not in filled]:
        s = "s" if len(missing) > 1 else ""
        raise TemplateError(
            f"Missing variable{s} {_quoted(missing)} (required by the prompt).",
            "missing_variable",
            missing[0],
        )
    closed = schema.get("additionalProperties") is False and "patternProperties" not in schema
    if closed and (extra := sorted(n for n in filled if n not in properties)):
        s = "s" if len(extra) > 1 else ""
        takes = ", ".join(properties) if properties else "no variables"
        raise TemplateError(
            f"Unknown variable{s} {_quoted(extra)}; the prompt takes: {takes}.",
            "extra_variable",
            extra[0],
        )
    try:
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(filled)
        )
    except Exception as e:  # e.g. an unresolvable $ref: the schema's fault, not the caller's
        raise TemplateError(
            f"The variables schema cannot be applied: {e}", _SCHEMA, "variables"
        ) from e
    if error is not None:
        path = ".".join(str(p) for p in error.absolute_path) or None
        detail = error.message if len(error.message) <= 300 else error.message[:300] + "..."
        subject = f"Variable {path!r} is" if path else "The variables are"
        raise TemplateError(f"{subject} invalid: {detail}", "invalid_variable", path)
    return filled


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised on (Jinja rewrites tracebacks to show it)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _render_part(where: str, source: str, variables: dict[str, Any], budget: int) -> str:
    chunks: list[str] = []
    try:
        # Streamed so a runaway loop is stopped at the size limit, not after filling memory.
        for chunk in _compile(source).generate(variables):
            budget -= len(chunk)
            if budget < 0:
                raise TemplateError(_too_large(), "render_too_large", "template")
            chunks.append(chunk)
    except TemplateError:
        raise
    except SecurityError as e:
        at = _at(where, _template_line(e))
        raise TemplateError(f"{at}: {e}", "template_unsafe", "template") from None
    except UndefinedError as e:
        at, text = _at(where, _template_line(e)), str(e)
        if "unsafe" in text:
            raise TemplateError(f"{at}: {text}", "template_unsafe", "template") from None
        if named := _UNDEFINED_NAME.match(text):
            name = named.group(1)
            raise TemplateError(
                f"Missing variable {name!r} (required by the prompt).", "missing_variable", name
            ) from None
        raise TemplateError(f"{at}: missing value: {text}", "missing_variable") from None
    except Exception as e:  # anything else the template did: a clear message, no traceback
        at = _at(where, _template_line(e))
        raise TemplateError(
            f"{at}: rendering failed: {type(e).__name__}: {e}"[:500], "render_failed", "template"
        ) from None
    return "".join(chunks)


def render(
    template: Template, variables: dict[str, Any], schema: dict[str, Any] | None = None
) -> Template:
    """Render a text template to a string, or chat messages to messages with rendered content.

    Variables are validated against ``schema`` (default: ``infer_schema(template)``) first.
    """
    checked = _checked(template)
    filled = validate_variables(infer_schema(template) if schema is None else schema, variables)
    budget, rendered = MAX_RENDERED_CHARS, []
    for where, source, _ in checked:
        rendered.append(_render_part(where, source, filled, budget))
        budget -= len(rendered[-1])
    if isinstance(template, str):
        return rendered[0]
    return [{"role": m["role"], "content": c} for m, c in zip(template, rendered, strict=True)]


def render_messages(
    template: Template, variables: dict[str, Any], schema: dict[str, Any] | None = None
) -> list[Message]:
    """Like :func:`render`, but a text template becomes one user message."""
    out = render(template, variables, schema)
    return [{"role": "user", "content": out}] if isinstance(out, str) else out
