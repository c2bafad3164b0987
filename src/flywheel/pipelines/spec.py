"""Declarative pipelines: the YAML spec, its validation, and the sandboxed templating it uses.

A pipeline is a list of typed steps (retrieve, llm, prompt, json, tool, branch, map). Each
step's output becomes a variable (its ``id``, or the name in ``output:``) that later steps
read through Jinja templates rendered in the prompts' immutable sandbox. Validation is pydantic
(a discriminated union on ``type``) plus static checks: duplicate ids, unsafe or broken
templates, variables read before any step defines them, unknown tools, nesting depth. Every
problem names the source line, the step and the field.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from jinja2 import TemplateSyntaxError, meta, nodes
from jinja2.environment import TemplateExpression
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from flywheel.config.files import Location, _line_index, _line_of
from flywheel.pipelines.tools import get_tool, tool_names
from flywheel.prompts.templates import (
    _ENV,
    MAX_RENDERED_CHARS,
    TemplateError,
    _checked,
    _find_unsafe,
    _render_part,
)

STEP_TYPES = ("branch", "json", "llm", "map", "prompt", "retrieve", "tool")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
INPUT_TYPES = ("string", "number", "integer", "boolean", "object", "array")
MAX_DEPTH = 8
MAX_SPEC_CHARS = 1_000_000
# Request keys a step's params may not set: the step (or the runner) owns them.
RESERVED_PARAMS = frozenset({"model", "messages", "stream", "variables"})
PIPELINE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Names a template could not read back as a variable (Jinja literals, operators, globals).
_RESERVED_NAMES = frozenset(
    {"true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if"}
    | {"else", "elif", "for", "loop", "self", "caller", "varargs", "kwargs"}
    | set(_ENV.globals)
)


def _variable_name(value: str, what: str) -> str:
    if not _VARIABLE.match(value):
        raise ValueError(
            f"{what} {value!r} is not a variable name: a letter or underscore, then letters, "
            "digits or underscores (at most 64)"
        )
    if value in _RESERVED_NAMES:
        raise ValueError(f"{what} {value!r} is reserved in templates; choose another name")
    return value


# -- templates -------------------------------------------------------------------------------


def _native_node(tree: nodes.Template) -> nodes.Expr | None:
    """The expression of a template that is exactly one ``{{ expr }}``, else None."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], nodes.Output):
        return None
    parts = tree.body[0].nodes
    if len(parts) != 1 or isinstance(parts[0], nodes.TemplateData):
        return None
    return parts[0]


def _as_expression(expr: nodes.Expr) -> TemplateExpression:
    # What Environment.compile_expression does with its parsed expression; StrictUndefined
    # results are kept (undefined_to_none=False) so that they fail instead of becoming None.
    body = [nodes.Assign(nodes.Name("result", "store"), expr, lineno=1)]
    return TemplateExpression(_ENV.from_string(nodes.Template(body, lineno=1)), False)


@functools.lru_cache(maxsize=1024)
def _native_template(source: str) -> TemplateExpression | None:
    """The compiled expression of a single-``{{ expr }}`` template (a fresh parse: the
    compiler folds constants in place, so the shared checked tree is not handed to it)."""
    stripped = source.strip()
    if not (stripped.startswith("{{") and stripped.endswith("}}")):
        return None
    expr = _native_node(_ENV.parse(stripped))
    return None if expr is None else _as_expression(expr)


def _parse_expression(source: str) -> nodes.Expr:
    """A bare expression (``a.b == 1``) or a single ``{{ expr }}``; TemplateSyntaxError else."""
    stripped = source.strip()
    if stripped.startswith("{{"):
        expr = _native_node(_ENV.parse(stripped))
        if expr is None:
            raise TemplateSyntaxError("expected an expression or a single {{ expr }}", 1)
        return expr
    parser = Parser(_ENV, stripped, state="variable")
    expr = parser.parse_expression()
    if not parser.stream.eos:
        raise TemplateSyntaxError(
            "unexpected text after the expression", parser.stream.current.lineno
        )
    expr.set_environment(_ENV)
    return expr


@functools.lru_cache(maxsize=1024)
def _compiled_expression(source: str) -> TemplateExpression:
    return _as_expression(_parse_expression(source))


def _undeclared(tree: nodes.Template) -> set[str]:
    return meta.find_undeclared_variables(tree) - set(_ENV.globals)


def template_reads(source: str) -> set[str]:
    """Refuse a broken or unsafe template (:class:`TemplateError`); return what it reads."""
    ((_, _, tree),) = _checked(source)
    return _undeclared(tree)


def expression_reads(source: str) -> set[str]:
    """Refuse a broken or unsafe expression (:class:`TemplateError`); return what it reads."""
    try:
        expr = _parse_expression(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(exc.message or str(exc), "template_syntax", "expression") from None
    except RecursionError:
        raise TemplateError("nested too deeply", "template_syntax", "expression") from None
    tree = nodes.Template([nodes.Output([expr], lineno=1)], lineno=1)
    tree.set_environment(_ENV)
    if (found := _find_unsafe(tree)) is not None:
        raise TemplateError(found[0], "template_unsafe", "expression")
    return _undeclared(tree)


def _plain(value: Any) -> Any:
    """Jinja results as plain data: generators (``| map``), ranges and tuples become lists."""
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined raises UndefinedError with Jinja's own message
    if isinstance(value, range | tuple | Iterator):
        items = []
        for item in value:
            items.append(_plain(item))
            if len(items) > MAX_RENDERED_CHARS:
                raise TemplateError("the value has too many items", "render_too_large")
        return items
    return value


def _undefined_message(exc: UndefinedError) -> str:
    text = str(exc)
    match = re.match(r"^'([^']+)' is undefined$", text)
    return f"undefined variable {match.group(1)!r}" if match else f"undefined value: {text}"


@functools.lru_cache(maxsize=1024)
def _safe_template(source: str) -> None:
    _checked(source)


@functools.lru_cache(maxsize=1024)
def _safe_expression(source: str) -> None:
    expression_reads(source)


def _call(expression: TemplateExpression, variables: dict[str, Any]) -> Any:
    try:
        return _plain(expression(**variables))
    except TemplateError:
        raise
    except SecurityError as exc:
        raise TemplateError(str(exc), "template_unsafe") from None
    except UndefinedError as exc:
        raise TemplateError(_undefined_message(exc), "missing_variable") from None
    except Exception as exc:  # whatever the expression did: a message, not a traceback
        raise TemplateError(f"{type(exc).__name__}: {exc}"[:500], "render_failed") from None


def evaluate(source: str, variables: dict[str, Any]) -> Any:
    """Evaluate an expression in the sandbox; :class:`TemplateError` with a clear message."""
    _safe_expression(source)
    return _call(_compiled_expression(source), variables)


def _render_text(source: str, variables: dict[str, Any]) -> Any:
    _safe_template(source)  # refuses unsafe nodes even in a spec that skipped validation
    native = _native_template(source)
    if native is not None:
        return _call(native, variables)
    try:
        return _render_part("", source, variables, MAX_RENDERED_CHARS)
    except TemplateError as exc:
        if exc.code == "missing_variable" and exc.param:
            raise TemplateError(f"undefined variable {exc.param!r}", exc.code) from None
        raise


def render_value(value: Any, variables: dict[str, Any], where: Location = ()) -> Any:
    """Render a template value: strings are templates (exactly one ``{{ expr }}`` keeps the
    native value), dicts and lists recursively, anything else as is. A failure's message
    starts with the path of the failing string (``where`` + the path inside ``value``)."""
    if isinstance(value, dict):
        return {k: render_value(v, variables, (*where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [render_value(v, variables, (*where, i)) for i, v in enumerate(value)]
    if not isinstance(value, str) or "{" not in value:
        return value
    try:
        return _render_text(value, variables)
    except TemplateError as exc:
        if not where:
            raise
        raise TemplateError(f"{_field(where)}: {exc.message}", exc.code, exc.param) from None


# -- the spec --------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InputSpec(_Model):
    """One pipeline input; an input with a ``default`` is optional."""

    type: Literal["string", "number", "integer", "boolean", "object", "array"] = "string"
    required: bool = True
    default: Any = None
    description: str | None = None

    @model_validator(mode="after")
    def _default_makes_optional(self) -> InputSpec:
        if "default" in self.model_fields_set:
            self.required = False
            if self.default is not None and (
                problem := input_type_problem(self.type, self.default)
            ):
                raise ValueError(f"default: {problem}")
        return self


def input_type_problem(kind: str, value: Any) -> str | None:
    """Why ``value`` is not of the input type ``kind`` (None when it is)."""
    ok = {
        "string": isinstance(value, str),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[kind]
    article = "an" if kind[0] in "aeiou" else "a"
    return None if ok else f"expected {article} {kind}, got {type(value).__name__}"


class ChatMessage(_Model):
    """A chat message of an ``llm`` step; ``content`` is a template."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str


class _Step(_Model):
    id: str
    output: str | None = Field(default=None, description="the variable name (default: id)")
    description: str | None = None

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        return _variable_name(value, "step id")

    @field_validator("output")
    @classmethod
    def _output_is_a_name(cls, value: str | None) -> str | None:
        return None if value is None else _variable_name(value, "output variable")

    @property
    def variable(self) -> str:
        """The variable that holds this step's output."""
        return self.output or self.id


def _check_params(params: dict[str, Any]) -> dict[str, Any]:
    if taken := sorted(RESERVED_PARAMS & set(params)):
        raise ValueError(f"{', '.join(taken)} cannot be set in params")
    return params


class RetrieveStep(_Step):
    """Search a knowledge base; the output is the list of hits."""

    type: Literal["retrieve"]
    knowledge_base: str = Field(min_length=1)
    query: str
    top_k: int = Field(default=4, ge=1, le=100)
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"
    filters: dict[str, Any] | None = None


class LLMStep(_Step):
    """A chat completion through the gateway; the output is the answer text."""

    type: Literal["llm"]
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _params_allowed(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_params(value)


class PromptStep(_Step):
    """A call of a versioned prompt (``NAME``, ``NAME@LABEL`` or ``NAME@VERSION``)."""

    type: Literal["prompt"]
    prompt: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[A-Za-z0-9_-]{1,64})?$")
    variables: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _params_allowed(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_params(value)


class JsonStep(_Step):
    """Parse JSON out of a template's text (fences and leading prose tolerated)."""

    type: Literal["json"]
    input: str


class HttpCall(_Model):
    """An HTTP request made by the host (which applies its SSRF rules)."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)
    json_body: Any = Field(default=None, alias="json")
    body: str | None = None
    timeout: float = Field(default=10.0, gt=0, le=120)

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_body(self) -> HttpCall:
        if self.json_body is not None and self.body is not None:
            raise ValueError("give at most one of 'json' or 'body'")
        return self


class ToolStep(_Step):
    """An HTTP call or a registered Python tool; the output is its result."""

    type: Literal["tool"]
    http: HttpCall | None = None
    python: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one(self) -> ToolStep:
        if self.http is not None and self.python is not None:
            raise ValueError("'http' and 'python' are exclusive: give exactly one")
        if self.http is None and self.python is None:
            raise ValueError("give exactly one of 'http' or 'python'")
        if self.http is not None and self.args:
            raise ValueError("'args' are for python tools; an http tool takes url, json, body")
        return self


class BranchStep(_Step):
    """Run ``then`` when the ``if`` expression is truthy, else ``else``."""

    type: Literal["branch"]
    if_: str = Field(alias="if")
    then: list[Step] = Field(min_length=1)
    else_: list[Step] = Field(default_factory=list, alias="else")


class MapStep(_Step):
    """Run ``steps`` once per item of ``over``, at most ``concurrency`` at a time."""

    type: Literal["map"]
    over: str
    as_: str = Field(default="item", alias="as")
    steps: list[Step] = Field(min_length=1)
    concurrency: int = Field(default=4, ge=1, le=64)

    @field_validator("as_")
    @classmethod
    def _as_is_a_name(cls, value: str) -> str:
        return _variable_name(value, "loop variable")


Step = Annotated[
    RetrieveStep | LLMStep | PromptStep | JsonStep | ToolStep | BranchStep | MapStep,
    Field(discriminator="type"),
]
BranchStep.model_rebuild()
MapStep.model_rebuild()


class PipelineSpec(_Model):
    """A validated pipeline; build one with :func:`parse_pipeline` or
    :func:`validate_pipeline`, which add the static checks to the schema."""

    name: str = Field(pattern=PIPELINE_NAME_PATTERN)
    description: str = ""
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    steps: list[Step] = Field(min_length=1)
    output: str | None = None
    output_expr: str | None = None

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_shorthand(cls, value: Any) -> Any:
        # A list of names means required strings; `name: integer` means {type: integer}.
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return {name: {} for name in value}
        if isinstance(value, dict):
            return {
                k: ({} if v is None else {"type": v} if isinstance(v, str) else v)
                for k, v in value.items()
            }
        return value

    @field_validator("inputs")
    @classmethod
    def _input_names(cls, value: dict[str, InputSpec]) -> dict[str, InputSpec]:
        for name in value:
            _variable_name(name, "input")
        return value

    @model_validator(mode="after")
    def _one_output(self) -> PipelineSpec:
        if self.output is not None and self.output_expr is not None:
            raise ValueError("give at most one of 'output' or 'output_expr'")
        return self

    def yaml(self) -> str:
        """The spec as YAML that :func:`parse_pipeline` reads back to an equal spec."""
        data = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)

    def step_ids(self) -> list[str]:
        """Every step id, nested ones included, in document order."""
        return [step.id for step, _, _ in walk_steps(self.steps)]


def walk_steps(
    steps: list[Step], loc: Location = ("steps",), depth: int = 1
) -> Iterator[tuple[Step, Location, int]]:
    """(step, location in the document, nesting depth) for every step, depth first."""
    for i, step in enumerate(steps):
        here = (*loc, i)
        yield step, here, depth
        if isinstance(step, BranchStep):
            yield from walk_steps(step.then, (*here, "then"), depth + 1)
            yield from walk_steps(step.else_, (*here, "else"), depth + 1)
        elif isinstance(step, MapStep):
            yield from walk_steps(step.steps, (*here, "steps"), depth + 1)


# -- problems --------------------------------------------------------------------------------


class PipelineSpecError(ValueError):
    """An invalid pipeline; ``problems`` holds one ``source:line: step: field: what`` each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _field(loc: Location) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass
class _Reporter:
    source: str
    index: dict[Location, int] | None
    problems: list[str]

    def add(
        self,
        loc: Location,
        step: str | None,
        field: Location,
        message: str,
        line_at: Location | None = None,
    ) -> None:
        where = self.source
        if self.index is not None:
            where += f":{_line_of(line_at or (*loc, *field), self.index)}"
        parts = [where, *([step] if step else []), *([_field(field)] if field else []), message]
        self.problems.append(": ".join(parts))

    def line(self, loc: Location) -> int | None:
        return None if self.index is None else _line_of(loc, self.index)


def _step_label(raw: Any, where: Location) -> str:
    """``step 'id' (type)`` for a raw step, as far as it can be told."""
    step_id = raw.get("id") if isinstance(raw, dict) else None
    name = f"step {step_id!r}" if isinstance(step_id, str) else f"step at {_field(where)}"
    kind = raw.get("type") if isinstance(raw, dict) else None
    return f"{name} ({kind})" if isinstance(kind, str) and kind in STEP_TYPES else name


def _child_step_lists(raw: dict[str, Any]) -> tuple[str, ...]:
    kind = raw.get("type")
    return ("then", "else") if kind == "branch" else ("steps",) if kind == "map" else ()


def _get(data: Any, part: str | int) -> Any:
    try:
        return data[part]
    except (KeyError, IndexError, TypeError):
        return None


def _split_loc(data: Any, loc: tuple[Any, ...]) -> tuple[Location, str | None, Location]:
    """Split a pydantic error location into (document path of the innermost step, its label,
    the field path inside it); the discriminator tag pydantic puts in the location is dropped."""
    parts = [p for p in loc if not (isinstance(p, str) and p.startswith("function-"))]
    path: list[str | int] = []
    step_end: int | None = None  # len(path) at the innermost step
    label: str | None = None
    cursor: Any = data
    in_step_list = False  # whether cursor is a list of steps
    i = 0
    while i < len(parts):
        part, parent = parts[i], cursor
        cursor = _get(parent, part)
        path.append(part)
        if in_step_list and isinstance(part, int):
            step_end, label = len(path), _step_label(cursor, tuple(path))
            kind = cursor.get("type") if isinstance(cursor, dict) else None
            if i + 1 < len(parts) and parts[i + 1] == kind:
                i += 1
            in_step_list = False
        else:
            top_steps = len(path) == 1 and part == "steps"
            child_steps = (
                step_end == len(path) - 1
                and isinstance(parent, dict)
                and part in _child_step_lists(parent)
            )
            in_step_list = top_steps or child_steps
        i += 1
    if step_end is None:
        return (), None, tuple(path)
    return tuple(path[:step_end]), label, tuple(path[step_end:])


def _describe_error(err: dict[str, Any]) -> str:
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = err.get("ctx", {}).get("tag")
        known = ", ".join(STEP_TYPES)
        if err["type"] == "union_tag_not_found":
            return f"type: missing (known: {known})"
        return f"unknown step type {tag!r} (known: {known})"
    return str(err["msg"]).removeprefix("Value error, ")


def _too_deep(data: dict[str, Any], report: _Reporter) -> bool:
    """Refuse nesting past MAX_DEPTH before pydantic recurses into it."""

    def visit(steps: Any, loc: Location, depth: int) -> bool:
        if not isinstance(steps, list):
            return False
        for i, raw in enumerate(steps):
            if not isinstance(raw, dict):
                continue
            for key in _child_step_lists(raw):
                if isinstance(raw.get(key), list) and raw[key]:
                    if depth + 1 > MAX_DEPTH:
                        report.add(
                            (*loc, i),
                            _step_label(raw, (*loc, i)),
                            (key,),
                            f"steps are nested more than {MAX_DEPTH} levels deep",
                        )
                        return True
                    if visit(raw[key], (*loc, i, key), depth + 1):
                        return True
        return False

    return visit(data.get("steps"), ("steps",), 1)


# -- static checks ---------------------------------------------------------------------------


def _template_fields(step: Step) -> Iterator[tuple[Location, str, bool]]:
    """(field path, source, is_expression) for every template or expression of a step."""

    def nested(value: Any, where: Location) -> Iterator[tuple[Location, str, bool]]:
        if isinstance(value, str):
            yield where, value, False
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from nested(item, (*where, str(key)))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                yield from nested(item, (*where, i))

    if isinstance(step, RetrieveStep):
        yield ("query",), step.query, False
        yield from nested(step.filters, ("filters",))
    elif isinstance(step, LLMStep):
        for i, message in enumerate(step.messages):
            yield ("messages", i, "content"), message.content, False
        yield from nested(step.params, ("params",))
    elif isinstance(step, PromptStep):
        yield from nested(step.variables, ("variables",))
        yield from nested(step.params, ("params",))
    elif isinstance(step, JsonStep):
        yield ("input",), step.input, False
    elif isinstance(step, ToolStep):
        if step.http is not None:
            yield ("http", "url"), step.http.url, False
            yield from nested(step.http.headers, ("http", "headers"))
            yield from nested(step.http.json_body, ("http", "json"))
            if step.http.body is not None:
                yield ("http", "body"), step.http.body, False
        yield from nested(step.args, ("args",))
    elif isinstance(step, BranchStep):
        yield ("if",), step.if_, True
    elif isinstance(step, MapStep):
        yield ("over",), step.over, True


class _Checker:
    def __init__(self, report: _Reporter) -> None:
        self.report = report
        self.seen: dict[str, Location] = {}

    def reads(
        self,
        loc: Location,
        label: str | None,
        field: Location,
        source: str,
        expression: bool,
        defined: dict[str, None],
    ) -> None:
        try:
            names = expression_reads(source) if expression else template_reads(source)
        except TemplateError as exc:
            self.report.add(loc, label, field, exc.message)
            return
        if missing := sorted(names - set(defined)):
            s = "s" if len(missing) > 1 else ""
            so_far = ", ".join(defined) or "nothing"
            self.report.add(
                loc,
                label,
                field,
                f"undefined variable{s} {', '.join(map(repr, missing))} (defined so far: {so_far})",
            )

    def steps(self, steps: list[Step], loc: Location, defined: dict[str, None]) -> None:
        """Check ``steps`` in order; ``defined`` grows with each step's output variable."""
        for i, step in enumerate(steps):
            here = (*loc, i)
            label = f"step {step.id!r} ({step.type})"
            if step.id in self.seen:
                first = self.report.line(self.seen[step.id])
                where = f"line {first}" if first is not None else _field(self.seen[step.id])
                self.report.add(here, label, ("id",), f"duplicate step id (first used at {where})")
            else:
                self.seen[step.id] = here
            for field, source, expression in _template_fields(step):
                self.reads(here, label, field, source, expression, defined)
            if isinstance(step, ToolStep) and step.python is not None:
                self.tool(here, label, step.python, step.args)
            if isinstance(step, BranchStep):
                # Each arm sees what was defined before the branch; afterwards a variable
                # defined in either arm counts as (maybe) defined.
                arms = []
                for key, arm in (("then", step.then), ("else", step.else_)):
                    scope = dict(defined)
                    self.steps(arm, (*here, key), scope)
                    arms.append(scope)
                for scope in arms:
                    defined.update(scope)
            elif isinstance(step, MapStep):
                scope = {**defined, step.as_: None, "index": None}
                self.steps(step.steps, (*here, "steps"), scope)
            defined[step.variable] = None

    def tool(self, loc: Location, label: str, name: str, args: dict[str, Any]) -> None:
        try:
            function = get_tool(name)
        except KeyError:
            known = ", ".join(tool_names()) or "none"
            self.report.add(loc, label, ("python",), f"unknown tool {name!r} (known: {known})")
            return
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return  # some builtins have no signature: checked when called
        try:
            signature.bind(**dict.fromkeys(args))
        except TypeError as exc:
            self.report.add(loc, label, ("args",), f"tool {name!r}: {exc}")


def _validate(data: Any, source: str, index: dict[Location, int] | None) -> PipelineSpec:
    report = _Reporter(source, index, [])
    if not isinstance(data, dict):
        report.add((), None, (), "a pipeline is a mapping (name, inputs, steps, output)")
        raise PipelineSpecError(report.problems)
    if _too_deep(data, report):
        raise PipelineSpecError(report.problems)
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc, label, field = _split_loc(data, err["loc"])
            # A bad step type is reported on its `type:` line rather than the step's first.
            tagged = err["type"] == "union_tag_invalid" and not field
            line_at = (*loc, "type") if tagged else None
            report.add(loc, label, field, _describe_error(dict(err)), line_at)
        raise PipelineSpecError(report.problems) from None
    checker = _Checker(report)
    defined = dict.fromkeys(spec.inputs)
    checker.steps(spec.steps, ("steps",), defined)
    if spec.output is not None:
        checker.reads((), None, ("output",), spec.output, False, defined)
    if spec.output_expr is not None:
        checker.reads((), None, ("output_expr",), spec.output_expr, True, defined)
    if report.problems:
        raise PipelineSpecError(report.problems)
    return spec


def validate_pipeline(data: dict[str, Any], source: str = "pipeline") -> PipelineSpec:
    """Validate parsed data (e.g. from JSON); :class:`PipelineSpecError` lists every problem."""
    return _validate(data, source, None)


def parse_pipeline(text: str, source: str = "pipeline.yaml") -> PipelineSpec:
    """Parse and validate YAML; every problem names ``source:line``, the step and the field."""
    if len(text) > MAX_SPEC_CHARS:
        raise PipelineSpecError(
            [f"{source}:1: the pipeline is longer than {MAX_SPEC_CHARS} characters"]
        )
    try:
        # Aliases let a small document expand into a huge one (billion laughs); specs need
        # none, so they are refused from the event stream before anything is built.
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark else 1
                raise PipelineSpecError([f"{source}:{line}: YAML aliases (*name) are not allowed"])
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data: Any = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PipelineSpecError([f"{source}:{line}: invalid YAML: {exc.problem or exc}"]) from None
    except yaml.YAMLError as exc:
        raise PipelineSpecError([f"{source}:1: invalid YAML: {exc}"]) from None
    index: dict[Location, int] = {}
    if root is not None:
        _line_index(root, (), index)
    return _validate(data, source, index)


__all__ = [
    "HTTP_METHODS",
    "INPUT_TYPES",
    "MAX_DEPTH",
    "STEP_TYPES",
    "BranchStep",
    "ChatMessage",
    "HttpCall",
    "InputSpec",
    "JsonStep",
    "LLMStep",
    "MapStep",
    "PipelineSpec",
    "PipelineSpecError",
    "PromptStep",
    "RetrieveStep",
    "Step",
    "ToolStep",
    "evaluate",
    "expression_reads",
    "input_type_problem",
    "parse_pipeline",
    "render_value",
    "template_reads",
    "validate_pipeline",
    "walk_steps",
]
