"""Prompt templates: checking, variables, schemas, sandboxed rendering (pure unit tests)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flywheel.prompts import templates
from flywheel.prompts.templates import (
    MAX_RENDERED_CHARS,
    TemplateError,
    check_schema,
    check_template,
    infer_schema,
    render,
    render_messages,
    template_variables,
    validate_variables,
)


def refused(code: str, fn: Any, *args: Any) -> TemplateError:
    with pytest.raises(TemplateError) as info:
        fn(*args)
    assert info.value.code == code, info.value.message
    return info.value


CHAT = [
    {"role": "system", "content": "You answer in {{ lang }}."},
    {"role": "user", "content": "{{ question }}"},
]

# -- rendering --------------------------------------------------------------------------------


def test_text_template_renders_and_keeps_trailing_newline() -> None:
    assert render("Hello {{ name }}!\n", {"name": "Ada"}) == "Hello Ada!\n"
    assert render_messages("Hi {{ n }}", {"n": 1}) == [{"role": "user", "content": "Hi 1"}]


def test_chat_template_renders_each_message() -> None:
    out = render(CHAT, {"lang": "French", "question": "Why?"})
    assert out == [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Why?"},
    ]
    assert render_messages(CHAT, {"lang": "x", "question": "y"})[1] == {
        "role": "user",
        "content": "y",
    }


def test_values_are_data_not_template_source() -> None:
    assert render("{{ v }}", {"v": "{{ 7*7 }}{% if 1 %}x{% endif %}"}) == (
        "{{ 7*7 }}{% if 1 %}x{% endif %}"
    )
    assert render("{{ v }}", {"v": "<b>&</b>"}) == "<b>&</b>"  # no HTML autoescape


def test_schema_defaults_are_filled_and_not_shared() -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"tone": {"type": "string", "default": "kind"}, "tags": {"default": []}},
        "additionalProperties": False,
    }
    assert render("Be {{ tone }}.", {}, schema) == "Be kind."
    assert render("Be {{ tone }}.", {"tone": "brief"}, schema) == "Be brief."
    filled = validate_variables(schema, {})
    filled["tags"].append(1)
    assert schema["properties"]["tags"]["default"] == []


def test_variables_and_inferred_schema() -> None:
    tpl = [
        {
            "role": "system",
            "content": "{% set x = 1 %}{{ x }}{{ b }}{% for i in range(2) %}{% endfor %}",
        },
        {
            "role": "user",
            "content": "{{ a.field }}{{ b }}{% for i in items %}{{ loop.index }}{% endfor %}",
        },
    ]
    assert template_variables(tpl) == ["a", "b", "items"]
    assert infer_schema(tpl) == {
        "type": "object",
        "properties": {"a": {}, "b": {}, "items": {}},
        "required": ["a", "b", "items"],
        "additionalProperties": False,
    }
    assert template_variables("plain") == []


# -- variables ----------------------------------------------------------------------------------


def test_missing_variables_are_named() -> None:
    err = refused("missing_variable", render, CHAT, {"lang": "en"})
    assert err.param == "question"
    assert err.message == "Missing variable 'question' (required by the prompt)."
    err = refused("missing_variable", render, CHAT, {})
    assert err.param == "lang"
    assert "'lang', 'question'" in err.message


def test_extra_variable_is_named_with_the_accepted_ones() -> None:
    err = refused("extra_variable", render, CHAT, {"lang": "en", "question": "q", "x": 1})
    assert err.param == "x"
    assert err.message == "Unknown variable 'x'; the prompt takes: lang, question."


def test_invalid_variable_names_its_path() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "user": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}},
        },
        "required": ["n"],
    }
    err = refused("invalid_variable", validate_variables, schema, {"n": "three"})
    assert err.param == "n"
    assert "'n'" in err.message and "not of type 'integer'" in err.message
    err = refused("invalid_variable", validate_variables, schema, {"n": 1, "user": {"age": -1}})
    assert err.param == "user.age"
    # Missing comes before invalid: the caller fixes the most basic problem first.
    assert refused("missing_variable", validate_variables, schema, {"user": 5}).param == "n"


def test_undefined_at_render_time_is_a_missing_variable() -> None:
    err = refused("missing_variable", render, "{{ y }}", {}, {"type": "object"})
    assert err.param == "y"
    err = refused("missing_variable", render, "{{ x.y }}", {"x": {}})
    assert "no attribute 'y'" in err.message


@pytest.mark.parametrize(
    "schema",
    [{"type": "array"}, {"type": 3}, {"properties": {}}, {"type": "object", "required": "a"}],
)
def test_bad_schemas_are_refused(schema: dict[str, Any]) -> None:
    refused("invalid_schema", check_schema, schema)
    refused("invalid_schema", validate_variables, schema, {})


def test_good_schema_passes() -> None:
    check_schema({"type": "object", "properties": {"a": {"type": "string"}}})
    check_schema(infer_schema(CHAT))


# -- template checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tpl",
    [
        [],
        3,
        [{"role": "bot", "content": "x"}],
        [{"role": "user", "content": 1}],
        [{"role": "user", "content": "x", "name": "y"}],
        [{"role": "user"}],
        ["hello"],
    ],
)
def test_malformed_templates_are_refused(tpl: Any) -> None:
    refused("invalid_template", check_template, tpl)


def test_syntax_errors_name_the_part_and_line() -> None:
    tpl = [{"role": "system", "content": "ok"}, {"role": "user", "content": "a\n{{ } }}"}]
    err = refused("template_syntax", check_template, tpl)
    assert err.message == "messages[1], line 2: unexpected '}'"
    err = refused("template_syntax", check_template, "x\ny\n{% if a %}")
    assert err.message.startswith("line 3: ")
    refused("template_syntax", render, "{{ " + "(" * 5000 + " }}", {})


ESCAPES = [
    ("{{ ''.__class__.__mro__ }}", "'__class__'"),
    ("{{ x.__class__ }}", "'__class__'"),
    ("{{ x['__class__'] }}", "'__class__'"),
    ("{{ cycler.__init__.__globals__ }}", "'__init__'"),
    ("{{ x._private }}", "'_private'"),
]
LOADS = [
    "{% include 'x' %}",
    "{% extends 'x' %}",
    "{% import 'x' as m %}",
    "{% from 'x' import m %}",
]


@pytest.mark.parametrize(("source", "name"), ESCAPES)
def test_private_access_is_refused_at_check_time(source: str, name: str) -> None:
    err = refused("template_unsafe", check_template, [{"role": "user", "content": source}])
    assert err.message == f"messages[0], line 1: access to {name} is not allowed in templates"
    refused("template_unsafe", render, source, {"x": "s"})


@pytest.mark.parametrize("source", LOADS)
def test_loading_templates_is_refused_at_check_time(source: str) -> None:
    assert "no loader" in refused("template_unsafe", check_template, source).message


# `x._private` is left out: on a str it simply does not exist (a missing value, not an escape).
@pytest.mark.parametrize("source", [s for s, _ in ESCAPES[:4]] + LOADS)
def test_sandbox_refuses_escapes_when_the_check_is_bypassed(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(templates, "_refuse_unsafe", lambda *a: None)
    check_template(source)  # the static walk is off: only the sandbox stands in the way
    variables = {"x": "s"} if "x" in template_variables(source) else {}
    refused("template_unsafe", render, source, variables)


@pytest.mark.parametrize(
    ("source", "variables"),
    [
        ("{{ x|attr('__class__') }}", {"x": "s"}),
        ("{{ x['__cla' ~ 'ss__'] }}", {"x": "s"}),
        ("{{ x.format(x) }}", {"x": "{0.__class__}"}),
        ("{{ x.append(1) }}", {"x": [1]}),
        ("{{ 10 ** 100000 }}", {}),
    ],
)
def test_sandbox_refuses_at_render_time(source: str, variables: dict[str, Any]) -> None:
    check_template(source)  # nothing for the static walk to see
    refused("template_unsafe", render, source, variables)


def test_abuse_is_refused_quickly() -> None:
    start = time.monotonic()
    err = refused("render_failed", render, "{% for i in range(10**9) %}x{% endfor %}", {})
    assert "Range too big" in err.message
    refused("render_too_large", render, "{{ 'a' * 10**12 }}", {})
    refused("render_too_large", render, "{{ [1] * 10**12 }}", {})
    nested = "{% for i in range(99999) %}{% for j in range(99999) %}xx{% endfor %}{% endfor %}"
    refused("render_too_large", render, nested, {})
    assert time.monotonic() - start < 5


def test_output_size_is_bounded_over_all_messages() -> None:
    half = MAX_RENDERED_CHARS // 2 + 1
    tpl = [{"role": "user", "content": "{{ v }}"}, {"role": "assistant", "content": "{{ v }}"}]
    assert len(render("{{ v }}", {"v": "a" * half})) == half
    refused("render_too_large", render, tpl, {"v": "a" * half})


def test_runtime_failures_are_clear_messages() -> None:
    err = refused("render_failed", render, "a\n{{ 1 / 0 }}", {})
    assert err.message == "line 2: rendering failed: ZeroDivisionError: division by zero"
    err = refused("render_failed", render, [{"role": "user", "content": "{{ x + 1 }}"}], {"x": "s"})
    assert err.message.startswith("messages[0], line 1: rendering failed: TypeError: ")
    recursive = "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"
    assert "RecursionError" in refused("render_failed", render, recursive, {}).message


# -- properties ---------------------------------------------------------------------------------

RESERVED = {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none", "loop"}
RESERVED |= {"self", "caller", "varargs", "kwargs", *templates._ENV.globals}
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True).filter(
    lambda n: n.lower() not in RESERVED
)


@settings(max_examples=200, deadline=None)
@given(st.text().map(lambda s: "".join(c for c in s if c not in "{}#\r")))
def test_plain_text_renders_to_itself(text: str) -> None:
    # '\r' is excluded because Jinja's lexer normalises line endings to '\n'.
    assert render(text, {}) == text


@settings(max_examples=200, deadline=None)
@given(NAMES, st.text(), st.text(alphabet="abc{}%#\n -", max_size=20))
def test_values_render_exactly(name: str, value: str, jinja_like: str) -> None:
    for v in (value, jinja_like, "{{ " + jinja_like + " }}"):
        assert render("A{{ " + name + " }}B", {name: v}) == "A" + v + "B"


@settings(max_examples=150, deadline=None)
@given(st.lists(NAMES, min_size=1, max_size=6, unique=True), st.sampled_from([" ", "\n", ", "]))
def test_template_variables_finds_exactly_the_names(names: list[str], sep: str) -> None:
    tpl = [{"role": "user", "content": sep.join("{{ " + n + " }}" for n in names)}]
    assert template_variables(tpl) == sorted(names)
    assert template_variables(tpl + tpl) == sorted(names)


@settings(max_examples=150, deadline=None)
@given(st.lists(NAMES, min_size=1, max_size=6, unique=True), st.data())
def test_any_missing_name_is_refused(names: list[str], data: st.DataObject) -> None:
    dropped = data.draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    schema = infer_schema(" ".join("{{ " + n + " }}" for n in names))
    variables = {n: "v" for n in names if n not in dropped}
    err = refused("missing_variable", validate_variables, schema, variables)
    assert err.param == min(dropped)
    assert all(repr(n) in err.message for n in dropped)
