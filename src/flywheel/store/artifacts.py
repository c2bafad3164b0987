"""The artifact store: files (indexes, adapters, exports) under one root, through fsspec.

The root is a local folder by default (``~/.flywheel/artifacts``) or any fsspec URL
(``s3://bucket/prefix`` with ``s3fs`` installed), so a deployment changes storage by
configuration only. Keys are relative posix paths such as ``kb/ID/v3/vectors.faiss``.

S3-compatible servers (MinIO, Ceph, R2, moto) are reached through the standard AWS
variables, which botocore reads for every client s3fs makes: ``AWS_ENDPOINT_URL_S3`` (or
``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and
``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import contextlib
import posixpath
import shutil
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class ArtifactStore:
    """Put, get and delete byte blobs (and folders of them) by key under ``root``."""

    def __init__(self, root: str) -> None:
        # No cached listings: another replica may have written or deleted a key since this
        # process last listed its prefix, and an object store is the only truth.
        self.fs, path = fsspec.core.url_to_fs(root, use_listings_cache=False)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = path.rstrip("/")
        if self.local:
            self.fs.makedirs(self.root, exist_ok=True)

    def _clean(self, key: str) -> str:
        clean = posixpath.normpath(key.strip("/"))
        if clean in {"", "."} or clean == ".." or clean.startswith("../"):
            raise ValueError(f"invalid artifact key: {key!r}")
        return clean

    def _path(self, key: str) -> str:
        return f"{self.root}/{self._clean(key)}"

    def url(self, key: str) -> str:
        """Where ``key`` lives, as the filesystem names it."""
        return str(self.fs.unstrip_protocol(self._path(key)))

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key`` (replacing it whole: readers never see a partial file)
        and return its URL."""
        path = self._path(key)
        if self.local:
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            partial = f"{path}.{uuid.uuid4().hex}.partial"
            self.fs.pipe_file(partial, data)
            self.fs.mv(partial, path)
        else:
            # An object store publishes an object (multipart or not) only once it is whole.
            self.fs.pipe_file(path, data)
        return self.url(key)

    def get(self, key: str) -> bytes:
        """The bytes at ``key``; ``FileNotFoundError`` when there are none."""
        data = self.fs.cat_file(self._path(key))
        assert isinstance(data, bytes)
        return data

    def exists(self, key: str) -> bool:
        """Whether ``key`` is a file or a folder (on an object store: a prefix holding at
        least one object)."""
        return bool(self.fs.exists(self._path(key)))

    def keys(self, prefix: str) -> list[str]:
        """Every file key under ``prefix`` (itself included when it is a file), sorted."""
        path = self._path(prefix)
        if not self.fs.exists(path):
            return []
        start = len(self.root) + 1
        found = self.fs.find(path)
        return sorted(self.fs._strip_protocol(name)[start:] for name in found)

    def delete(self, prefix: str) -> None:
        """Remove ``prefix`` and everything under it (nothing when it is absent)."""
        path = self._path(prefix)
        if not self.fs.exists(path):
            return
        # Another process may remove it between the two calls: absent is the goal anyway.
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    def put_folder(self, key: str, folder: Path) -> str:
        """Copy a local folder (model weights, an adapter) to ``key`` and return its URL.

        On a local disk the copy lands in a temporary sibling first and is renamed into place,
        so a reader never sees half a model; ``key`` must not exist yet. On an object store
        every file is uploaded under ``key`` and a failed upload removes what it wrote.
        """
        path = self._path(key)
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        if self.local:
            partial = Path(f"{path}.{uuid.uuid4().hex}.partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copytree(folder, partial)
                partial.rename(path)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
            return self.url(key)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        # Explicit file-to-object pairs: fsspec's folder-copy rules depend on whether the
        # target "exists", which on an object store is a guess.
        targets = [f"{path}/{p.relative_to(folder).as_posix()}" for p in files]
        try:
            if files:
                self.fs.put([str(p) for p in files], targets)
        except BaseException:
            self.delete(key)
            raise
        return self.url(key)

    def local_folder(self, key: str, cache: Path) -> Path:
        """A local folder holding ``key``'s files: the folder itself on a local disk, else a
        copy downloaded once into ``cache`` (a model is read by path, never streamed).

        The copy is trusted once complete: callers give keys whose files never change
        (model versions live under a unique id)."""
        path = self._path(key)
        if self.local:
            if not self.fs.isdir(path):
                raise FileNotFoundError(f"artifact folder {key!r} does not exist")
            return Path(path)
        target = Path(cache) / "artifacts" / self._clean(key)
        if target.is_dir():
            return target
        start = len(path) + 1
        found = self.fs.find(path) if self.fs.exists(path) else []
        # Folder markers (empty keys ending in "/", made by some S3 consoles) hold nothing;
        # a plain file at ``key`` is no folder.
        names = [name for name in found if not name.endswith("/") and len(name) > start]
        if not names:
            raise FileNotFoundError(f"artifact folder {key!r} does not exist")
        relative = [self.fs._strip_protocol(name)[start:] for name in names]
        if any(".." in name.split("/") for name in relative):
            # Object keys are free text: one naming a parent would land outside the cache.
            raise ValueError(f"artifact folder {key!r} holds a key that climbs out of it")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Downloaded beside the target and renamed: a crash or a concurrent reader never
        # takes a half-downloaded folder for a model.
        partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
        try:
            locals_ = [partial / name for name in relative]
            for local in locals_:
                local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(list(names), [str(p) for p in locals_])
            try:
                partial.rename(target)
            except OSError:
                if not target.is_dir():  # not another process finishing the same download
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return target

    def size(self, key: str) -> int:
        """Total bytes stored under ``key`` (a file or a folder)."""
        return int(self.fs.du(self._path(key), total=True))


__all__ = ["ArtifactStore"]
