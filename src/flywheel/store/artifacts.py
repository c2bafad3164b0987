"""The artifact store: files (indexes, adapters, exports) under one root, through fsspec.

The root is a local folder by default (``~/.flywheel/artifacts``) or any fsspec URL
(``s3://bucket/prefix`` with ``s3fs`` installed), so a deployment changes storage by
configuration only. Keys are relative posix paths such as ``kb/ID/v3/vectors.faiss``.
"""

from __future__ import annotations

import posixpath
import shutil
import uuid
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem


class ArtifactStore:
    """Put, get and delete byte blobs by key under ``root``."""

    def __init__(self, root: str) -> None:
        self.fs, path = fsspec.core.url_to_fs(root)
        self.root = path.rstrip("/")
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        clean = posixpath.normpath(key.strip("/"))
        if clean in {"", "."} or clean.startswith("../") or clean == "..":
            raise ValueError(f"invalid artifact key: {key!r}")
        return f"{self.root}/{clean}"

    def url(self, key: str) -> str:
        """Where ``key`` lives, as the filesystem names it."""
        return self.fs.unstrip_protocol(self._path(key))

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` at ``key`` (replacing it whole: readers never see a partial file on
        a local disk) and return its URL."""
        path = self._path(key)
        parent = posixpath.dirname(path)
        if isinstance(self.fs, LocalFileSystem):
            self.fs.makedirs(parent, exist_ok=True)
            partial = f"{path}.{uuid.uuid4().hex}.partial"
            self.fs.pipe_file(partial, data)
            self.fs.mv(partial, path)
        else:
            # Object stores write whole objects atomically already.
            self.fs.pipe_file(path, data)
        return self.url(key)

    def get(self, key: str) -> bytes:
        """The bytes at ``key``; ``FileNotFoundError`` when there are none."""
        data = self.fs.cat_file(self._path(key))
        assert isinstance(data, bytes)
        return data

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def delete(self, prefix: str) -> None:
        """Remove ``prefix`` and everything under it (nothing when it is absent)."""
        path = self._path(prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def put_folder(self, key: str, folder: Path) -> str:
        """Copy a local folder (model weights, an adapter) to ``key`` and return its URL.

        On a local disk the copy lands in a temporary sibling first and is renamed into place,
        so a reader never sees half a model; ``key`` must not exist yet.
        """
        path = self._path(key)
        if isinstance(self.fs, LocalFileSystem):
            partial = Path(f"{path}.{uuid.uuid4().hex}.partial")
            partial.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copytree(folder, partial)
                partial.rename(path)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        else:
            self.fs.put(str(folder).rstrip("/") + "/", path, recursive=True)
        return self.url(key)

    def local_folder(self, key: str, cache: Path) -> Path:
        """A local folder holding ``key``'s files: the folder itself on a local disk, else a
        copy downloaded once into ``cache`` (a model is read by path, never streamed)."""
        path = self._path(key)
        if isinstance(self.fs, LocalFileSystem):
            if not self.fs.isdir(path):
                raise FileNotFoundError(f"artifact folder {key!r} does not exist")
            return Path(path)
        target = Path(cache) / "artifacts" / posixpath.normpath(key.strip("/"))
        if not target.is_dir():
            partial = target.with_name(f"{target.name}.{uuid.uuid4().hex}.partial")
            try:
                self.fs.get(path.rstrip("/") + "/", str(partial), recursive=True)
                partial.rename(target)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        return target

    def size(self, key: str) -> int:
        """Total bytes stored under ``key`` (a file or a folder)."""
        return int(self.fs.du(self._path(key), total=True))


__all__ = ["ArtifactStore"]
