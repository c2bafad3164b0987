"""The hash-chained audit log on a real database: a SQLite file, or with ``--db=postgres``
a fresh database on the test PostgreSQL server (tests/pg.py)."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from flywheel.security.audit import (
    COLUMNS,
    GENESIS_HASH,
    REDACTED,
    AuditLog,
    AuditVerification,
    entry_hash,
    redact,
    to_dict,
    verify_chain,
)
from flywheel.store import AuditEvent, Base, Database, Project

TABLE = Base.metadata.tables["audit_events"]


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'a.db'}")
    database.migrate()
    yield database
    database.dispose()


def _record_n(audit: AuditLog, n: int) -> list[AuditEvent]:
    return [
        audit.record(
            actor=f"user:u{i % 3}",
            action="project.update",
            resource_type="project",
            resource_id=f"p{i}",
            project_id="p1",
            before={"n": i, "ratio": i / 7},
            after={"n": i + 1, "ratio": (i + 1) / 7},
        )
        for i in range(n)
    ]


def _stored(db: Database) -> list[dict]:
    with db.engine.connect() as connection:
        rows = connection.execute(select(TABLE).order_by(TABLE.c.seq)).mappings()
        return [dict(row) for row in rows]


# -- the chain ------------------------------------------------------------------------------


def test_entry_hash_is_sha256_of_the_canonical_json() -> None:
    # Pinned: changing the encoding would make every stored chain fail verification.
    fields: dict[str, Any] = {
        "seq": 1,
        "ts": 0.1 + 0.2,
        "actor": "user:ana",
        "action": "project.create",
        "resource_type": "project",
        "resource_id": "p1",
        "project_id": "p1",
        "before": None,
        "after": {"tags": ["a"], "name": "Zoë", "n": 1.5},
        "hash": "ignored",
    }
    canonical = (
        '{"action":"project.create","actor":"user:ana","after":{"n":1.5,"name":"Zoë",'
        '"tags":["a"]},"before":null,"prev_hash":"' + GENESIS_HASH + '","project_id":"p1",'
        '"resource_id":"p1","resource_type":"project","seq":1,"ts":0.30000000000000004}'
    )
    expected = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert entry_hash(GENESIS_HASH, fields) == expected
    assert expected == "1813f7e9e81bd38e1e49f82b7375121bb6d960df8cba85b73a3a546209f54230"
    assert entry_hash("f" * 64, fields) != expected
    assert entry_hash(GENESIS_HASH, {**fields, "ts": fields["ts"] + 1e-9}) != expected


def test_chain_of_entries_verifies(db: Database) -> None:
    audit = AuditLog(db, page_size=2)  # several pages, so the walk crosses page boundaries
    events = _record_n(audit, 7)

    assert [e.seq for e in events] == list(range(1, 8))
    assert events[0].prev_hash == GENESIS_HASH
    for previous, event in itertools.pairwise(events):
        assert event.prev_hash == previous.hash
    rows = _stored(db)
    assert [row["hash"] for row in rows] == [e.hash for e in events]
    for row in rows:  # what was read back hashes as what was written: floats are exact
        assert entry_hash(row["prev_hash"], row) == row["hash"]
    assert audit.verify() == AuditVerification(ok=True, checked=7)


def test_empty_log_verifies(db: Database) -> None:
    assert AuditLog(db).verify() == AuditVerification(
        ok=True, checked=0, first_bad_seq=None, problem=None
    )


@pytest.mark.parametrize(
    ("column", "value"),
    [("after", {"n": 999}), ("actor", "user:mallory"), ("ts", 1.0), ("project_id", "p2")],
)
def test_an_edited_entry_fails_verification_at_that_entry(
    db: Database, column: str, value: object
) -> None:
    audit = AuditLog(db, page_size=2)
    _record_n(audit, 5)
    with db.engine.begin() as connection:
        connection.execute(update(TABLE).where(TABLE.c.seq == 3).values({column: value}))

    assert audit.verify() == AuditVerification(
        ok=False,
        checked=2,
        first_bad_seq=3,
        problem="entry 3: hash does not match its contents (edited?)",
    )


def test_an_edit_with_raw_sql_text_is_detected(db: Database) -> None:
    audit = AuditLog(db)
    _record_n(audit, 4)
    with db.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET actor = 'user:mallory' WHERE seq = 4"))

    result = audit.verify()
    assert (result.ok, result.checked, result.first_bad_seq) == (False, 3, 4)


def test_an_entry_edited_into_invalid_json_is_reported_not_raised(sqlite_db: Database) -> None:
    audit = AuditLog(sqlite_db)
    _record_n(audit, 3)
    with sqlite_db.engine.begin() as connection:  # SQLite lets any text into a JSON column
        connection.execute(text("UPDATE audit_events SET after = 'not json' WHERE seq = 2"))

    assert audit.verify() == AuditVerification(
        ok=False,
        checked=1,
        first_bad_seq=2,
        problem="entry 2: contents cannot be read (edited?)",
    )


def test_an_edit_rehashed_by_the_editor_breaks_the_next_link(db: Database) -> None:
    audit = AuditLog(db)
    _record_n(audit, 5)
    forged = {**_stored(db)[2], "after": {"n": 999}}
    with db.engine.begin() as connection:
        connection.execute(
            update(TABLE)
            .where(TABLE.c.seq == 3)
            .values(after=forged["after"], hash=entry_hash(forged["prev_hash"], forged))
        )

    assert audit.verify() == AuditVerification(
        ok=False,
        checked=3,
        first_bad_seq=4,
        problem="entry 4: prev_hash does not match entry 3 (deleted, reordered or rewritten?)",
    )


@pytest.mark.parametrize(
    ("deleted", "checked", "problem"),
    [
        ([3], 2, "entry 3 is missing (deleted?)"),
        ([1], 0, "entry 1 is missing (deleted?)"),
        ([2, 3, 4], 1, "entries 2-4 are missing (deleted?)"),
    ],
)
def test_deleted_entries_are_detected(
    db: Database, deleted: list[int], checked: int, problem: str
) -> None:
    audit = AuditLog(db, page_size=2)
    _record_n(audit, 6)
    with db.engine.begin() as connection:
        connection.execute(delete(TABLE).where(TABLE.c.seq.in_(deleted)))

    assert audit.verify() == AuditVerification(
        ok=False, checked=checked, first_bad_seq=deleted[0], problem=problem
    )


def test_a_rebuilt_chain_must_start_at_genesis(db: Database) -> None:
    """Every hash recomputed consistently, but from a made-up start: still caught."""
    audit = AuditLog(db)
    _record_n(audit, 3)
    rows = _stored(db)
    prev_hash = "1" * 64
    with db.engine.begin() as connection:
        for row in rows:
            row_hash = entry_hash(prev_hash, row)
            connection.execute(
                update(TABLE)
                .where(TABLE.c.seq == row["seq"])
                .values(prev_hash=prev_hash, hash=row_hash)
            )
            prev_hash = row_hash

    assert audit.verify() == AuditVerification(
        ok=False,
        checked=0,
        first_bad_seq=1,
        problem="entry 1: prev_hash is not the genesis hash (rewritten?)",
    )


# -- redaction ------------------------------------------------------------------------------


def test_redact_hides_secret_keys_at_any_depth_and_copies() -> None:
    value: dict[str, Any] = {
        "name": "svc",
        "API_Key": "sk-live-123",
        "nested": {"password": "x", "list": [{"Authorization": "Bearer y"}, "plain"]},
        "private_key": {"pem": "z"},
        "key_hash": "abc",
        "client_secret": None,  # nothing to hide, and shows that no secret was set
        "max_tokens": 256,  # a count, not a credential
        "refresh_token": "r-1",
        "tokens_per_minute": 1000,
        "ciphertext": "gAAAA",
    }
    original = json.loads(json.dumps(value))

    assert redact(value) == {
        "name": "svc",
        "API_Key": REDACTED,
        "nested": {"password": REDACTED, "list": [{"Authorization": REDACTED}, "plain"]},
        "private_key": REDACTED,
        "key_hash": REDACTED,
        "client_secret": None,
        "max_tokens": 256,
        "refresh_token": REDACTED,
        "tokens_per_minute": 1000,
        "ciphertext": REDACTED,
    }
    assert value == original  # the input is left alone
    copied = redact(value)
    copied["nested"]["list"].append("more")
    assert value["nested"]["list"] == original["nested"]["list"]
    assert redact(["a", ("b", {"token": "t"})]) == ["a", ("b", {"token": REDACTED})]


def test_secrets_never_reach_the_database_file(sqlite_db: Database, tmp_path: Path) -> None:
    audit = AuditLog(sqlite_db)
    secret_bits = {"api_key": "sk-live-123", "nested": {"password": "hunter2-pw"}}
    event = audit.record(
        actor="user:ana",
        action="key.create",
        resource_type="api_key",
        before={**secret_bits, "note": "visible-marker-before"},
        after={**secret_bits, "note": "visible-marker-after"},
    )
    assert event.after == {
        "api_key": REDACTED,
        "nested": {"password": REDACTED},
        "note": "visible-marker-after",
    }
    sqlite_db.dispose()  # close connections so nothing is only in memory

    # WAL mode: recent writes may live in a-db-wal rather than the main file, so read all.
    raw = b"".join(path.read_bytes() for path in tmp_path.glob("a.db*"))
    assert b"visible-marker-before" in raw and b"visible-marker-after" in raw
    assert b"sk-live-123" not in raw
    assert b"hunter2-pw" not in raw
    assert AuditLog(sqlite_db).verify().ok


# -- recording ------------------------------------------------------------------------------


def test_record_in_the_callers_transaction_commits_with_it(db: Database) -> None:
    audit = AuditLog(db)
    with db.session() as session:
        session.add(Project(id="p1", name="p1", description="", created_at=time.time()))
        session.flush()
        event = audit.record(
            actor="user:ana",
            action="project.create",
            resource_type="project",
            resource_id="p1",
            project_id="p1",
            after={"name": "p1"},
            session=session,
        )
        assert event.seq == 1

    assert [e.action for e in audit.list()] == ["project.create"]
    assert audit.verify() == AuditVerification(ok=True, checked=1)


def test_record_in_a_failed_transaction_leaves_no_entry(db: Database) -> None:
    audit = AuditLog(db)
    _record_n(audit, 2)
    with pytest.raises(RuntimeError, match="boom"), db.session() as session:
        session.add(Project(id="p9", name="p9", description="", created_at=time.time()))
        session.flush()
        audit.record(
            actor="user:ana",
            action="project.create",
            resource_type="project",
            resource_id="p9",
            session=session,
        )
        raise RuntimeError("boom")

    with db.session() as session:
        assert session.get(Project, "p9") is None
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 2
    assert audit.verify() == AuditVerification(ok=True, checked=2)
    # The next entry takes the rolled-back one's seq, and the chain stays whole.
    assert _record_n(audit, 1)[0].seq == 3
    assert audit.verify() == AuditVerification(ok=True, checked=3)


def test_record_fits_hostile_text_and_refuses_bad_input(db: Database) -> None:
    audit = AuditLog(db)
    long_actor = "user:" + "x" * 5000
    event = audit.record(
        actor=long_actor, action="login.failure", resource_type="user", resource_id="a\x00b"
    )
    assert len(event.actor) == 200 and event.actor.endswith("\u2026")
    assert event.actor[:-1] == long_actor[:199]
    assert event.resource_id == "a\ufffdb"

    with pytest.raises(ValueError, match="actor"):
        audit.record(actor="", action="x", resource_type="y")
    with pytest.raises(TypeError, match="after must be JSON-serialisable"):
        audit.record(actor="a", action="x", resource_type="y", after={"when": object()})
    with pytest.raises(ValueError, match="before must be JSON-serialisable"):
        audit.record(actor="a", action="x", resource_type="y", before={"v": float("nan")})

    assert [e.seq for e in audit.list()] == [1]
    assert audit.verify() == AuditVerification(ok=True, checked=1)


def test_before_and_after_are_stored_as_they_read_back(db: Database) -> None:
    """Tuples and non-string keys are normalised first, or the stored hash would not match."""
    audit = AuditLog(db)
    event = audit.record(
        actor="a", action="x", resource_type="y", after={1: ("a", 2.5), "f": 1e-300}
    )
    assert event.after == {"1": ["a", 2.5], "f": 1e-300}
    assert audit.list()[0].after == event.after
    assert audit.verify().ok


def test_concurrent_appends_from_threads_make_one_chain(db: Database) -> None:
    audit = AuditLog(db, page_size=64)
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        try:
            for i in range(25):
                audit.record(
                    actor=f"worker:{worker}",
                    action="label.move",
                    resource_type="prompt",
                    after={"i": i},
                )
        except BaseException as exc:  # surfaced below: a thread's error would be lost
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert [row["seq"] for row in _stored(db)] == list(range(1, 201))
    assert audit.retries == 0  # the process lock serialises them: no race was even lost
    assert audit.verify() == AuditVerification(ok=True, checked=200)


def test_two_logs_on_one_database_make_one_chain(db: Database) -> None:
    """Two AuditLogs with their own engines stand for two processes: their process locks do
    not see each other, so only the database (locks, unique columns) and the retry on a lost
    race keep the chain whole."""
    other_db = Database(db.url)
    logs = [AuditLog(db, page_size=50), AuditLog(other_db, page_size=50)]
    errors: list[BaseException] = []

    def append(audit: AuditLog, worker: int) -> None:
        try:
            for i in range(25):
                audit.record(
                    actor=f"worker:{worker}",
                    action="approval.approve",
                    resource_type="approval",
                    after={"i": i},
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(logs[w % 2], w)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other_db.dispose()

    assert errors == []
    assert [row["seq"] for row in _stored(db)] == list(range(1, 201))
    for audit in logs:
        assert audit.verify() == AuditVerification(ok=True, checked=200)


def _race_against_another_writer(db: Database, append: Callable[[], AuditEvent]) -> object:
    """Run ``append`` while another process holds an uncommitted entry 1, then commit that.

    The row (and, on SQLite, the write lock) is held, so ``append`` reads the old, empty
    tail and waits on its insert; it finds entry 1 taken once the other commits. Returns
    what ``append`` returned or raised.
    """
    other = Database(db.url)
    first = {
        "seq": 1,
        "ts": time.time(),
        "actor": "process:b",
        "action": "key.revoke",
        "resource_type": "api_key",
        "resource_id": None,
        "project_id": None,
        "before": None,
        "after": None,
    }
    outcome: list[object] = []
    started = threading.Event()

    def run() -> None:
        started.set()
        try:
            outcome.append(append())
        except BaseException as exc:  # handed back: a thread's error would be lost
            outcome.append(exc)

    with other.engine.connect() as connection:
        transaction = connection.begin()
        row = {**first, "prev_hash": GENESIS_HASH, "hash": entry_hash(GENESIS_HASH, first)}
        connection.execute(insert(TABLE).values(row))
        thread = threading.Thread(target=run)
        thread.start()
        assert started.wait(30)
        time.sleep(0.5)  # ample time to read the tail and reach the blocking insert
        assert thread.is_alive(), f"the append did not wait for the other writer: {outcome}"
        transaction.commit()
    thread.join(timeout=30)
    other.dispose()
    assert len(outcome) == 1, outcome
    return outcome[0]


def test_an_append_that_loses_a_race_retries_on_the_new_tail(db: Database) -> None:
    audit = AuditLog(db)
    event = _race_against_another_writer(
        db, lambda: audit.record(actor="a", action="x", resource_type="y")
    )

    assert isinstance(event, AuditEvent), event
    first = _stored(db)[0]
    assert (event.seq, event.prev_hash) == (2, first["hash"])
    assert audit.retries == 1
    assert audit.verify() == AuditVerification(ok=True, checked=2)


def test_a_lost_race_in_the_callers_transaction_raises(db: Database) -> None:
    """The caller's transaction cannot be retried from inside: it fails rather than fork."""
    audit = AuditLog(db)

    def append_in_a_transaction() -> AuditEvent:
        with db.session() as session:
            return audit.record(actor="a", action="x", resource_type="y", session=session)

    outcome = _race_against_another_writer(db, append_in_a_transaction)

    assert isinstance(outcome, IntegrityError), outcome
    assert [row["actor"] for row in _stored(db)] == ["process:b"]
    assert audit.verify() == AuditVerification(ok=True, checked=1)


def test_appends_in_concurrent_transactions_queue_instead_of_failing(db: Database) -> None:
    """Two transactions that each make a change and audit it: the second waits for the first
    (SQLite: its write lock; PostgreSQL: the lock on the tail row) and chains after it."""
    audit = AuditLog(db)
    _record_n(audit, 1)  # the tail row to lock on PostgreSQL
    other_db = Database(db.url)
    outcome: list[object] = []
    started = threading.Event()

    def change_and_audit(database: Database, project: str) -> AuditEvent:
        with database.session() as session:
            session.add(Project(id=project, name=project, description="", created_at=1.0))
            session.flush()
            return audit.record(
                actor="a", action="project.create", resource_type="project", session=session
            )

    def second() -> None:
        started.set()
        try:
            outcome.append(change_and_audit(other_db, "p2"))
        except BaseException as exc:
            outcome.append(exc)

    with db.session() as session:
        session.add(Project(id="p1", name="p1", description="", created_at=1.0))
        session.flush()
        first = audit.record(
            actor="a", action="project.create", resource_type="project", session=session
        )
        thread = threading.Thread(target=second)
        thread.start()
        assert started.wait(30)
        time.sleep(0.5)
        assert thread.is_alive(), f"the second append did not wait: {outcome}"
    thread.join(timeout=30)
    other_db.dispose()

    assert len(outcome) == 1 and isinstance(outcome[0], AuditEvent), outcome
    assert (first.seq, outcome[0].seq) == (2, 3)
    assert outcome[0].prev_hash == first.hash
    assert audit.retries == 0
    assert audit.verify() == AuditVerification(ok=True, checked=3)


# -- reading --------------------------------------------------------------------------------


@pytest.fixture
def mixed_log(db: Database) -> tuple[AuditLog, list[AuditEvent]]:
    audit = AuditLog(db, page_size=3)
    plan = [
        ("user:ana", "project.create", "p1"),
        ("user:bob", "key.revoke", "p1"),
        ("user:ana", "login.success", None),
        ("user:ana", "label.move", "p2"),
        ("user:bob", "key.revoke", "p2"),
        ("user:cy", "approval.approve", "p1"),
        ("user:ana", "key.revoke", "p1"),
        ("user:bob", "login.failure", None),
    ]
    events = []
    for actor, action, project in plan:
        events.append(
            audit.record(
                actor=actor,
                action=action,
                resource_type="thing",
                resource_id='r,"1"\nline two',  # CSV has to quote this
                project_id=project,
                before={"v": [1, 2.25, "é"]},
                after={"v": None, "deep": {"ok": True}},
            )
        )
        time.sleep(0.002)  # distinct timestamps for the since/until filters
    return audit, events


def test_list_is_newest_first_with_filters(mixed_log: tuple[AuditLog, list[AuditEvent]]) -> None:
    audit, events = mixed_log

    def seqs(**filters: object) -> list[int]:
        return [e.seq for e in audit.list(**filters)]  # type: ignore[arg-type]

    assert seqs() == [8, 7, 6, 5, 4, 3, 2, 1]
    assert seqs(project_id="p1") == [7, 6, 2, 1]
    assert seqs(project_id="p2") == [5, 4]
    assert seqs(action="key.revoke") == [7, 5, 2]
    assert seqs(actor="user:bob") == [8, 5, 2]
    assert seqs(project_id="p1", action="key.revoke", actor="user:ana") == [7]
    assert seqs(since=events[3].ts) == [8, 7, 6, 5, 4]
    assert seqs(until=events[3].ts) == [3, 2, 1]
    assert seqs(since=events[2].ts, until=events[5].ts) == [5, 4, 3]
    assert seqs(action="no.such") == []
    listed = audit.list(limit=1)[0]
    assert to_dict(listed) == to_dict(events[-1])
    assert list(to_dict(listed)) == list(COLUMNS)


def test_list_pages_by_seq(mixed_log: tuple[AuditLog, list[AuditEvent]]) -> None:
    audit, _ = mixed_log
    pages: list[list[int]] = []
    before_seq = None
    while True:
        page = audit.list(limit=3, before_seq=before_seq)
        if not page:
            break
        pages.append([e.seq for e in page])
        before_seq = page[-1].seq
    assert pages == [[8, 7, 6], [5, 4, 3], [2, 1]]
    assert [e.seq for e in audit.list(project_id="p1", limit=2, before_seq=7)] == [6, 2]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="limit"):
            audit.list(limit=bad)


def test_export_jsonl_round_trips(mixed_log: tuple[AuditLog, list[AuditEvent]]) -> None:
    audit, events = mixed_log
    lines = list(audit.export("jsonl"))  # page_size 3: several pages

    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    parsed = [json.loads(line) for line in lines]
    assert parsed == [to_dict(e) for e in events]  # oldest first, every column, exact floats
    assert verify_chain(parsed) == AuditVerification(ok=True, checked=8)
    # The export is the evidence: a change to it is caught offline too.
    parsed[4]["actor"] = "user:mallory"
    assert verify_chain(parsed).first_bad_seq == 5

    filtered = [json.loads(line) for line in audit.export("jsonl", project_id="p1")]
    assert [row["seq"] for row in filtered] == [1, 2, 6, 7]
    pinned = audit.export("jsonl", action="key.revoke", before_seq=7)
    assert [json.loads(line)["seq"] for line in pinned] == [2, 5]


def test_export_csv_round_trips(mixed_log: tuple[AuditLog, list[AuditEvent]]) -> None:
    audit, events = mixed_log
    text_out = "".join(audit.export("csv"))
    reader = csv.DictReader(io.StringIO(text_out))

    assert tuple(reader.fieldnames or ()) == COLUMNS
    rows = list(reader)
    assert len(rows) == len(events)
    for row, event in zip(rows, events, strict=True):
        assert int(row["seq"]) == event.seq
        assert float(row["ts"]) == event.ts  # exact, not rounded
        assert row["actor"] == event.actor and row["action"] == event.action
        assert row["resource_id"] == event.resource_id
        assert (row["project_id"] or None) == event.project_id
        assert json.loads(row["before"]) == event.before
        assert json.loads(row["after"]) == event.after
        assert (row["prev_hash"], row["hash"]) == (event.prev_hash, event.hash)
    header_only = list(audit.export("csv", actor="nobody"))
    assert header_only == [",".join(COLUMNS) + "\n"]


def test_export_refuses_an_unknown_format_at_once(db: Database) -> None:
    with pytest.raises(ValueError, match="unknown export format 'xml'"):
        AuditLog(db).export("xml")  # type: ignore[arg-type]
