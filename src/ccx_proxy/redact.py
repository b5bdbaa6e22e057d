"""Secrets out of every log line: access keys, the admin key, upstream keys and custom-header
secrets are replaced by their masks (``sk-…abcd``, :func:`~.headers.mask_secret`).

One :class:`Redactor` per process (:data:`REDACTOR`), installed once by :func:`install` as a
step of the log-record factory, so it sees every record of every logger -- the gateway's,
aiohttp's (``aiohttp.server`` logs a malformed request line or header verbatim, in the
traceback of its ``Error handling request`` line; ``aiohttp.access`` logs the request
line), asyncio's -- before any handler or filter, whatever handlers are configured later.
(A :class:`logging.Filter` on a logger misses records its child loggers propagate; one on a
handler misses handlers added later.)

What is redacted is the record's final text: the message *after* ``%`` formatting with its
arguments (a key passed as an argument is caught too), the formatted traceback and the stack.
Records are few (the relay's hot path logs nothing), so formatting each once more is cheap;
a record without a secret is left exactly as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .headers import scrub_text, secret_forms

if TYPE_CHECKING:
    from .config import GatewayConfig

# Shorter "secrets" are not redacted: they would mangle every log line and protect nothing.
MIN_SECRET = 4
_FORMATTER = logging.Formatter()  # formats a traceback as the standard handlers do
_STALE = object()


class Redactor(logging.Filter):
    """Replaces the configured secrets in a record (``filter`` never drops one)."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: tuple[str, ...] = ()
        self._current: Callable[[], GatewayConfig | None] = lambda: None
        self._seen: object = _STALE
        self._secrets: tuple[str, ...] = ()

    def set_keys(self, keys: Iterable[str]) -> None:
        """The gateway's own keys (PROXY_ACCESS_KEY, EXTRA_PROXY_ACCESS_KEYS, ADMIN_ACCESS_KEY)."""
        self._keys = tuple(k for k in keys if len(k) >= MIN_SECRET)
        self._seen = _STALE

    def follow(self, current: Callable[[], GatewayConfig | None]) -> None:
        """Where the running configuration is (its channels' secrets are redacted): read on
        every record, so a reload or an admin write is followed with no hook."""
        self._current = current
        self._seen = _STALE

    def secrets(self) -> tuple[str, ...]:
        config = self._current()
        if config is not self._seen:
            channels = config.channels if config is not None else ()
            found = dict.fromkeys(
                (*self._keys, *(s for c in channels for s in c.secrets if len(s) >= MIN_SECRET))
            )
            self._secrets = tuple(found)
            self._seen = config
        return self._secrets

    def redact(self, text: str) -> str:
        secrets = self.secrets()
        return scrub_text(text, secrets) if secrets else text

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets()
        if not secrets:
            return True
        forms = secret_forms(secrets)
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit: logging would print both, unredacted
            message = f"{record.msg!s} (arguments: {record.args!r})"
            record.msg, record.args = scrub_text(message, secrets), ()
        else:
            if any(form in message for form, _ in forms):
                record.msg, record.args = scrub_text(message, secrets), ()
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            text = _FORMATTER.formatException(record.exc_info)
            if any(form in text for form, _ in forms):
                # The formatted text stands in for the exception (it holds the secret too).
                record.exc_text, record.exc_info = scrub_text(text, secrets), None
        elif record.exc_text:
            record.exc_text = scrub_text(record.exc_text, secrets)
        if record.stack_info:
            record.stack_info = scrub_text(record.stack_info, secrets)
        return True


REDACTOR = Redactor()


class _Factory:
    """The log-record factory step: the previous factory's record, redacted."""

    def __init__(self, previous: Callable[..., logging.LogRecord], redactor: Redactor) -> None:
        self.previous = previous
        self.redactor = redactor

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        try:
            self.redactor.filter(record)
        except Exception:  # never let a log call raise; never let an unchecked record out
            record.msg, record.args = "(a log record the redactor could not check was withheld)", ()
            record.exc_info = record.exc_text = record.stack_info = None
        return record


def install(redactor: Redactor = REDACTOR) -> Redactor:
    """Redact every log record from now on (once: installing again changes nothing)."""
    factory = logging.getLogRecordFactory()
    if not (isinstance(factory, _Factory) and factory.redactor is redactor):
        logging.setLogRecordFactory(_Factory(factory, redactor))
    return redactor


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    factory = logging.getLogRecordFactory()
    if isinstance(factory, _Factory):
        logging.setLogRecordFactory(factory.previous)
