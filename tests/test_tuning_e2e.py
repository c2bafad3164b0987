"""The issue's "done when", through the running server on CPU: fine-tune the local SmolLM2 on
a dataset version (LoRA SFT on ~200 examples), watch the loss, merge, quantize, register with a
card and lineage, serve on a route and chat with it; then a DPO step on preference pairs.

One module-scoped chain keeps the model work to one pass (the suite's time budget)."""

from __future__ import annotations

import secrets
import time

import httpx
import pytest

from tests.conftest import RunningServer
from tests.test_access import _key_client, _project_with_key

# The module fixture trains, merges and quantizes: most of the module's 11.5 minutes when run
# alone on the 2-core machine, and more than the suite's 600 s per test on a loaded one. A
# bound against hangs, not a speed claim.
pytestmark = pytest.mark.timeout(1500)

CITIES = [
    "Lisbon",
    "Oslo",
    "Quito",
    "Hanoi",
    "Accra",
    "Lima",
    "Riga",
    "Doha",
    "Perth",
    "Turin",
    "Porto",
    "Bern",
    "Cork",
    "Nice",
    "Kyiv",
    "Minsk",
    "Tunis",
    "Dakar",
    "Sucre",
    "Male",
]
TOPICS = [
    "weather",
    "trains",
    "museums",
    "food",
    "parks",
    "markets",
    "bridges",
    "beaches",
    "hotels",
    "festivals",
]


def _examples() -> list[dict]:
    """200 short instructions with one fixed answer style the model can learn quickly."""
    items = []
    for city in CITIES:
        for topic in TOPICS:
            items.append(
                {
                    "messages": [{"role": "user", "content": f"Tell me about {topic} in {city}."}],
                    "expected": f"FLYWHEEL GUIDE: {city} {topic} are covered in chapter 7.",
                }
            )
    return items


def wait_job(api: httpx.Client, job_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled", "orphaned"}:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")


def run_job(api: httpx.Client, kind: str, params: dict) -> dict:
    submitted = api.post("/api/jobs", json={"kind": kind, "params": params})
    assert submitted.status_code == 201, submitted.text
    job = wait_job(api, submitted.json()["id"])
    log = api.get(f"/api/jobs/{job['id']}/logs").json()["text"]
    assert job["status"] == "succeeded", f"{job['error']}\n{log[-3000:]}"
    # Shown with `pytest -s`: where the module's minutes go.
    print(f"{kind}: {job['finished_at'] - job['started_at']:.1f}s")
    return job


@pytest.fixture(scope="module")
def tuned(server: RunningServer) -> dict:
    """Dataset → SFT adapter → merged → int8, each a job; returns what they made."""
    _, key = _project_with_key(server, f"tune-{secrets.token_hex(3)}")
    with _key_client(server, key) as api:
        api.timeout = 120
        created = api.post("/api/datasets", json={"name": "guide", "items": _examples()})
        assert created.status_code == 201, created.text
        sft = run_job(
            api,
            "tune.sft",
            {
                "dataset": "guide@1",
                "register": "guide-bot",
                "settings": {
                    "learning_rate": 1e-3,
                    "epochs": 1,
                    "batch_size": 8,
                    "max_length": 64,
                    "lora": {"rank": 8, "alpha": 16},
                },
            },
        )
        merged = run_job(api, "merge", {"model": sft["result"]["model"]})
        quantized = run_job(
            api,
            "quantize",
            {"model": merged["result"]["model"], "method": "bnb-int8", "eval_dataset": "guide@1"},
        )
    return {"key": key, "sft": sft, "merged": merged, "quantized": quantized}


def test_sft_lowers_held_out_loss_and_tracks_the_loss_curve(server, tuned) -> None:
    result = tuned["sft"]["result"]
    assert result["dataset"] == "guide@1"
    # Held-out loss (the dataset's test split) drops measurably.
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.5, result
    assert result["tokens_per_second"] > 0 and result["peak_memory_bytes"] > 0
    with _key_client(server, tuned["key"]) as api:
        run = api.get(f"/api/runs/{result['run_id']}").json()
        losses = [value for _, value in run["metrics"]["loss"]]
        assert len(losses) >= 5 and losses[-1] < losses[0]
        assert "learning_rate" in run["metrics"] and "tokens_per_second" in run["metrics"]
        assert run["params"]["lora"]["rank"] == 8 and run["packages"]["peft"]
        assert run["system"]["cpu_count"] >= 1
        logs = api.get(f"/api/jobs/{tuned['sft']['id']}/logs").json()["text"]
        assert "training and" in logs and "registered guide-bot@" in logs


def test_merged_and_quantized_versions_carry_lineage_and_a_card(server, tuned) -> None:
    quantized = tuned["quantized"]["result"]
    assert quantized["after"]["size_bytes"] < quantized["before"]["size_bytes"]
    with _key_client(server, tuned["key"]) as api:
        versions = api.get("/api/registry/guide-bot").json()["versions"]
        kinds = [v["kind"] for v in sorted(versions, key=lambda v: v["version"])]
        assert kinds == ["adapter", "merged", "quantized"]
        name, _, number = quantized["model"].partition("@")
        lineage = api.get(f"/api/registry/{name}/versions/{number}/lineage").json()
        types = {node["type"] for node in lineage["nodes"]}
        assert {"dataset", "run", "job", "model_version"} <= types
        card = api.get(f"/api/registry/{name}/versions/{number}/card").text
        assert "guide@1" in card and "bnb-int8" in card


def test_the_quantized_model_serves_through_the_gateway(server, tuned) -> None:
    ref = tuned["quantized"]["result"]["model"]
    name, _, number = ref.partition("@")
    with httpx.Client(
        base_url=server.base_url,
        headers={"Authorization": f"Bearer {server.admin_key}"},
        timeout=300,
    ) as admin:
        served = admin.post(
            f"/api/registry/{name}/versions/{number}/serve",
            json={"route": "guide-route"},
            headers={"X-Flywheel-Project": _project_of(server, tuned["key"])},
        )
        assert served.status_code == 200, served.text
        model_name = served.json()["served_name"]
        deadline = time.monotonic() + 120
        while True:
            chat = admin.post(
                "/v1/chat/completions",
                json={
                    "model": "guide-route",
                    "messages": [{"role": "user", "content": "Tell me about trains in Oslo."}],
                    "max_tokens": 16,
                },
            )
            if chat.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert chat.status_code == 200, chat.text
        assert chat.json()["model"] == model_name
        assert chat.json()["choices"][0]["message"]["content"]


def _project_of(server: RunningServer, key: str) -> str:
    with _key_client(server, key) as api:
        return api.get("/api/me").json()["project_id"]


def test_dpo_runs_on_exported_feedback_pairs(server, tuned) -> None:
    """Chat → corrections as feedback → the DPO export → a dataset version → a DPO step."""
    with _key_client(server, tuned["key"]) as api:
        trace_ids = []
        for city in CITIES[:8]:
            chat = api.post(
                "/v1/chat/completions",
                json={"model": "echo", "messages": [{"role": "user", "content": f"Greet {city}."}]},
            )
            assert chat.status_code == 200, chat.text
            trace_ids.append((city, chat.headers["x-flywheel-trace-id"]))
        for city, trace_id in trace_ids:
            deadline = time.monotonic() + 10
            while api.get(f"/api/traces/{trace_id}").status_code != 200:
                assert time.monotonic() < deadline, trace_id
                time.sleep(0.05)
            feedback = api.post(
                f"/api/traces/{trace_id}/feedback",
                json={"rating": "down", "correction": f"Hello, {city}! Welcome."},
            )
            assert feedback.status_code == 201, feedback.text
        exported = api.get("/api/feedback/export", params={"format": "dpo"})
        assert exported.status_code == 200 and len(exported.text.splitlines()) == 8
        imported = api.post(
            "/api/datasets/prefs/import",
            params={"filename": "feedback-dpo.jsonl", "test_fraction": 0},
            content=exported.content,
        )
        assert imported.status_code == 201, imported.text
        dpo = run_job(
            api,
            "tune.dpo",
            {
                "dataset": f"prefs@{imported.json()['version']}",
                "base": tuned["merged"]["result"]["model"],
                "settings": {"max_steps": 3, "batch_size": 4, "max_length": 48},
            },
        )
    assert dpo["result"]["steps"] == 3
    assert dpo["result"]["model"].startswith("prefs-dpo@")
