"""The channels file as the admin API edits it: versioned, validated, written
atomically, with backups.

Edits work on the file's own JSON (so ``${VAR}`` references stay references and
fields ccx-proxy does not know survive), are validated with the same code as
``check-config``, and replace the file only whole: temp file in the same
directory, fsync, rename, fsync of the directory.  A crash at any moment leaves
the old file or the new one, never a mix.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from .config import GatewayConfig, parse_config
from .errors import Conflict

Document = dict[str, Any]

# Stable, readable key order for channel objects; unknown fields keep their order after these.
CHANNEL_ORDER = (
    "name", "serviceType", "baseUrl", "baseUrls", "apiKeys", "authHeader", "modelMapping",
    "supportedModels", "priority", "status", "customHeaders", "connectTimeoutMs",
    "responseHeaderTimeoutMs", "streamInactivityTimeoutMs", "keepaliveMs", "circuitBreaker",
)  # fmt: skip


def version_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:20]


def canonical(doc: Document) -> bytes:
    """Pretty, stable JSON: channels first at the top, known channel fields in order."""
    key = "channels" if "channels" in doc else "upstream" if "upstream" in doc else "channels"
    channels = doc.get(key)
    if isinstance(channels, list):
        ordered = []
        for ch in channels:
            if isinstance(ch, dict):
                ch = {**{k: ch[k] for k in CHANNEL_ORDER if k in ch}, **ch}
            ordered.append(ch)
        doc = {key: ordered, **{k: v for k, v in doc.items() if k != key}}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` whole; ``mode`` defaults to the file's current one."""
    directory = path.parent
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ChannelStore:
    def __init__(
        self, path: str | os.PathLike[str], env: Mapping[str, str] | None = None, backups: int = 10
    ) -> None:
        self.path = Path(path)
        self.env = os.environ if env is None else env
        self.backups = backups
        self._lock = asyncio.Lock()
        # Called with (new bytes, the version they replace) from the writer thread, under the
        # locks, after validation and before the write: with REDIS_URL the shared channels
        # document (ccx_proxy.shared.config) does its fleet-wide compare-and-set here and
        # raises Conflict when another instance's edit won.
        self.before_commit: Callable[[bytes, str], None] | None = None

    def _sweep_temp_files(self) -> None:
        """Temp files a killed writer left behind (never the live file); a minute old at least,
        so a writer in another worker process that is mid-write keeps its own."""
        cutoff = time.time() - 60
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            try:
                if stale.stat().st_mtime < cutoff:
                    stale.unlink()
            except OSError:
                pass

    @property
    def backup_dir(self) -> Path:
        return self.path.parent / "backups"

    def read(self) -> tuple[Document, str]:
        raw = self.path.read_bytes()
        doc = orjson.loads(raw)
        if not isinstance(doc, dict):
            doc = {"channels": []}
        return doc, version_of(raw)

    async def update(
        self, change: Callable[[Document], None], if_match: str | tuple[str, ...] | None
    ) -> tuple[GatewayConfig, Document, str]:
        """Apply ``change`` to a copy of the file's JSON, validate, and write it.

        Raises Conflict on a stale ``if_match``, ConfigError if the result is invalid
        (the file is then untouched).  Serialised within the process (lock) and across
        worker processes (``flock`` on a lock file beside the channels file).
        """
        async with self._lock:
            return await asyncio.to_thread(self._update_locked, change, if_match)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Across worker processes: ``flock`` on a lock file beside the channels file."""
        lock_path = self.path.parent / f".{self.path.name}.lock"
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _update_locked(
        self, change: Callable[[Document], None], if_match: str | tuple[str, ...] | None
    ) -> tuple[GatewayConfig, Document, str]:
        accepted = (if_match,) if isinstance(if_match, str) else if_match
        with self._file_lock():
            doc, version = self.read()
            if accepted is not None and version not in accepted:
                raise Conflict(
                    "the channels file changed since you read it (version "
                    f"{', '.join(accepted)} is stale, current is {version}); "
                    "reload and apply your edit again"
                )
            edited = copy.deepcopy(doc)
            change(edited)
            config = parse_config(edited, self.env, source=str(self.path))
            data = canonical(edited)
            if self.before_commit is not None:
                self.before_commit(data, version)
            self._commit(data)
            return config, edited, version_of(data)

    async def replace(
        self, data: bytes, wanted: Callable[[], bool]
    ) -> Literal["written", "unchanged", "stale"]:
        """Make the file hold exactly ``data`` (a version validated elsewhere: the shared
        store's), with a backup, under the same locks as :meth:`update`.  ``wanted()`` is asked
        once the locks are held: False (a newer write won meanwhile) leaves the file alone."""
        async with self._lock:
            return await asyncio.to_thread(self._replace_locked, data, wanted)

    def _replace_locked(
        self, data: bytes, wanted: Callable[[], bool]
    ) -> Literal["written", "unchanged", "stale"]:
        with self._file_lock():
            if not wanted():
                return "stale"
            try:
                if self.path.read_bytes() == data:
                    return "unchanged"  # another worker of this host wrote it already
            except FileNotFoundError:
                pass
            self._commit(data)
            return "written"

    def _commit(self, data: bytes) -> None:
        self._sweep_temp_files()
        if self.backups and self.path.exists():
            # Backups hold the same secrets as the file: no wider permissions than it has.
            self.backup_dir.mkdir(mode=0o700, exist_ok=True)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
            mode = self.path.stat().st_mode & 0o777
            atomic_write(self.backup_dir / f"{self.path.name}.{stamp}", self.path.read_bytes(), mode)
            kept = sorted(self.backup_dir.glob(f"{self.path.name}.*"))
            for old in kept[: max(0, len(kept) - self.backups)]:
                old.unlink(missing_ok=True)
        atomic_write(self.path, data)
