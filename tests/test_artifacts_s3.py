"""The artifact store on a local folder and on S3 (a moto server on loopback), and a Flywheel
server whose artifact root is a bucket: knowledge-base indexes, ingestion uploads and model
registry versions land in the bucket and come back identical."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from flywheel.store.artifacts import ArtifactStore
from flywheel.testing import FakeUpstream
from flywheel.testing.upstream import free_port
from tests.conftest import RunningServer, start_server, stop_server
from tests.test_access import _key_client, _project_with_key

BUCKET = "flywheel-artifacts"


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    client: Any  # a boto3 S3 client: the test's own view of the bucket

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix`` in the bucket, read straight from the server."""
        found: dict[str, bytes] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                body = self.client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"]
                found[item["Key"]] = body.read()
        return found


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on loopback with one bucket; the AWS variables point this process
    (and the servers it starts) at it, exactly as a deployment would point at MinIO."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(endpoint + "/moto-api/", timeout=1)
            break
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"moto server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
    env = {
        # The standard variables botocore reads: no Flywheel setting names the endpoint.
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "flywheel-test",
        "AWS_SECRET_ACCESS_KEY": "flywheel-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        patch.delenv("AWS_PROFILE", raising=False)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        try:
            yield S3Server(endpoint, env, client)
        finally:
            process.terminate()
            process.wait(10)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "artifacts"))
    else:
        request.getfixturevalue("s3")
        yield ArtifactStore(f"s3://{BUCKET}/unit-{secrets.token_hex(4)}")


def _bucket_key(store: ArtifactStore, key: str) -> str:
    """The object key in the bucket for an artifact key of an S3 store."""
    return f"{store.root.split('/', 1)[1]}/{key}"


def _read_tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative posix path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_put_get_exists_and_delete(store: ArtifactStore, request: pytest.FixtureRequest) -> None:
    url = store.put("kb/one/v1/vectors.faiss", b"\x00vectors\xff")
    assert url == store.url("kb/one/v1/vectors.faiss")
    assert url.startswith("s3://" if not store.local else "file://")
    assert store.get("kb/one/v1/vectors.faiss") == b"\x00vectors\xff"
    if not store.local:
        s3: S3Server = request.getfixturevalue("s3")
        bucket_key = _bucket_key(store, "kb/one/v1/vectors.faiss")
        assert s3.objects(bucket_key) == {bucket_key: b"\x00vectors\xff"}
    # Replacing is whole; "folders" exist while something is under them.
    store.put("kb/one/v1/vectors.faiss", b"second")
    store.put("kb/one/v1/bm25.bin", b"")
    assert store.get("kb/one/v1/vectors.faiss") == b"second"
    assert store.get("kb/one/v1/bm25.bin") == b""
    assert store.exists("kb/one/v1/bm25.bin") and store.exists("kb/one")
    assert store.exists("kb/one/v1/") and not store.exists("kb/one/v2")
    assert store.keys("kb") == ["kb/one/v1/bm25.bin", "kb/one/v1/vectors.faiss"]
    assert store.keys("kb/one/v1/bm25.bin") == ["kb/one/v1/bm25.bin"]
    assert store.keys("nothing/here") == []
    assert store.size("kb/one") == len(b"second")
    assert not any(".partial" in key for key in store.keys("kb"))  # no leftovers
    with pytest.raises(FileNotFoundError):
        store.get("kb/one/v9/vectors.faiss")

    # A prefix is a folder name, not a string prefix: deleting m1 leaves m10 alone.
    store.put("models/m1/a.bin", b"a")
    store.put("models/m10/b.bin", b"b")
    store.delete("models/m1")
    assert not store.exists("models/m1") and store.get("models/m10/b.bin") == b"b"
    store.delete("kb/one/v1/vectors.faiss")
    assert store.keys("kb") == ["kb/one/v1/bm25.bin"]
    store.delete("kb")
    assert not store.exists("kb") and store.keys("kb") == []
    store.delete("kb")  # absent: nothing to do


def test_folders_round_trip(store: ArtifactStore, tmp_path: Path) -> None:
    folder = tmp_path / "weights"
    (folder / "sub" / "deeper").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": os.urandom(300_000),
        "sub/tokenizer.json": b"{}",
        "sub/deeper/empty.bin": b"",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    key = f"models/p/m/{secrets.token_hex(4)}"
    url = store.put_folder(key, folder)
    assert url == store.url(key)
    assert store.size(key) == sum(len(d) for d in files.values())
    assert store.keys(key) == sorted(f"{key}/{name}" for name in files)

    cache = tmp_path / "cache"
    local = store.local_folder(key, cache)
    assert _read_tree(local) == files
    if store.local:
        assert not cache.exists()  # read in place: nothing copied
    else:
        assert local.is_relative_to(cache)
        # Downloaded once: the second call is the same folder, with no partial copies left.
        assert store.local_folder(key, cache) == local
        assert [p.name for p in local.parent.iterdir()] == [local.name]
    with pytest.raises(FileNotFoundError):
        store.local_folder("models/p/m/missing", cache)
    store.delete(key)
    assert not store.exists(key)


def test_keys_that_escape_the_root_are_refused(store: ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    for bad in ("../outside", "a/../../outside", "..", "", ".", "/", "a/.."):
        with pytest.raises(ValueError, match="invalid artifact key"):
            store.put(bad, b"x")
        with pytest.raises(ValueError):
            store.get(bad)
        with pytest.raises(ValueError):
            store.exists(bad)
        with pytest.raises(ValueError):
            store.delete(bad)
        with pytest.raises(ValueError):
            store.put_folder(bad, tmp_path / "f")
        with pytest.raises(ValueError):
            store.local_folder(bad, tmp_path / "cache")
    # A leading slash or a dot segment stays inside the root.
    store.put("/abs/./x.bin", b"x")
    assert store.get("abs/x.bin") == b"x"


def test_another_writer_is_seen_at_once(s3: S3Server) -> None:
    """Listings are never cached: what another replica wrote or removed shows up next call."""
    prefix = f"fresh-{secrets.token_hex(4)}"
    store = ArtifactStore(f"s3://{BUCKET}/{prefix}")
    store.put("uploads/a", b"a")
    assert store.keys("uploads") == ["uploads/a"]
    s3.client.put_object(Bucket=BUCKET, Key=f"{prefix}/uploads/b", Body=b"b")
    assert store.keys("uploads") == ["uploads/a", "uploads/b"] and store.exists("uploads/b")
    s3.client.delete_object(Bucket=BUCKET, Key=f"{prefix}/uploads/a")
    assert not store.exists("uploads/a") and store.keys("uploads") == ["uploads/b"]


# -- a Flywheel server on S3 ----------------------------------------------------------------

# Embeddings come from the fake upstream: the server and its job processes then start without
# loading a local model, which keeps this module quick (the indexes are what is tested here).
SERVER_CONFIG = """
providers:
  up: {{type: openai, base_url: "{upstream}"}}
models:
  - {{name: up-embed, provider: up, kind: embedding, upstream_name: echo}}
"""
GUIDE = b"""# Resetting a password

Users who forgot their password ask an administrator, who sets a temporary one.
"""
BILLING = b"""# Refunds

Refunds are paid back to the original card within five business days.
"""
SHIPPING = b"""# Shipping

Parcels leave the warehouse every weekday at noon and arrive within three days.
"""


@dataclass
class S3Flywheel:
    server: RunningServer
    prefix: str  # the artifact root's prefix inside the bucket


@pytest.fixture(scope="module")
def s3_server(
    tmp_path_factory: pytest.TempPathFactory, s3: S3Server, upstream: FakeUpstream
) -> Iterator[S3Flywheel]:
    prefix = f"server-{secrets.token_hex(4)}"
    home = tmp_path_factory.mktemp("s3-flywheel")
    env = {**s3.env, "FLYWHEEL_ARTIFACT_ROOT": f"s3://{BUCKET}/{prefix}"}
    config = SERVER_CONFIG.format(upstream=upstream.base_url)
    running = start_server(home, config, "fw-s3-" + secrets.token_hex(16), env)
    try:
        yield S3Flywheel(running, prefix)
    finally:
        stop_server(running)
    # Nothing was written to the local default root.
    assert not (home / "artifacts").exists() or not any((home / "artifacts").rglob("*"))


def _wait_job(api: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/api/jobs/{job_id}").json()
        if job["status"] in {"succeeded", "failed", "cancelled", "orphaned"}:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def test_knowledge_base_indexes_live_in_the_bucket(s3_server: S3Flywheel, s3: S3Server) -> None:
    server = s3_server.server
    _, key = _project_with_key(server, f"s3kb-{secrets.token_hex(3)}")
    with _key_client(server, key) as api:
        created = api.post(
            "/api/kbs", json={"name": "handbook", "settings": {"embedder": "up-embed"}}
        )
        assert created.status_code == 201, created.text
        files = [("files", ("guide.md", GUIDE)), ("files", ("billing.md", BILLING))]
        report = api.post("/api/kbs/handbook/documents", files=files)
        assert report.status_code == 200, report.text
        assert report.json()["index_version"] == 1

        version = api.get("/api/kbs/handbook/versions").json()["data"][0]
        stored = version["artifacts"]
        kb_prefix = stored["vectors"].rsplit("/", 2)[0]  # kb/<id>
        assert stored["urls"]["vectors"] == f"s3://{BUCKET}/{s3_server.prefix}/{stored['vectors']}"
        in_bucket = s3.objects(f"{s3_server.prefix}/{kb_prefix}/")
        assert set(in_bucket) == {
            f"{s3_server.prefix}/{stored['vectors']}",
            f"{s3_server.prefix}/{stored['bm25']}",
        }
        assert all(len(data) > 0 for data in in_bucket.values())

        found = api.post(
            "/api/kbs/handbook/search",
            json={"query": "when are refunds paid", "mode": "bm25", "top_k": 1},
        )
        assert found.status_code == 200, found.text
        assert found.json()["hits"][0]["source"] == "billing.md"
        # The vector index came back from the bucket too (these fake embeddings rank nothing).
        dense = api.post("/api/kbs/handbook/search", json={"query": "refunds", "mode": "dense"})
        assert {hit["source"] for hit in dense.json()["hits"]} == {"guide.md", "billing.md"}

        # A background ingestion: the upload goes to the bucket, a job process (another
        # interpreter) reads it from there, builds version 2 and removes the upload.
        queued = api.post(
            "/api/kbs/handbook/documents",
            params={"background": "true"},
            files=[("files", ("shipping.md", SHIPPING))],
        )
        assert queued.status_code == 202, queued.text
        job = _wait_job(api, queued.json()["id"])
        assert job["status"] == "succeeded", job
        assert s3.objects(f"{s3_server.prefix}/uploads/") == {}
        versions = api.get("/api/kbs/handbook/versions").json()["data"]
        assert versions[0]["version"] == 2
        assert len(s3.objects(f"{s3_server.prefix}/{kb_prefix}/")) == 4
        shipping = api.post(
            "/api/kbs/handbook/search",
            json={"query": "when do parcels leave", "mode": "bm25", "top_k": 1},
        ).json()
        assert shipping["hits"][0]["source"] == "shipping.md"

        assert api.delete("/api/kbs/handbook").status_code == 204
        assert s3.objects(f"{s3_server.prefix}/{kb_prefix}/") == {}


def test_registry_versions_upload_to_the_bucket_and_download_identical(
    s3_server: S3Flywheel, s3: S3Server, tmp_path: Path
) -> None:
    server = s3_server.server
    _, key = _project_with_key(server, f"s3reg-{secrets.token_hex(3)}")
    files = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": os.urandom(1_000_000),
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    }
    with _key_client(server, key) as api:
        assert api.post("/api/registry", json={"name": "bot"}).status_code == 201
        uploaded = api.post(
            "/api/registry/bot/versions",
            files=[("files", (name, data)) for name, data in files.items()],
            data={"kind": "base", "format": "safetensors"},
        )
        assert uploaded.status_code == 201, uploaded.text
        version = uploaded.json()
        assert version["size_bytes"] == sum(len(d) for d in files.values())
        uri: str = version["uri"]
        root = f"s3://{BUCKET}/{s3_server.prefix}/"
        assert uri.startswith(root + "models/"), uri
        artifact_key = uri.removeprefix(root)

        # In the bucket, byte for byte.
        in_bucket = s3.objects(f"{s3_server.prefix}/{artifact_key}/")
        assert in_bucket == {f"{s3_server.prefix}/{artifact_key}/{n}": d for n, d in files.items()}
        # And downloaded back through the store as a model loader gets it.
        store = ArtifactStore(root)
        local = store.local_folder(artifact_key, tmp_path / "models")
        assert _read_tree(local) == files

        assert api.delete("/api/registry/bot").status_code == 204
        assert s3.objects(f"{s3_server.prefix}/{artifact_key}/") == {}
