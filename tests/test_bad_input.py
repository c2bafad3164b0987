"""Bad input gets a 4xx with an OpenAI-style error body, never a 500."""

from __future__ import annotations

import httpx
import pytest


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["message"]
    assert "Traceback" not in response.text
    return body["error"]


def test_missing_key(server) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json={})
    error = _assert_openai_error(response, 401)
    assert error["type"] == "authentication_error"


def test_wrong_key(server) -> None:
    response = httpx.get(
        f"{server.base_url}/v1/models", headers={"Authorization": "Bearer fw-nope"}
    )
    assert _assert_openai_error(response, 401)["code"] == "invalid_api_key"


def test_api_routes_need_a_key_too(server) -> None:
    _assert_openai_error(httpx.get(f"{server.base_url}/api/traces"), 401)


def test_malformed_json(api: httpx.Client) -> None:
    response = api.post(
        "/v1/chat/completions",
        content=b'{"model": "echo", "messages": [',
        headers={"Content-Type": "application/json"},
    )
    assert _assert_openai_error(response, 400)["code"] == "invalid_json"


def test_body_not_an_object(api: httpx.Client) -> None:
    _assert_openai_error(api.post("/v1/chat/completions", json=[1, 2]), 400)


def test_unknown_model(api: httpx.Client) -> None:
    response = api.post(
        "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]},
    )
    error = _assert_openai_error(response, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "echo", "messages": "hello"}, "messages"),
        ({"model": "echo", "messages": []}, "messages"),
        ({"model": "echo", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            "temperature",
        ),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": 7},
            "temperature",
        ),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            "max_tokens",
        ),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
            "stream",
        ),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5},
            "stop",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_wrong_types_name_the_parameter(api: httpx.Client, body: dict, param: str) -> None:
    error = _assert_openai_error(api.post("/v1/chat/completions", json=body), 400)
    assert error["param"] is not None and error["param"].startswith(param)


def test_oversized_body(api: httpx.Client) -> None:
    huge = "x" * (5 * 1024 * 1024)
    response = api.post(
        "/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": huge}]},
    )
    assert _assert_openai_error(response, 413)["code"] == "body_too_large"


def test_embedding_model_used_for_chat(api: httpx.Client) -> None:
    response = api.post(
        "/v1/chat/completions",
        json={"model": "all-minilm-l6-v2", "messages": [{"role": "user", "content": "x"}]},
    )
    _assert_openai_error(response, 400)


def test_bad_embeddings_input(api: httpx.Client) -> None:
    _assert_openai_error(
        api.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": []}), 400
    )
    _assert_openai_error(
        api.post("/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": 3}), 400
    )
    _assert_openai_error(
        api.post(
            "/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "x", "dimensions": 8}
        ),
        400,
    )


def test_local_model_rejects_unsupported_parameters(api: httpx.Client) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 2}
    assert _assert_openai_error(api.post("/v1/chat/completions", json=body), 400)["param"] == "n"


def test_unknown_path_and_method(api: httpx.Client) -> None:
    _assert_openai_error(api.get("/v1/nothing-here"), 404)
    _assert_openai_error(api.get("/v1/chat/completions"), 405)


def test_bad_query_parameters(api: httpx.Client) -> None:
    _assert_openai_error(api.get("/api/traces", params={"limit": "many"}), 400)
    _assert_openai_error(api.get("/api/traces", params={"cursor": "garbage"}), 400)
    _assert_openai_error(api.get("/api/traces/0123456789abcdef0123456789abcdef"), 404)


def test_every_answer_carries_security_headers(server, auth) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        for method, path, headers in [
            ("GET", "/api/traces", auth),
            ("GET", "/api/traces", {}),  # a 401 too
            ("POST", "/v1/chat/completions", auth),  # a 400
            ("GET", "/healthz", {}),
        ]:
            response = client.request(method, path, headers=headers)
            assert response.headers["x-content-type-options"] == "nosniff", path
            assert response.headers["x-frame-options"] == "DENY", path
            if path.startswith("/api/"):
                assert response.headers["cache-control"] == "no-store"
        page = client.get("/login")
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


# Bodies that answered 500 until the fuzzing work of issue 9 (tests/test_fuzz_api.py,
# tests/test_fuzz_parsers.py): valid JSON or YAML that Python's parsers refuse with something
# other than ValueError (RecursionError, yaml's ReaderError), or that nests deeper than the
# code after the parser can take.
DEEP = "[" * 100_000


@pytest.mark.parametrize(
    "body",
    [
        DEEP.encode(),  # json.loads: RecursionError
        b'{"model": "echo", "messages": ' + b"[" * 200 + b"]" * 200 + b"}",  # parses; too deep
    ],
)
def test_json_nested_too_deep(api: httpx.Client, body: bytes) -> None:
    response = api.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    error = _assert_openai_error(response, 400)
    assert error["code"] == "invalid_json" and "nested" in error["message"]


def test_pipeline_json_nested_too_deep(api: httpx.Client) -> None:
    response = api.post(
        "/api/pipelines/validate",
        content=DEEP.encode(),
        headers={"Content-Type": "application/json"},
    )
    assert _assert_openai_error(response, 400)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("routes: []\n\x00", 2),  # yaml's ReaderError: a character YAML does not allow
        (DEEP, 1),  # yaml's parser: RecursionError
    ],
)
def test_config_plan_unparseable_yaml(api: httpx.Client, text: str, line: int) -> None:
    response = api.post("/api/config/plan", json={"yaml": text})
    error = _assert_openai_error(response, 400)
    assert error["code"] == "invalid_config"
    assert error["message"].startswith(f"flywheel.yaml:{line}: invalid YAML")


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (DEEP.encode(), 1),  # json.loads: RecursionError
        (b'{"input": "x"}\n{"input": "y", "n": ' + b"9" * 5000 + b"}", 2),  # int() digit limit
        (b'{"input": "x", "metadata": ' + b"[" * 100 + b"]" * 100 + b"}", 1),  # too deep to keep
    ],
)
def test_dataset_import_unusable_json(api: httpx.Client, data: bytes, line: int) -> None:
    response = api.post(
        "/api/datasets/fuzzed/import", params={"filename": "items.jsonl"}, content=data
    )
    error = _assert_openai_error(response, 400)
    assert error["code"] == "invalid_dataset"
    assert error["message"].startswith(f"items.jsonl:{line}: ")
    assert api.get("/api/datasets/fuzzed").status_code == 404  # nothing was stored
