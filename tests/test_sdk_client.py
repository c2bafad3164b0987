"""The Python SDK client against the shared real server.

Prompts are created, fetched, rendered and called through ``flywheel.Client``. Traffic is only
observed (a counting transport around the real one) or cut (a transport that refuses to
connect, as when the server is down); the server itself is never imitated.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator

import httpx
import pytest

import flywheel
from flywheel import Client, FlywheelError, StalePromptWarning
from flywheel.sdk import Prompt

from .conftest import RunningServer

GREETING = [
    {"role": "system", "content": "You greet people in {{ language }}."},
    {"role": "user", "content": "Say hello to {{ name }}."},
]
VARIABLES = {"name": "Ada", "language": "French"}


class Wire(httpx.BaseTransport):
    """The real transport, with a count of requests and a switch that cuts the connection."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[httpx.Request] = []
        self.down = False
        self.proxy_503 = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.proxy_503:  # a load balancer in front of the server, with no backend left
            return httpx.Response(503, text="<html>no healthy upstream</html>", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def client(server: RunningServer, wire: Wire) -> Iterator[Client]:
    with Client(server.base_url, server.admin_key, transport=wire, timeout=30) as sdk:
        yield sdk


def _name(prefix: str) -> str:
    return f"sdk-{prefix}-{secrets.token_hex(4)}"


def test_create_get_by_label_and_version_and_render_like_the_server(
    client: Client, api: httpx.Client
) -> None:
    name = _name("get")
    first = client.prompts.create(name, GREETING, model="echo", message="first")
    assert isinstance(first, Prompt) and (first.name, first.version) == (name, 1)
    assert first.variables["required"] == ["language", "name"] and first.model == "echo"
    changed = [GREETING[0], {"role": "user", "content": "Say goodbye to {{ name }}."}]
    second = client.prompts.create(name, changed, labels=["staging"], params={"temperature": 0.5})
    assert second.version == 2 and second.labels == ("staging",)

    by_label = client.prompts.get(name, label="staging")
    assert by_label.version == 2 and by_label.params == {"temperature": 0.5}
    assert client.prompts.get(name, version=1) == first
    assert client.prompts.get(name).version == 2
    assert [v.version for v in client.prompts.versions(name)] == [2, 1]
    listed = {p["name"]: p for p in client.prompts.list()}
    assert listed[name]["latest_version"] == 2 and listed[name]["labels"] == {"staging": 2}
    diff = client.prompts.diff(name, 1, 2)
    assert "-Say hello to {{ name }}." in diff["template"]
    assert "+Say goodbye to {{ name }}." in diff["template"]

    local = by_label.render(**VARIABLES)
    assert local == [
        {"role": "system", "content": "You greet people in French."},
        {"role": "user", "content": "Say goodbye to Ada."},
    ]
    served = api.post(
        f"/api/prompts/{name}/render", json={"variables": VARIABLES, "label": "staging"}
    )
    assert served.status_code == 200, served.text
    assert served.json()["messages"] == local == by_label.messages(**VARIABLES)

    text = client.prompts.create(_name("text"), "Hi {{ who }}!")
    assert text.render(who="Bo") == "Hi Bo!"
    assert text.messages(who="Bo") == [{"role": "user", "content": "Hi Bo!"}]


def test_local_render_refuses_like_the_server(client: Client, api: httpx.Client) -> None:
    name = _name("bad")
    prompt = client.prompts.create(name, GREETING)
    with pytest.raises(FlywheelError) as local:
        prompt.render(name="Ada")
    served = api.post(f"/api/prompts/{name}/render", json={"variables": {"name": "Ada"}})
    assert served.status_code == 400
    error = served.json()["error"]
    assert (local.value.status_code, local.value.code) == (400, error["code"])
    assert (local.value.message, local.value.param) == (error["message"], error["param"])
    with pytest.raises(FlywheelError, match="unsafe") as unsafe:
        client.prompts.create(_name("bad"), "{{ ''.__class__ }}")
    assert unsafe.value.status_code == 400


def test_chat_calls_a_prompt_by_label(client: Client) -> None:
    name = _name("chat")
    client.prompts.create(name, GREETING, model="echo", labels=["staging"])
    model = f"prompt:{name}@staging"
    reply = client.chat(model, variables=VARIABLES)
    assert reply["choices"][0]["message"]["content"] == "echo: Say hello to Ada."

    chunks = list(client.chat(model, variables=VARIABLES, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "echo: Say hello to Ada."

    plain = client.chat("echo", [{"role": "user", "content": "ping"}], max_tokens=20)
    assert plain["choices"][0]["message"]["content"] == "echo: ping"
    with pytest.raises(FlywheelError) as missing:
        client.chat(f"prompt:{name}@staging", variables={"name": "Ada"})
    assert missing.value.status_code == 400 and "'language'" in missing.value.message


def test_an_error_in_the_stream_raises(client: Client) -> None:
    received = []
    with pytest.raises(FlywheelError, match="mid-stream") as info:
        for chunk in client.chat("cut", [{"role": "user", "content": "one two"}], stream=True):
            received.extend(c["delta"].get("content") or "" for c in chunk["choices"])
    assert "".join(received) == "echo: one"
    assert info.value.code == "stream_interrupted"
    with pytest.raises(FlywheelError) as before:  # an error before the answer: at the call
        client.chat("no-such-route", [{"role": "user", "content": "x"}], stream=True)
    assert before.value.status_code == 404


def test_cache_ttl_and_invalidation_on_label_moves(server: RunningServer, wire: Wire) -> None:
    name = _name("cache")
    with Client(server.base_url, server.admin_key, transport=wire, cache_ttl=60) as client:
        client.prompts.create(name, GREETING, labels=["staging"])
        client.prompts.create(name, "v2 {{ x }}")
        sent = len(wire.requests)
        assert client.prompts.get(name, label="staging").version == 1
        assert client.prompts.get(name, label="staging").version == 1
        assert len(wire.requests) == sent + 1  # the second get was served from the cache
        assert client.prompts.get(name, label="staging", cache_ttl=0).version == 1
        assert len(wire.requests) == sent + 2  # a per-call TTL of 0 always asks

        client.prompts.set_label(name, "staging", 2)
        assert client.prompts.get(name, label="staging").version == 2

        client.prompts.remove_label(name, "staging")
        with pytest.raises(FlywheelError) as gone:  # a 4xx is never masked by the cache
            client.prompts.get(name, label="staging")
        assert (gone.value.status_code, gone.value.code) == (404, "label_not_found")

    with Client(server.base_url, server.admin_key, transport=wire, cache_ttl=0) as client:
        before = len(wire.requests)
        client.prompts.get(name)
        client.prompts.get(name)
        assert len(wire.requests) == before + 2


def test_unreachable_server_serves_the_last_known_version(
    client: Client, wire: Wire, caplog: pytest.LogCaptureFixture
) -> None:
    name = _name("stale")
    client.prompts.create(name, GREETING, labels=["staging"])
    known = client.prompts.get(name, label="staging")

    wire.down = True
    with (
        pytest.warns(StalePromptWarning, match="unavailable") as record,
        caplog.at_level(logging.WARNING, logger="flywheel.sdk"),
    ):
        stale = client.prompts.get(name, label="staging", cache_ttl=0)
    assert stale == known
    assert client.base_url in str(record[0].message) and record[0].filename == __file__
    assert any(r.name == "flywheel.sdk" and "version 1" in r.message for r in caplog.records)

    with pytest.raises(FlywheelError) as never_fetched:
        client.prompts.get(name, version=1)
    assert never_fetched.value.status_code == 0
    assert f"{client.base_url}/api/prompts/{name}" in str(never_fetched.value)
    assert "no earlier copy" in str(never_fetched.value)

    wire.down, wire.proxy_503 = False, True
    with pytest.warns(StalePromptWarning):
        assert client.prompts.get(name, label="staging", cache_ttl=0) == known
    with pytest.raises(FlywheelError) as unavailable:
        client.prompts.get(name, label="missing")
    assert unavailable.value.status_code == 503

    wire.proxy_503 = False  # back: the cache is refreshed again
    client.prompts.create(name, "v2", labels=["staging"])
    assert client.prompts.get(name, label="staging").version == 2


def test_errors_carry_status_and_code(client: Client) -> None:
    with pytest.raises(FlywheelError) as unknown:
        client.prompts.get(_name("nope"))
    error = unknown.value
    assert (error.status_code, error.code) == (404, "prompt_not_found")
    assert error.type == "invalid_request_error" and "404" in str(error)

    name = _name("prod")
    version = client.prompts.create(name, GREETING).version
    with pytest.raises(FlywheelError) as protected:
        client.prompts.set_label(name, "production", version)
    assert (protected.value.status_code, protected.value.code) == (409, "approval_required")

    approval = client.prompts.request_approval(name, version, comment="ship it")
    assert approval["status"] == "pending" and approval["label"] == "production"
    assert (approval["name"], approval["version"]) == (name, version)
    pending = client.approvals.list(status="pending")
    assert approval["id"] in [a["id"] for a in pending]
    assert client.approvals.get(approval["id"])["status"] == "pending"
    assert client.approvals.cancel(approval["id"])["status"] == "cancelled"


def test_defaults_from_the_environment(monkeypatch: pytest.MonkeyPatch, server) -> None:
    monkeypatch.setenv("FLYWHEEL_BASE_URL", server.base_url + "/")
    monkeypatch.setenv("FLYWHEEL_API_KEY", server.admin_key)
    with flywheel.Client() as client:
        assert client.base_url == server.base_url
        assert isinstance(client.prompts.list(), list)
