"""Pipelines: spec validation (with lines), every step type, the trace tree and the limits."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from importlib.metadata import EntryPoint
from typing import Any

import pytest
import yaml

from flywheel.pipelines import (
    PipelineInputError,
    PipelineRun,
    PipelineRunner,
    PipelineSpec,
    PipelineSpecError,
    get_tool,
    parse_pipeline,
    register_tool,
    tool_names,
    validate_pipeline,
)
from flywheel.pipelines import tools as tools_module
from flywheel.pipelines.runner import MAX_SPAN_JSON

HITS = [
    {
        "chunk_id": "c1",
        "document_id": "d1",
        "source": "refunds.md",
        "text": "Refunds take 5 days.",
        "score": 0.9,
        "rank": 1,
        "metadata": {},
    },
    {
        "chunk_id": "c2",
        "document_id": "d2",
        "source": "shipping.md",
        "text": "Shipping is free.",
        "score": 0.5,
        "rank": 2,
        "metadata": {},
    },
]


class FakeHost:
    """Deterministic host: chat echoes or answers by model name, retrieve returns HITS."""

    def __init__(self, http_routes: dict[tuple[str, str], tuple[int, Any]] | None = None) -> None:
        self.spans: list[dict[str, Any]] = []
        self.chats: list[tuple[dict[str, Any], str, str]] = []
        self.retrievals: list[dict[str, Any]] = []
        self.http_calls: list[dict[str, Any]] = []
        self.http_routes = http_routes or {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def chat(self, body: dict[str, Any], *, trace_id: str, parent_id: str) -> dict[str, Any]:
        self.chats.append((body, trace_id, parent_id))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            model = body["model"]
            user = next(
                (m["content"] for m in reversed(body.get("messages", [])) if m["role"] == "user"),
                "",
            )
            if model == "slow":  # later items finish first: the map must still keep order
                await asyncio.sleep(0.002 * (10 - len(user)))
            if model == "broken":
                raise RuntimeError("upstream answered 502")
            if model.startswith("prompt:"):
                text = f"Hello, {body['variables']['name']}!"
            elif model == "classifier":
                kind = "refund" if "refund" in user.lower() else "other"
                text = f'Here you go:\n```json\n{{"kind": "{kind}", "urgent": true}}\n```'
            else:
                text = f"echo: {user}"
            return {
                "model": f"{model}-v1",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }
        finally:
            self.in_flight -= 1

    async def retrieve(
        self,
        knowledge_base: str,
        query: str,
        *,
        top_k: int,
        mode: str,
        filters: dict[str, Any] | None,
        trace_id: str,
        parent_id: str,
    ) -> list[dict[str, Any]]:
        self.retrievals.append(
            {
                "kb": knowledge_base,
                "query": query,
                "top_k": top_k,
                "mode": mode,
                "filters": filters,
                "parent_id": parent_id,
            }
        )
        return HITS[:top_k]

    async def http(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        json: Any,
        content: str | None,
        timeout: float,
    ) -> tuple[int, Any]:
        self.http_calls.append(
            {
                "method": method,
                "url": url,
                "headers": headers,
                "json": json,
                "content": content,
                "timeout": timeout,
            }
        )
        return self.http_routes.get((method, url), (404, "not found"))

    def record(self, span: dict[str, Any]) -> None:
        self.spans.append(span)


def spec_of(text: str) -> PipelineSpec:
    return parse_pipeline(textwrap.dedent(text))


def run(
    spec: PipelineSpec, inputs: dict[str, Any], host: FakeHost | None = None, **kwargs: Any
) -> tuple[PipelineRun, FakeHost]:
    host = host or FakeHost()
    max_steps = kwargs.pop("max_steps", 1000)
    result = asyncio.run(PipelineRunner(host, max_steps=max_steps).run(spec, inputs, **kwargs))
    return result, host


def problems_of(text: str) -> list[str]:
    with pytest.raises(PipelineSpecError) as caught:
        spec_of(text)
    return caught.value.problems


@register_tool("test_shout")
def shout(text: str, times: int = 1) -> str:
    return (text.upper() + "!") * times


@register_tool("test_async_stats")
async def async_stats(items: list[Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"count": len(items), "types": sorted({type(i).__name__ for i in items})}


@register_tool("test_not_json")
def not_json() -> set[int]:
    return {1, 2}


SUPPORT = """
    name: support-answer
    description: Answer support questions from the handbook
    inputs:
      question: {type: string}
      tone: {type: string, default: friendly}
    steps:
      - id: docs
        type: retrieve
        knowledge_base: handbook
        query: "{{ question }}"
        top_k: 2
        mode: bm25
        filters: {lang: "{{ 'en' }}"}
      - id: answer
        type: llm
        model: default
        messages:
          - {role: system, content: "Be {{ tone }}.\\n{% for d in docs %}[{{ loop.index }}] {{ d.text }}\\n{% endfor %}"}
          - {role: user, content: "{{ question }}"}
        params: {max_tokens: 64, temperature: "{{ 0.5 }}"}
      - id: greet
        type: prompt
        prompt: greeter@production
        variables: {name: "{{ question }}"}
      - id: parsed
        type: json
        input: '{"words": {{ answer | wordcount }}, "sources": {{ docs | map(attribute="source") | list | tojson }}}'
      - id: shouted
        type: tool
        python: test_shout
        args: {text: "{{ greet }}", times: "{{ parsed.words - 2 }}"}
      - id: stats
        type: tool
        python: test_async_stats
        args: {items: "{{ docs }}"}
      - id: ticket
        type: tool
        http:
          method: post
          url: "https://tickets.example/api/{{ parsed.sources[0] }}"
          headers: {Authorization: "Bearer s3cret", X-Trace: "t"}
          json: {question: "{{ question }}", count: "{{ docs | length }}"}
        output: created
    output: "{{ answer }} | {{ greet }} | {{ created.id }}"
    """


def support_host() -> FakeHost:
    return FakeHost({("POST", "https://tickets.example/api/refunds.md"): (201, {"id": 42})})


def test_every_step_type_runs_and_passes_native_values() -> None:
    spec = spec_of(SUPPORT)
    result, host = run(spec, {"question": "refund please"}, support_host())
    assert result.status == "ok", result.error
    assert result.output == "echo: refund please | Hello, refund please! | 42"
    v = result.variables
    assert v["tone"] == "friendly"  # the default applied
    assert v["docs"] == HITS
    assert host.retrievals[0] | {"parent_id": None} == {
        "kb": "handbook",
        "query": "refund please",
        "top_k": 2,
        "mode": "bm25",
        "filters": {"lang": "en"},
        "parent_id": None,
    }
    llm_body = host.chats[0][0]
    assert (
        llm_body["messages"][0]["content"]
        == "Be friendly.\n[1] Refunds take 5 days.\n[2] Shipping is free.\n"
    )
    assert llm_body["max_tokens"] == 64 and llm_body["temperature"] == 0.5  # native float
    assert host.chats[1][0] == {
        "model": "prompt:greeter@production",
        "variables": {"name": "refund please"},
    }
    assert v["parsed"] == {"words": 3, "sources": ["refunds.md", "shipping.md"]}
    assert v["shouted"] == "HELLO, REFUND PLEASE!!"  # times = 3 - 2 = 1, an int
    assert v["stats"] == {"count": 2, "types": ["dict"]}  # the list itself, not its text
    assert v["created"] == {"id": 42} and "ticket" not in v  # `output:` names the variable
    call = host.http_calls[0]
    assert call["json"] == {"question": "refund please", "count": 2}
    assert call["headers"]["Authorization"] == "Bearer s3cret"
    assert [s.id for s in result.steps] == [
        "docs",
        "answer",
        "greet",
        "parsed",
        "shouted",
        "stats",
        "ticket",
    ]
    assert all(s.status == "ok" and s.latency_ms >= 0 for s in result.steps)


def test_trace_tree_spans_and_links() -> None:
    spec = spec_of(SUPPORT)
    result, host = run(
        spec,
        {"question": "refund please"},
        support_host(),
        trace_id="a" * 32,
        parent_id="b" * 16,
        project_id="p1",
        attributes={"flywheel.caller": "api"},
    )
    spans = {s["span_id"]: s for s in host.spans}
    assert len(host.spans) == 1 + 7  # the run and one per executed step
    root = spans[result.span_id]
    assert root["kind"] == "pipeline.run" and root["name"] == "pipeline support-answer"
    assert root["parent_id"] == "b" * 16 and root["trace_id"] == "a" * 32
    assert root["input"] == {"question": "refund please", "tone": "friendly"}
    assert root["output"] == result.output and root["status"] == "ok"
    assert root["attributes"] == {
        "flywheel.caller": "api",
        "flywheel.pipeline.name": "support-answer",
    }
    # Exactly the columns the gateway's spans have.
    assert set(root) == {
        "trace_id",
        "span_id",
        "parent_id",
        "name",
        "kind",
        "start_time",
        "end_time",
        "latency_ms",
        "ttft_ms",
        "status",
        "status_code",
        "error",
        "route",
        "model",
        "provider",
        "stream",
        "input",
        "output",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "cost",
        "attempts",
        "api_key_id",
        "project_id",
        "attributes",
    }
    steps = [s for s in host.spans if s["kind"] == "pipeline.step"]
    assert {s["parent_id"] for s in steps} == {result.span_id}
    assert all(s["trace_id"] == "a" * 32 and s["project_id"] == "p1" for s in host.spans)
    by_step = {s["attributes"]["flywheel.pipeline.step"]: s for s in steps}
    answer = by_step["answer"]
    assert answer["name"] == "llm answer"
    assert answer["attributes"]["flywheel.pipeline.step_type"] == "llm"
    assert answer["attributes"]["flywheel.pipeline.name"] == "support-answer"
    assert answer["input"]["messages"][1] == {"role": "user", "content": "refund please"}
    assert answer["output"] == "echo: refund please"
    assert (answer["prompt_tokens"], answer["total_tokens"], answer["model"]) == (
        7,
        10,
        "default-v1",
    )
    # The gateway's span nests under the step's: the step span id is the host call's parent.
    assert host.chats[0][2] == answer["span_id"] and host.chats[0][1] == "a" * 32
    assert host.retrievals[0]["parent_id"] == by_step["docs"]["span_id"]
    assert by_step["ticket"]["input"]["headers"] == {"Authorization": "[redacted]", "X-Trace": "t"}
    assert [r.span_id for r in result.steps] == [by_step[r.id]["span_id"] for r in result.steps]
    json.dumps(host.spans)  # every span is JSON data


def test_failing_step_stops_the_run_with_its_message() -> None:
    spec = spec_of("""
        name: failing
        inputs: [question]
        steps:
          - {id: first, type: llm, model: default, messages: [{role: user, content: "{{ question }}"}]}
          - {id: boom, type: llm, model: broken, messages: [{role: user, content: "{{ first }}"}]}
          - {id: never, type: json, input: "{{ boom }}"}
        """)
    result, host = run(spec, {"question": "hi"})
    assert result.status == "error" and result.output is None
    assert result.error == "step 'boom' (llm): upstream answered 502"
    assert [(s.id, s.status) for s in result.steps] == [
        ("first", "ok"),
        ("boom", "error"),
        ("never", "skipped"),
    ]
    assert result.steps[2].span_id == ""
    assert len(host.chats) == 2
    spans = {s["name"]: s for s in host.spans}
    assert set(spans) == {"pipeline failing", "llm first", "llm boom"}  # no span for `never`
    assert spans["llm boom"]["status"] == "error" and spans["llm boom"]["error"] == result.error
    assert spans["llm first"]["status"] == "ok"
    assert spans["pipeline failing"]["status"] == "error"
    assert spans["pipeline failing"]["error"] == result.error


BRANCHY = """
    name: triage
    inputs: [message]
    steps:
      - id: classify
        type: llm
        model: classifier
        messages: [{role: user, content: "{{ message }}"}]
      - id: parsed
        type: json
        input: "{{ classify }}"
      - id: route
        type: branch
        if: "parsed.kind == 'refund'"
        then:
          - {id: refund_reply, type: llm, model: default, messages: [{role: user, content: "refund: {{ message }}"}], output: reply}
        else:
          - {id: other_reply, type: llm, model: default, messages: [{role: user, content: "other: {{ message }}"}], output: reply}
          - {id: extra, type: tool, python: word_count, args: {text: "{{ reply }}"}}
    output_expr: "{'reply': reply, 'branch': route}"
    """


@pytest.mark.parametrize(
    ("message", "reply", "branch_output", "ran"),
    [
        (
            "I want a refund",
            "echo: refund: I want a refund",
            "echo: refund: I want a refund",
            "refund_reply",
        ),
        ("where is my parcel", "echo: other: where is my parcel", 6, "other_reply"),
    ],
)
def test_branch_takes_one_arm(message: str, reply: str, branch_output: Any, ran: str) -> None:
    result, host = run(spec_of(BRANCHY), {"message": message})
    assert result.status == "ok", result.error
    assert result.output == {"reply": reply, "branch": branch_output}
    ids = [s.id for s in result.steps]
    assert ran in ids and ({"refund_reply", "other_reply"} - {ran}).isdisjoint(ids)
    branch = next(s for s in host.spans if s["name"] == "branch route")
    assert branch["input"]["value"] is (ran == "refund_reply")
    inner = [s for s in host.spans if s["parent_id"] == branch["span_id"]]
    assert {s["attributes"]["flywheel.pipeline.step"] for s in inner} == set(ids) - {
        "classify",
        "parsed",
        "route",
    }


def test_branch_without_else_outputs_none() -> None:
    spec = spec_of("""
        name: maybe
        inputs: {flag: {type: boolean}}
        steps:
          - {id: b, type: branch, if: "{{ flag }}", then: [{id: t, type: tool, python: current_time}]}
        """)
    result, _ = run(spec, {"flag": False})
    assert result.status == "ok" and result.output is None and [s.id for s in result.steps] == ["b"]
    result, _ = run(spec, {"flag": True})
    assert result.output.endswith("+00:00") and result.output[:2] == "20"


def test_map_keeps_order_bounds_concurrency_and_exposes_index() -> None:
    spec = spec_of("""
        name: mapper
        inputs: {words: {type: array}}
        steps:
          - id: each
            type: map
            over: "words"
            as: word
            concurrency: 3
            steps:
              - {id: call, type: llm, model: slow, messages: [{role: user, content: "{{ word }}"}]}
              - {id: tagged, type: tool, python: join, args: {items: ["{{ index }}", "{{ call }}"], sep: "|"}}
        """)
    words = ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g"]
    result, host = run(spec, {"words": words})
    assert result.status == "ok", result.error
    assert result.output == [f"{i}|echo: {w}" for i, w in enumerate(words)]
    assert host.max_in_flight == 3  # parallel, and never more than the bound
    map_span = next(s for s in host.spans if s["name"] == "map each")
    inner = [s for s in host.spans if s["parent_id"] == map_span["span_id"]]
    assert len(inner) == 2 * len(words)
    assert map_span["input"]["items"] == words and map_span["output"] == result.output


def test_map_concurrency_one_is_sequential_and_empty_list_maps_to_empty() -> None:
    text = """
        name: seq
        inputs: {words: {type: array}}
        steps:
          - {id: each, type: map, over: "{{ words }}", concurrency: 1,
             steps: [{id: c, type: llm, model: slow, messages: [{role: user, content: "{{ item }}"}]}]}
        """
    result, host = run(spec_of(text), {"words": ["x", "yy", "z"]})
    assert result.output == ["echo: x", "echo: yy", "echo: z"] and host.max_in_flight == 1
    result, host = run(spec_of(text), {"words": []})
    assert result.status == "ok" and result.output == [] and host.chats == []


def test_nested_map_inside_branch() -> None:
    spec = spec_of("""
        name: nested
        inputs: {groups: {type: array}, go: {type: boolean, default: true}}
        steps:
          - id: gate
            type: branch
            if: go
            then:
              - id: outer
                type: map
                over: groups
                as: group
                steps:
                  - id: inner
                    type: map
                    over: group
                    as: word
                    concurrency: 2
                    steps:
                      - {id: count, type: tool, python: word_count, args: {text: "{{ word }} {{ index }}"}}
                  - {id: total, type: tool, python: test_async_stats, args: {items: "{{ inner }}"}}
        output: "{{ gate }}"
        """)
    result, host = run(spec, {"groups": [["a b", "c"], ["d e f"]]})
    assert result.status == "ok", result.error
    assert result.output == [{"count": 2, "types": ["int"]}, {"count": 1, "types": ["int"]}]
    assert result.variables["outer"] == result.output and "inner" not in result.variables
    counts = [s.output for s in result.steps if s.id == "count"]
    assert sorted(counts) == [2, 3, 4]  # words plus the index
    spans = {s["span_id"]: s for s in host.spans}
    leaf = next(s for s in host.spans if s["name"] == "tool count")
    chain = []
    node = leaf
    while node["parent_id"] in spans:
        node = spans[node["parent_id"]]
        chain.append(node["name"])
    assert chain == ["map inner", "map outer", "branch gate", "pipeline nested"]


def test_map_failure_stops_the_map_and_names_the_step() -> None:
    spec = spec_of("""
        name: mapfail
        inputs: {items: {type: array}}
        steps:
          - {id: each, type: map, over: items, concurrency: 2,
             steps: [{id: parse, type: json, input: "{{ item }}"}]}
        """)
    result, _ = run(spec, {"items": ['{"a": 1}', "not json", '{"b": 2}', "[3]"]})
    assert result.status == "error" and result.output is None
    assert result.error.startswith("step 'parse' (json): input: not valid JSON")
    each = next(s for s in result.steps if s.id == "each")
    assert each.status == "error" and each.error == result.error
    assert [s.status for s in result.steps if s.id == "parse"] == ["ok", "error"]  # no more items


@register_tool("test_sleepy")
async def sleepy(seconds: float = 0.0, fail: bool = False) -> float:
    if fail:
        raise RuntimeError("no luck")
    await asyncio.sleep(seconds)
    return seconds


def test_map_failure_cancels_running_iterations() -> None:
    spec = spec_of("""
        name: cancel
        inputs: {items: {type: array}}
        steps:
          - {id: each, type: map, over: items, concurrency: 2,
             steps: [{id: nap, type: tool, python: test_sleepy, args: {seconds: "{{ item.s }}", fail: "{{ item.f }}"}}]}
        """)
    started = time.perf_counter()
    result, host = run(
        spec, {"items": [{"s": 5, "f": False}, {"s": 0, "f": True}, {"s": 0, "f": False}]}
    )
    assert time.perf_counter() - started < 2  # the 5 s nap was cancelled, not awaited
    assert result.error == "step 'nap' (tool): tool 'test_sleepy' failed: RuntimeError: no luck"
    naps = sorted((s.status, s.error) for s in result.steps if s.id == "nap")
    assert naps == [("error", "step 'nap' (tool): cancelled"), ("error", result.error)]
    spans = [s for s in host.spans if s["name"] == "tool nap"]
    assert sorted(s["error"] for s in spans) == sorted(e for _, e in naps)


def test_json_step_tolerates_fences_and_prose_and_names_itself_on_error() -> None:
    spec = spec_of("""
        name: js
        inputs: [text]
        steps:
          - {id: parsed, type: json, input: "{{ text }}"}
        """)
    cases = {
        '{"a": [1, 2]}': {"a": [1, 2]},
        'Sure:\n```json\n{"a": 1}\n```\nanything else?': {"a": 1},
        'The answer is {"ok": true} as requested.': {"ok": True},
        "[1, 2] trailing": [1, 2],
    }
    for text, expected in cases.items():
        result, _ = run(spec, {"text": text})
        assert result.output == expected, text
    result, _ = run(spec, {"text": "no json here"})
    assert result.status == "error" and result.error.startswith(
        "step 'parsed' (json): input: not valid JSON"
    )


def test_python_tools_registry_and_errors() -> None:
    assert {"word_count", "join", "current_time", "test_shout"} <= set(tool_names())
    assert get_tool("word_count")(text="one two  three") == 3
    assert get_tool("join")(items=[1, "b"], sep=", ") == "1, b"
    with pytest.raises(KeyError) as caught:
        get_tool("nope")
    assert str(caught.value).startswith("unknown tool 'nope' (known: current_time, join")
    with pytest.raises(ValueError, match="already registered"):
        register_tool("word_count")(lambda text: 0)
    spec = spec_of("""
        name: t
        steps:
          - {id: bad, type: tool, python: test_not_json}
        """)
    result, _ = run(spec, {})
    assert (
        result.error
        == "step 'bad' (tool): tool 'test_not_json' returned set, which is not JSON data"
    )
    spec = spec_of("""
        name: t
        steps:
          - {id: s, type: tool, python: test_shout, args: {text: "{{ 5 }}"}}
        """)
    result, _ = run(spec, {})
    assert result.error == (
        "step 's' (tool): tool 'test_shout' failed: AttributeError: 'int' object has no attribute 'upper'"
    )


def test_entry_point_tools_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = []

    def fake_entry_points(group: str) -> list[EntryPoint]:
        loaded.append(group)
        return [
            EntryPoint("plugin_shout", "tests.test_pipelines:shout", group),
            EntryPoint("plugin_broken", "tests.no_such_module:thing", group),
        ]

    monkeypatch.setattr(tools_module, "_registry", dict(tools_module._registry))
    monkeypatch.setattr(tools_module, "_entry_points_loaded", False)
    monkeypatch.setattr(tools_module, "entry_points", fake_entry_points)
    assert get_tool("plugin_shout")(text="hi") == "HI!"
    assert "plugin_broken" not in tool_names()  # logged, not fatal
    assert loaded == ["flywheel.pipeline_tools"]


def test_http_tool_error_status_fails_the_step() -> None:
    spec = spec_of("""
        name: h
        steps:
          - {id: fetch, type: tool, http: {url: "https://api.example/x", timeout: 2}}
        """)
    result, host = run(spec, {}, FakeHost({("GET", "https://api.example/x"): (200, "plain text")}))
    assert result.output == "plain text" and host.http_calls[0]["timeout"] == 2.0
    result, _ = run(spec, {})
    assert result.error == "step 'fetch' (tool): HTTP 404 from GET https://api.example/x: not found"


def test_input_validation() -> None:
    spec = spec_of("""
        name: inp
        inputs:
          q: {type: string}
          n: {type: integer, default: 3}
          ratio: number
          flags: {type: object, required: false}
        steps:
          - {id: out, type: tool, python: join, args: {items: ["{{ q }}", "{{ n }}", "{{ ratio }}", "{{ flags }}"], sep: ","}}
        """)
    result, _ = run(spec, {"q": "x", "ratio": 1})
    assert result.output == "x,3,1,None"
    with pytest.raises(PipelineInputError, match="missing input 'q'") as caught:
        run(spec, {"ratio": 1.5})
    assert caught.value.input == "q"
    with pytest.raises(
        PipelineInputError, match="unknown input 'extra'; the pipeline takes: q, n, ratio, flags"
    ):
        run(spec, {"q": "x", "ratio": 1, "extra": 1})
    with pytest.raises(PipelineInputError, match="input 'n': expected an integer, got bool"):
        run(spec, {"q": "x", "ratio": 1, "n": True})
    with pytest.raises(PipelineInputError, match="input 'ratio': expected a number, got str"):
        run(spec, {"q": "x", "ratio": "1"})


def test_max_steps() -> None:
    spec = spec_of("""
        name: big
        inputs: {items: {type: array}}
        steps:
          - {id: each, type: map, over: items, steps: [{id: w, type: tool, python: word_count, args: {text: "{{ item }}"}}]}
        """)
    result, host = run(spec, {"items": ["a"] * 10_000})
    assert result.status == "error"
    assert result.error == (
        "step 'each' (map): mapping over 10000 items needs at least 10000 more "
        "steps; the run may execute at most max_steps=1000"
    )
    assert len(host.spans) == 2  # the run and the refused map: no iteration ran
    result, _ = run(spec, {"items": ["a b"] * 999})
    assert result.status == "ok" and result.output == [2] * 999
    # Counted as steps execute too: branches can make a run longer than its precheck.
    chain = spec_of("""
        name: chain
        steps:
          - {id: a, type: tool, python: current_time}
          - {id: b, type: branch, if: "true", then: [{id: c, type: tool, python: current_time}]}
          - {id: d, type: tool, python: current_time}
        """)
    result, _ = run(chain, {}, max_steps=3)
    assert result.error == "step 'd' (tool): the run exceeded max_steps (3 steps)"
    assert [s.id for s in result.steps] == ["a", "b", "c"]


def test_big_outputs_are_truncated_in_spans_only() -> None:
    spec = spec_of("""
        name: big
        inputs: [text]
        steps:
          - {id: echo, type: llm, model: default, messages: [{role: user, content: "{{ text }}"}]}
        """)
    text = "word " * 20_000
    result, host = run(spec, {"text": text})
    assert result.output == "echo: " + text
    span = next(s for s in host.spans if s["name"] == "llm echo")
    assert span["output"]["truncated"] is True and len(json.dumps(span)) < 3 * MAX_SPAN_JSON
    assert span["output"]["json_chars"] == len(json.dumps(result.output))


def test_runtime_sandbox_holds_for_unvalidated_specs() -> None:
    spec = PipelineSpec.model_validate(
        {
            "name": "raw",
            "inputs": ["q"],
            "steps": [{"id": "x", "type": "json", "input": "{{ q.__class__.__mro__ }}"}],
        }
    )
    result, _ = run(spec, {"q": "s"})
    assert result.status == "error" and "access to '__class__' is not allowed" in result.error
    spec = PipelineSpec.model_validate(
        {
            "name": "raw",
            "steps": [{"id": "x", "type": "json", "input": "{{ 'a' * 10**9 }}"}],
        }
    )
    result, _ = run(spec, {})
    assert result.status == "error" and "longer than" in result.error


def test_yaml_round_trip_and_step_ids() -> None:
    spec = spec_of(BRANCHY)
    assert parse_pipeline(spec.yaml()) == spec
    assert spec.step_ids() == [
        "classify",
        "parsed",
        "route",
        "refund_reply",
        "other_reply",
        "extra",
    ]
    spec = spec_of(SUPPORT)
    assert parse_pipeline(spec.yaml()) == spec


# -- validation problems ---------------------------------------------------------------------


def test_field_errors_name_line_step_and_field() -> None:
    problems = problems_of("""
        name: bad
        steps:
          - id: docs
            type: retrieve
            knowledge_base: handbook
            query: q
            top_k: 0
          - id: x
            type: lm
          - id: answer
            type: llm
            model: default
            messages: [{role: robot, content: hi}]
            modle: typo
        """)
    assert problems == [
        "pipeline.yaml:8: step 'docs' (retrieve): top_k: Input should be greater than or equal to 1",
        "pipeline.yaml:10: step 'x': unknown step type 'lm' (known: branch, json, llm, map, prompt, retrieve, tool)",
        "pipeline.yaml:14: step 'answer' (llm): messages[0].role: Input should be 'system', 'developer', 'user' or 'assistant'",
        "pipeline.yaml:15: step 'answer' (llm): modle: Extra inputs are not permitted",
    ]


def test_nested_field_errors_point_into_the_arm() -> None:
    problems = problems_of("""
        name: bad
        steps:
          - id: b
            type: branch
            if: "true"
            then:
              - id: m
                type: map
                over: "[1]"
                steps:
                  - {id: t, type: tool, python: word_count, http: {url: "x"}}
                  - {id: h, type: tool, http: {method: FETCH, url: "x"}}
        """)
    assert problems == [
        "pipeline.yaml:12: step 't' (tool): 'http' and 'python' are exclusive: give exactly one",
        "pipeline.yaml:13: step 'h' (tool): http.method: Input should be 'GET', 'POST', 'PUT', 'PATCH' or 'DELETE'",
    ]


def test_static_problems() -> None:
    problems = problems_of("""
        name: support
        inputs:
          question: {type: string}
        steps:
          - id: docs
            type: retrieve
            knowledge_base: handbook
            query: "{{ question }}"
          - id: answer
            type: llm
            model: default
            messages:
              - {role: system, content: "{% for d in docs %}{{ d.text }}"}
              - {role: user, content: "{{ questoin }}"}
          - id: docs
            type: json
            input: "{{ answer.__class__ }}"
          - id: pick
            type: branch
            if: "answer ==="
            then:
              - {id: t, type: tool, python: no_such_tool}
              - {id: u, type: tool, python: word_count, args: {txt: "{{ answer }}"}}
        output: "{{ later }}"
        """)
    assert problems == [
        "pipeline.yaml:14: step 'answer' (llm): messages[0].content: line 1: Unexpected end of template. "
        "Jinja was looking for the following tags: 'endfor' or 'else'. The innermost block that needs to be closed is 'for'.",
        "pipeline.yaml:15: step 'answer' (llm): messages[1].content: undefined variable 'questoin' (defined so far: question, docs)",
        "pipeline.yaml:16: step 'docs' (json): id: duplicate step id (first used at line 6)",
        "pipeline.yaml:18: step 'docs' (json): input: line 1: access to '__class__' is not allowed in templates",
        "pipeline.yaml:21: step 'pick' (branch): if: unexpected '='",
        "pipeline.yaml:23: step 't' (tool): python: unknown tool 'no_such_tool' (known: "
        + ", ".join(tool_names())
        + ")",
        "pipeline.yaml:24: step 'u' (tool): args: tool 'word_count': missing a required argument: 'text'",
        "pipeline.yaml:25: output: undefined variable 'later' (defined so far: question, docs, answer, t, u, pick)",
    ]


def test_scoping_rules_accept_map_locals_and_maybe_defined_branch_outputs() -> None:
    spec = spec_of("""
        name: scopes
        inputs: [q]
        steps:
          - id: b
            type: branch
            if: "q == 'x'"
            then: [{id: only_then, type: tool, python: word_count, args: {text: "{{ q }}"}}]
            else: [{id: only_else, type: tool, python: word_count, args: {text: "{{ q }}"}}]
          - {id: after, type: tool, python: join, args: {items: ["{{ only_then }}"]}}
          - id: m
            type: map
            over: "[q, q]"
            as: word
            steps: [{id: inner, type: tool, python: join, args: {items: ["{{ word }}", "{{ index }}"]}}]
        """)
    assert spec.step_ids() == ["b", "only_then", "only_else", "after", "m", "inner"]
    # A maybe-defined variable is accepted statically and fails clearly when it is not set.
    result, _ = run(spec, {"q": "y"})
    assert result.error == "step 'after' (tool): args.items[0]: undefined variable 'only_then'"
    result, _ = run(spec, {"q": "x"})
    assert result.status == "ok" and result.output == ["x\n0", "x\n1"]
    problems = problems_of("""
        name: leak
        steps:
          - {id: m, type: map, over: "[1]", steps: [{id: inner, type: tool, python: current_time}]}
          - {id: x, type: json, input: "{{ inner }} {{ index }} {{ item }}"}
        """)
    assert problems == [
        "pipeline.yaml:5: step 'x' (json): input: undefined variables 'index', 'inner', 'item' (defined so far: m)"
    ]


def test_nesting_depth_limit() -> None:
    def nested(depth: int) -> dict[str, Any]:
        step: dict[str, Any] = {"id": "leaf", "type": "tool", "python": "current_time"}
        for i in range(depth - 1):
            step = {"id": f"b{i}", "type": "branch", "if": "true", "then": [step]}
        return {"name": "deep", "steps": [step]}

    assert validate_pipeline(nested(8)).step_ids()[-1] == "leaf"
    with pytest.raises(PipelineSpecError) as caught:
        validate_pipeline(nested(9))
    assert caught.value.problems == [
        "pipeline: step 'b0' (branch): then: steps are nested more than 8 levels deep"
    ]
    with pytest.raises(PipelineSpecError) as caught:
        validate_pipeline(nested(500))
    assert len(caught.value.problems) == 1
    # From YAML, the problem carries the line of the step whose arm is too deep.
    text = yaml.safe_dump(nested(9), sort_keys=False)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "id: b0" in t)
    with pytest.raises(PipelineSpecError) as caught:
        parse_pipeline(text)
    assert caught.value.problems == [
        f"pipeline.yaml:{line + 3}: step 'b0' (branch): then: steps are nested more than 8 levels deep"
    ]


def test_top_level_and_yaml_problems() -> None:
    assert problems_of("name: a\nsteps: [\n")[0].startswith("pipeline.yaml:3: invalid YAML")
    assert problems_of("- just a list") == [
        "pipeline.yaml:1: a pipeline is a mapping (name, inputs, steps, output)"
    ]
    assert problems_of("""
        name: "bad name!"
        inputs: {n: {type: integer, default: "three"}}
        steps: []
        """) == [
        "pipeline.yaml:2: name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'",
        "pipeline.yaml:3: inputs.n: default: expected an integer, got str",
        "pipeline.yaml:4: steps: List should have at least 1 item after validation, not 0",
    ]
    assert problems_of("""
        name: ok
        inputs: {2x: string}
        steps: [{id: s, type: tool, python: current_time}]
        output: a
        output_expr: b
        """) == [
        "pipeline.yaml:3: inputs: input '2x' is not a variable name: a letter or "
        "underscore, then letters, digits or underscores (at most 64)",
    ]
    aliases = problems_of("""
        name: a
        x: &big [1, 2]
        steps: *big
        """)
    assert aliases == ["pipeline.yaml:4: YAML aliases (*name) are not allowed"]


def test_validate_pipeline_from_data_without_lines() -> None:
    with pytest.raises(PipelineSpecError) as caught:
        validate_pipeline({"name": "d", "steps": [{"id": "s", "type": "tool"}]}, source="api")
    assert caught.value.problems == ["api: step 's' (tool): give exactly one of 'http' or 'python'"]
    with pytest.raises(PipelineSpecError) as caught:
        validate_pipeline(
            {"name": "d", "steps": [{"id": "if", "type": "json", "input": "x"}, {"type": "json"}]}
        )
    assert caught.value.problems == [
        "pipeline: step 'if' (json): id: step id 'if' is reserved in templates; choose another name",
        "pipeline: step at steps[1] (json): id: Field required",
        "pipeline: step at steps[1] (json): input: Field required",
    ]


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    levels = zip("abcdefgh", "bcdefghi", strict=True)
    bomb = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{child}: &{child} [{', '.join([f'*{parent}'] * 10)}]\n" for parent, child in levels
    )
    started = time.perf_counter()
    with pytest.raises(PipelineSpecError) as refused:
        parse_pipeline(bomb)
    # 10**9 expansions if anything composed the document first.
    assert time.perf_counter() - started < 1.0
    assert refused.value.problems == ["pipeline.yaml:2: YAML aliases (*name) are not allowed"]
