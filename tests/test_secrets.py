"""Secrets at rest: master key handling, AES-GCM sealing, the store and log redaction.

Real SQLite files in tmp_path with the real migrations; no mocks.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import secrets
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from flywheel.security.secrets import (
    REDACTED,
    REDACTOR,
    MasterKeyError,
    SecretBox,
    SecretDecryptError,
    SecretRedactor,
    SecretStore,
    install_redactor,
    load_master_key,
)
from flywheel.store import DEFAULT_PROJECT_ID, Database, Project, StoredSecret
from tests.conftest import database_files

OTHER_PROJECT = "other"


def _distinctive_secret() -> str:
    return "sk-test-" + secrets.token_hex(16)


def _add_project(db: Database, project_id: str) -> None:
    with db.session() as session:
        session.add(Project(id=project_id, name=f"project {project_id}", created_at=time.time()))


def _ciphertext(db: Database, project_id: str, name: str) -> str:
    with db.session() as session:
        token = session.scalars(
            select(StoredSecret.ciphertext).where(
                StoredSecret.project_id == project_id, StoredSecret.name == name
            )
        ).one()
    return token


def _set_ciphertext(db: Database, project_id: str, name: str, token: str) -> None:
    with db.session() as session:
        row = session.scalars(
            select(StoredSecret).where(
                StoredSecret.project_id == project_id, StoredSecret.name == name
            )
        ).one()
        row.ciphertext = token


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    _add_project(database, OTHER_PROJECT)
    yield database
    database.dispose()


@pytest.fixture
def box() -> SecretBox:
    return SecretBox(os.urandom(32))


@pytest.fixture
def redactor() -> SecretRedactor:
    return SecretRedactor()


@pytest.fixture
def store(db: Database, box: SecretBox, redactor: SecretRedactor) -> SecretStore:
    return SecretStore(db, box, redactor=redactor)


# --- store -----------------------------------------------------------------------------------


def test_set_and_reveal_round_trip(store: SecretStore) -> None:
    value = _distinctive_secret()
    info = store.set(DEFAULT_PROJECT_ID, "OPENAI_API_KEY", value, actor="alice")
    assert info.name == "OPENAI_API_KEY"
    assert info.project_id == DEFAULT_PROJECT_ID
    assert info.created_by == "alice"
    assert info.created_at == info.updated_at
    assert store.reveal(DEFAULT_PROJECT_ID, "OPENAI_API_KEY") == value
    # Non-ASCII values survive the UTF-8 round trip.
    store.set(DEFAULT_PROJECT_ID, "unicode", "pässwörd-ключ-🔑")
    assert store.reveal(DEFAULT_PROJECT_ID, "unicode") == "pässwörd-ключ-🔑"


def test_same_name_in_two_projects_is_two_secrets(store: SecretStore) -> None:
    store.set(DEFAULT_PROJECT_ID, "KEY", "value-for-default")
    store.set(OTHER_PROJECT, "KEY", "value-for-other")
    assert store.reveal(DEFAULT_PROJECT_ID, "KEY") == "value-for-default"
    assert store.reveal(OTHER_PROJECT, "KEY") == "value-for-other"
    assert [info.name for info in store.list(OTHER_PROJECT)] == ["KEY"]


def test_replace_updates_value_and_updated_at_only(store: SecretStore) -> None:
    first = store.set(DEFAULT_PROJECT_ID, "KEY", "first-value-123", actor="alice")
    time.sleep(0.01)
    second = store.set(DEFAULT_PROJECT_ID, "KEY", "second-value-456", actor="bob")
    assert store.reveal(DEFAULT_PROJECT_ID, "KEY") == "second-value-456"
    assert second.updated_at > first.updated_at
    assert second.created_at == first.created_at
    assert second.created_by == "alice"
    assert [info.name for info in store.list(DEFAULT_PROJECT_ID)] == ["KEY"]


def test_list_shows_metadata_but_never_the_value(store: SecretStore) -> None:
    # Letters only, so no fragment can collide with digits of a timestamp.
    value = "sk-live-AbCdEfGhIjKlMnOpQrStUvWxYz-zyxw"
    store.set(DEFAULT_PROJECT_ID, "b_key", value, actor="alice")
    store.set(DEFAULT_PROJECT_ID, "a_key", "another-secret-value")
    store.set(OTHER_PROJECT, "not_listed", "secret-of-other-project")
    infos = store.list(DEFAULT_PROJECT_ID)
    assert [info.name for info in infos] == ["a_key", "b_key"]
    as_dicts = [info.to_dict() for info in infos]
    assert set(as_dicts[1]) == {
        "project_id",
        "name",
        "created_at",
        "updated_at",
        "created_by",
        "hint",
    }
    assert as_dicts[1]["created_by"] == "alice"
    text = repr(as_dicts) + repr(infos)
    for fragment in (value, value[:8], value[-4:], "AbCdEf", "another-secret", "secret-of"):
        assert fragment not in text


def test_hint_is_not_derived_from_the_content(store: SecretStore) -> None:
    store.set(DEFAULT_PROJECT_ID, "one", "A" * 40)
    store.set(DEFAULT_PROJECT_ID, "two", "z" * 40)
    hints = {info.name: info.hint for info in store.list(DEFAULT_PROJECT_ID)}
    assert hints["one"] == hints["two"]
    assert "A" not in hints["one"] and "z" not in hints["two"]


def test_delete(store: SecretStore) -> None:
    store.set(DEFAULT_PROJECT_ID, "KEY", "to-be-deleted")
    store.set(OTHER_PROJECT, "KEY", "kept-in-other-project")
    assert store.delete(DEFAULT_PROJECT_ID, "KEY") is True
    assert store.delete(DEFAULT_PROJECT_ID, "KEY") is False
    assert store.list(DEFAULT_PROJECT_ID) == []
    assert store.reveal(OTHER_PROJECT, "KEY") == "kept-in-other-project"


def test_reveal_missing_names_the_secret(store: SecretStore) -> None:
    with pytest.raises(KeyError, match="NOT_THERE") as caught:
        store.reveal(DEFAULT_PROJECT_ID, "NOT_THERE")
    assert DEFAULT_PROJECT_ID in str(caught.value)


@pytest.mark.parametrize(
    "name",
    ["", "has space", "a/b", "x" * 129, "naïve", "trailing\n", "semi;colon", "$HOME"],
)
def test_invalid_names_are_refused(store: SecretStore, name: str) -> None:
    with pytest.raises(ValueError, match=r"invalid secret name .*A-Z, a-z, 0-9"):
        store.set(DEFAULT_PROJECT_ID, name, "a-valid-value")
    assert store.list(DEFAULT_PROJECT_ID) == []


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "a.b-c_d", "x" * 128, "0"])
def test_valid_names_are_accepted(store: SecretStore, name: str) -> None:
    store.set(DEFAULT_PROJECT_ID, name, "a-valid-value")
    assert store.reveal(DEFAULT_PROJECT_ID, name) == "a-valid-value"


@pytest.mark.parametrize("value", ["", "   ", "\n\t"])
def test_empty_values_are_refused(store: SecretStore, value: str) -> None:
    with pytest.raises(ValueError, match="'KEY' has an empty value"):
        store.set(DEFAULT_PROJECT_ID, "KEY", value)
    assert store.list(DEFAULT_PROJECT_ID) == []


def test_unknown_project_is_refused(store: SecretStore) -> None:
    with pytest.raises(ValueError, match="project 'nope' does not exist"):
        store.set("nope", "KEY", "some-value-123")


def test_database_files_do_not_contain_the_secret(db: Database, store: SecretStore) -> None:
    value = _distinctive_secret()
    name = "DISTINCTIVE_NAME_" + uuid.uuid4().hex[:8]
    store.set(DEFAULT_PROJECT_ID, name, value)
    assert store.reveal(DEFAULT_PROJECT_ID, name) == value
    db.dispose()

    files = database_files(db.url)
    assert files, "the database folder is empty"
    content = b"".join(path.read_bytes() for path in files)
    # The scan sees the data: the (non-secret) name is stored in the clear.
    assert name.encode() in content
    raw = value.encode("utf-8")
    forbidden = [
        raw,
        raw.hex().encode(),
        value.encode("utf-16-le"),
        base64.b64encode(raw).rstrip(b"="),
        base64.urlsafe_b64encode(raw).rstrip(b"="),
        value.split("-")[-1].encode(),  # the random part alone
    ]
    for needle in forbidden:
        assert needle not in content


# --- encryption ------------------------------------------------------------------------------


def test_token_format_and_fresh_nonce(box: SecretBox) -> None:
    first = box.encrypt("same plaintext", "default/KEY")
    second = box.encrypt("same plaintext", "default/KEY")
    assert first != second  # a new nonce each time
    assert re.fullmatch(r"v1\.[0-9a-f]{8}\.[A-Za-z0-9_-]+", first)
    assert first.split(".")[1] == box.key_id
    body = first.split(".")[2]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert len(raw) == 12 + len("same plaintext") + 16
    assert box.decrypt(first, "default/KEY") == "same plaintext"


def test_box_never_shows_the_key() -> None:
    key = os.urandom(32)
    box = SecretBox(key)
    shown = repr(box) + repr(vars(box))
    assert key.hex() not in shown
    assert base64.urlsafe_b64encode(key).decode() not in shown
    assert box.key_id in repr(box)


@pytest.mark.parametrize(
    "bad", [b"", b"short", os.urandom(16), os.urandom(33)], ids=["empty", "short", "16", "33"]
)
def test_box_refuses_a_key_of_the_wrong_size(bad: bytes) -> None:
    with pytest.raises(MasterKeyError, match="exactly 32 bytes"):
        SecretBox(bad)


def test_ciphertext_moved_to_another_row_fails(db: Database, store: SecretStore) -> None:
    store.set(DEFAULT_PROJECT_ID, "A", "value-of-a-123")
    store.set(DEFAULT_PROJECT_ID, "B", "value-of-b-456")
    store.set(OTHER_PROJECT, "A", "value-of-other-a")
    token_a = _ciphertext(db, DEFAULT_PROJECT_ID, "A")

    _set_ciphertext(db, DEFAULT_PROJECT_ID, "B", token_a)  # same project, other name
    with pytest.raises(SecretDecryptError, match="failed authentication"):
        store.reveal(DEFAULT_PROJECT_ID, "B")

    _set_ciphertext(db, OTHER_PROJECT, "A", token_a)  # same name, other project
    with pytest.raises(SecretDecryptError, match="failed authentication"):
        store.reveal(OTHER_PROJECT, "A")

    assert store.reveal(DEFAULT_PROJECT_ID, "A") == "value-of-a-123"


def test_altered_ciphertext_fails(box: SecretBox) -> None:
    token = box.encrypt("value-123456", "default/KEY")
    head, body = token.rsplit(".", 1)
    flipped = body[:-3] + ("A" if body[-3] != "A" else "B") + body[-2:]
    with pytest.raises(SecretDecryptError, match="failed authentication"):
        box.decrypt(f"{head}.{flipped}", "default/KEY")
    for broken in ("", "v2." + token[3:], "v1.nothex!.abc", head + ".", "not-a-token"):
        with pytest.raises(SecretDecryptError):
            box.decrypt(broken, "default/KEY")


def test_wrong_master_key_gives_key_id_error(db: Database, store: SecretStore) -> None:
    store.set(DEFAULT_PROJECT_ID, "KEY", "value-123456")
    other_box = SecretBox(os.urandom(32))
    assert other_box.key_id != store.box.key_id
    wrong = SecretStore(db, other_box, redactor=SecretRedactor())
    expected = (
        f"encrypted with master key {store.box.key_id}, "
        f"but the configured key is {other_box.key_id}"
    )
    with pytest.raises(SecretDecryptError, match=re.escape(expected)):
        wrong.reveal(DEFAULT_PROJECT_ID, "KEY")


def test_rotate_re_encrypts_everything(db: Database, store: SecretStore) -> None:
    old_box = store.box
    values = {
        (DEFAULT_PROJECT_ID, "A"): "value-a-123456",
        (DEFAULT_PROJECT_ID, "B"): "value-b-123456",
        (OTHER_PROJECT, "A"): "value-other-a-123",
    }
    for (project_id, name), value in values.items():
        store.set(project_id, name, value)
    new_box = SecretBox(os.urandom(32))

    assert store.rotate(new_box) == 3
    assert store.box is new_box
    fresh_new = SecretStore(db, new_box, redactor=SecretRedactor())
    fresh_old = SecretStore(db, old_box, redactor=SecretRedactor())
    for (project_id, name), value in values.items():
        assert fresh_new.reveal(project_id, name) == value
        assert _ciphertext(db, project_id, name).split(".")[1] == new_box.key_id
        with pytest.raises(SecretDecryptError, match="encrypted with master key"):
            fresh_old.reveal(project_id, name)
    # Rotating again to the same key changes nothing.
    assert store.rotate(new_box) == 0
    assert fresh_new.reveal(DEFAULT_PROJECT_ID, "A") == "value-a-123456"


def test_rotate_is_all_or_nothing(db: Database, store: SecretStore) -> None:
    store.set(DEFAULT_PROJECT_ID, "A", "value-a-123456")
    store.set(DEFAULT_PROJECT_ID, "B", "value-b-123456")
    store.set(DEFAULT_PROJECT_ID, "C", "value-c-123456")
    # Break one row: B now holds A's ciphertext, which fails authentication.
    _set_ciphertext(db, DEFAULT_PROJECT_ID, "B", _ciphertext(db, DEFAULT_PROJECT_ID, "A"))
    before = {name: _ciphertext(db, DEFAULT_PROJECT_ID, name) for name in "ABC"}
    old_box = store.box

    with pytest.raises(SecretDecryptError):
        store.rotate(SecretBox(os.urandom(32)))

    assert store.box is old_box
    assert {name: _ciphertext(db, DEFAULT_PROJECT_ID, name) for name in "ABC"} == before
    assert store.reveal(DEFAULT_PROJECT_ID, "C") == "value-c-123456"


# --- master key ------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_master_key_file_is_created_private_even_with_open_umask(tmp_path: Path) -> None:
    home = tmp_path / "home"
    previous = os.umask(0)  # the file must not rely on the umask to be private
    try:
        key = load_master_key(home, None)
    finally:
        os.umask(previous)
    path = home / "master.key"
    assert len(key) == 32
    assert _mode(path) == 0o600
    assert base64.urlsafe_b64decode(path.read_text().strip()) == key
    assert [p.name for p in home.iterdir()] == ["master.key"]  # no temp file left behind


def test_master_key_file_is_reused(tmp_path: Path) -> None:
    first = load_master_key(tmp_path, None)
    content = (tmp_path / "master.key").read_bytes()
    second = load_master_key(tmp_path, None)
    assert first == second
    assert (tmp_path / "master.key").read_bytes() == content


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    start = threading.Barrier(8)
    keys: list[bytes] = []

    def load() -> None:
        start.wait()
        keys.append(load_master_key(home, None))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(keys) == 8
    assert len(set(keys)) == 1
    assert base64.urlsafe_b64decode((home / "master.key").read_text().strip()) == keys[0]


def test_env_key_overrides_the_file(tmp_path: Path) -> None:
    env_key = os.urandom(32)
    encoded = base64.urlsafe_b64encode(env_key).decode()
    assert load_master_key(tmp_path, encoded) == env_key
    assert not (tmp_path / "master.key").exists()  # no file is created when the env is set
    file_key = load_master_key(tmp_path, None)
    assert file_key != env_key
    assert load_master_key(tmp_path, encoded) == env_key
    # Without padding and with surrounding whitespace (as pasted into a .env file).
    assert load_master_key(tmp_path, " " + encoded.rstrip("=") + "\n") == env_key


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not base64 at all!",
        base64.urlsafe_b64encode(b"x" * 16).decode(),
        base64.urlsafe_b64encode(b"x" * 33).decode(),
        "x" * 43 + "%",
    ],
)
def test_bad_env_key_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(MasterKeyError, match="FLYWHEEL_MASTER_KEY") as caught:
        load_master_key(tmp_path, bad)
    message = str(caught.value)
    assert "32" in message and "urlsafe_b64encode" in message  # says how to make a good one
    if bad:
        assert bad not in message  # a mistyped real key is not echoed into logs
    assert not (tmp_path / "master.key").exists()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    key = load_master_key(tmp_path, None)
    path = tmp_path / "master.key"
    path.chmod(mode)
    with pytest.raises(MasterKeyError, match=re.escape(f"chmod 600 {path}")):
        load_master_key(tmp_path, None)
    path.chmod(0o600)
    assert load_master_key(tmp_path, None) == key


def test_corrupt_key_file_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    path.write_text("definitely-not-a-key\n")
    path.chmod(0o600)
    with pytest.raises(MasterKeyError, match=r"restore .* from your backup"):
        load_master_key(tmp_path, None)
    assert path.read_text() == "definitely-not-a-key\n"  # never overwritten


def test_loaded_key_works_with_box(tmp_path: Path) -> None:
    box = SecretBox(load_master_key(tmp_path, None))
    again = SecretBox(load_master_key(tmp_path, None))
    assert again.decrypt(box.encrypt("value-123456", "p/n"), "p/n") == "value-123456"


# --- redaction -------------------------------------------------------------------------------


@pytest.fixture
def captured_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"flywheel.test.secrets.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield logger, stream
    logger.removeHandler(handler)


def test_redactor_masks_args_and_fstrings(
    captured_logger: tuple[logging.Logger, io.StringIO], redactor: SecretRedactor
) -> None:
    log, stream = captured_logger
    secret = _distinctive_secret()
    # pytest may add its own capture handlers to the logger; every handler gets the filter.
    assert install_redactor(log, redactor) == len(log.handlers)
    assert all(redactor in handler.filters for handler in log.handlers)
    redactor.add(secret)
    log.warning("calling with %s", secret)
    log.warning(f"key={secret}")
    log.warning("headers %r", {"Authorization": f"Bearer {secret}"})
    log.warning("%(key)s in a mapping", {"key": secret})
    text = stream.getvalue()
    assert secret not in text
    assert secret.split("-")[-1] not in text
    assert text.count(REDACTED) == 4
    assert "calling with [REDACTED]" in text
    assert "key=[REDACTED]" in text


def test_redactor_masks_exception_text(
    captured_logger: tuple[logging.Logger, io.StringIO], redactor: SecretRedactor
) -> None:
    log, stream = captured_logger
    secret = _distinctive_secret()
    install_redactor(log, redactor)
    redactor.add(secret)
    try:
        raise RuntimeError(f"upstream refused key {secret}")
    except RuntimeError:
        log.exception("call failed")
    text = stream.getvalue()
    assert "RuntimeError: upstream refused key [REDACTED]" in text
    assert secret not in text


def test_redactor_on_root_handler_covers_child_loggers(redactor: SecretRedactor) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    child = logging.getLogger(f"flywheel.test.child.{uuid.uuid4().hex}")
    child.setLevel(logging.INFO)
    try:
        install_redactor(redactor=redactor)
        secret = _distinctive_secret()
        redactor.add(secret)
        child.warning("propagated %s", secret)
    finally:
        root.removeHandler(handler)
        for other in [*root.handlers, logging.lastResort]:
            if other is not None:
                other.removeFilter(redactor)
    assert "propagated [REDACTED]" in stream.getvalue()
    assert secret not in stream.getvalue()


def test_short_values_are_not_redacted(
    captured_logger: tuple[logging.Logger, io.StringIO], redactor: SecretRedactor
) -> None:
    log, stream = captured_logger
    install_redactor(log, redactor)
    redactor.add("abc12")  # 5 characters: would mangle ordinary text
    redactor.add("abc123")  # 6 characters: redacted
    assert "abc12" not in redactor
    log.warning("values abc12 and abc123")
    assert stream.getvalue() == "WARNING values abc12 and [REDACTED]\n"


def test_redact_text_and_overlapping_secrets(redactor: SecretRedactor) -> None:
    assert redactor.redact_text("nothing registered") == "nothing registered"
    redactor.add("secret-value")
    redactor.add("secret-value-extended")
    assert redactor.redact_text('{"k": "secret-value-extended"}') == '{"k": "[REDACTED]"}'
    assert redactor.redact_text("a secret-value b") == "a [REDACTED] b"


def test_redactor_without_secrets_leaves_records_alone(redactor: SecretRedactor) -> None:
    args = ("arg",)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg %s", args, None)
    assert redactor.filter(record) is True
    assert record.msg == "msg %s"
    assert record.args is args


def test_store_registers_set_and_revealed_values(db: Database, box: SecretBox) -> None:
    writer_redactor = SecretRedactor()
    SecretStore(db, box, redactor=writer_redactor).set(DEFAULT_PROJECT_ID, "KEY", "set-value-1")
    assert "set-value-1" in writer_redactor
    # A fresh process (new redactor) learns the value when it reveals it.
    reader_redactor = SecretRedactor()
    reader = SecretStore(db, box, redactor=reader_redactor)
    assert "set-value-1" not in reader_redactor
    reader.reveal(DEFAULT_PROJECT_ID, "KEY")
    assert reader_redactor.redact_text("x set-value-1 y") == "x [REDACTED] y"


def test_store_uses_the_module_redactor_by_default(db: Database, box: SecretBox) -> None:
    value = _distinctive_secret()
    SecretStore(db, box).set(DEFAULT_PROJECT_ID, "KEY", value)
    assert REDACTOR.redact_text(f"log {value}") == f"log {REDACTED}"


def test_broken_format_string_report_is_redacted(
    redactor: SecretRedactor, capsys: pytest.CaptureFixture[str]
) -> None:
    # A handler of our own, called directly: pytest's capture handlers re-raise logging errors.
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(redactor)
    secret = _distinctive_secret()
    redactor.add(secret)
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "needs a number %d", (secret,), None
    )
    handler.handle(record)  # logging reports the format error to stderr with msg and args
    report = capsys.readouterr().err
    assert "Logging error" in report
    assert REDACTED in report
    assert secret not in report
