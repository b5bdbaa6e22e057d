"""The channels file as the admin API edits it: versioned, validated, written
atomically, with backups.

Edits work on the file's own JSON (so ``${VAR}`` references stay references and
fields ccx-proxy does not know survive), are validated with the same code as
``check-config``, and replace the file only whole: temp file in the same
directory, fsync, rename, fsync of the directory.  A crash at any moment leaves
the old file or the new one, never a mix.

With ``REDIS_URL`` (:mod:`ccx_proxy.shared.config`) a second small file beside it,
``.<name>.seq``, records the shared document's ``seq`` and version the file was last written
at; every worker process of a host writes both under the same ``flock``, so a slow worker
never writes an older version over a newer one (:meth:`ChannelStore.replace`).
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
Stamp = tuple[int, str]  # (seq, version) of the shared document the file was written at
Outcome = Literal["written", "unchanged", "stale"]

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
        # raises Conflict when another instance's edit won.  It returns the shared seq the new
        # bytes carry (recorded beside the file), or None (not in the shared store).
        self.before_commit: Callable[[bytes, str], int | None] | None = None
        # Called from the writer thread, under the locks, with the version about to be written
        # (None: that write failed): the watcher then knows the gateway applies it itself.
        self.on_write: Callable[[str | None], None] | None = None

    @property
    def stamp_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.seq"

    def recorded(self) -> Stamp | None:
        """The shared (seq, version) the file was last written at; None when never recorded."""
        try:
            seq, version = self.stamp_path.read_text().split()
            return int(seq), version
        except (OSError, ValueError):
            return None

    def _record(self, seq: int, version: str) -> None:
        atomic_write(self.stamp_path, f"{seq} {version}\n".encode(), 0o600)

    def _sweep_temp_files(self) -> None:
        """Temp files a killed writer left behind (never the live file); a minute old at least,
        so a writer in another worker process that is mid-write keeps its own."""
        cutoff = time.time() - 60
        stale_files = [
            *self.path.parent.glob(f".{self.path.name}.*.tmp"),
            *self.path.parent.glob(f".{self.stamp_path.name}.*.tmp"),
        ]
        for stale in stale_files:
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
            seq = self.before_commit(data, version) if self.before_commit is not None else None
            self._commit(data, seq)
            return config, edited, version_of(data)

    async def replace(
        self, data: bytes, seq: int, wanted: Callable[[], bool], over: Stamp | None = None
    ) -> Outcome:
        """Make the file hold exactly ``data`` (a version validated elsewhere: the shared
        store's, at ``seq``), with a backup, under the same locks as :meth:`update`.

        "stale" leaves the file alone: ``wanted()`` (asked once the locks are held) is False
        (a newer write won in this process), or the file records a newer seq than ``seq`` (a
        sibling worker wrote a newer version meanwhile) -- unless what it records is ``over``,
        a record the caller found Redis no longer holds (Redis lost its data and went back)."""
        async with self._lock:
            return await asyncio.to_thread(self._replace_locked, data, seq, wanted, over)

    def _replace_locked(
        self, data: bytes, seq: int, wanted: Callable[[], bool], over: Stamp | None
    ) -> Outcome:
        version = version_of(data)
        with self._file_lock():
            if not wanted():
                return "stale"
            recorded = self.recorded()
            if (
                recorded is not None
                and recorded != (seq, version)
                and recorded[0] >= seq
                and recorded != over
            ):
                return "stale"
            try:
                current: bytes | None = self.path.read_bytes()
            except FileNotFoundError:
                current = None
            if current == data:  # another worker of this host wrote it already
                if self.on_write is not None:
                    self.on_write(version)
                if recorded != (seq, version):
                    self._record(seq, version)
                return "unchanged"
            self._commit(data, seq)
            return "written"

    async def record(self, seq: int, version: str) -> None:
        """The file holds the shared document's ``version`` at ``seq`` (published from it)."""
        async with self._lock:
            await asyncio.to_thread(self._record_locked, seq, version)

    def _record_locked(self, seq: int, version: str) -> None:
        with self._file_lock():
            try:
                if version_of(self.path.read_bytes()) != version:
                    return  # replaced meanwhile: that write recorded its own
            except OSError:
                return
            if self.recorded() != (seq, version):
                self._record(seq, version)

    def _commit(self, data: bytes, seq: int | None = None) -> None:
        """Write the file (under the locks); ``seq``: the shared seq it carries, recorded first
        (a reader that sees the new file sees its record)."""
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
        version = version_of(data)
        if seq is not None:
            self._record(seq, version)
        if self.on_write is not None:
            self.on_write(version)
        try:
            atomic_write(self.path, data)
        except BaseException:
            if self.on_write is not None:
                self.on_write(None)
            raise
