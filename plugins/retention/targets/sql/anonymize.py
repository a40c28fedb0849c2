"""Anonymization strategies: what replaces a personal value when a row is kept.

``hash`` is an HMAC-SHA256 under a secret key (``RETENTION_HASH_KEY``): the same input
gives the same output everywhere the key is used, so joins on a hashed column still
work, while without the key an email's hash cannot be looked up in a table of emails.
The others drop information for good: ``null``, ``redact`` (keep the last N
characters), ``generalize`` (a date to its year or month, a text to its first N
characters).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any

from retention.errors import ConfigError
from retention.rules.strategies import Strategy

HASH_KEY_ENV = "RETENTION_HASH_KEY"
MIN_HASH_KEY_BYTES = 16




class Anonymizer:
    """Applies strategies; holds the HMAC key, never logs or returns it."""

    def __init__(self, hash_key: bytes | None):
        self._key = hash_key

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, *, required: bool) -> Anonymizer:
        """The key from ``RETENTION_HASH_KEY``; ConfigError when ``required`` and missing or short."""
        environ = os.environ if environ is None else environ
        text = environ.get(HASH_KEY_ENV)
        if not text:
            if required:
                raise ConfigError(
                    f"{HASH_KEY_ENV} is not set: the rule hashes columns with HMAC-SHA256 and needs a "
                    f"secret key of at least {MIN_HASH_KEY_BYTES} bytes (keep it; the same key keeps joins working)"
                )
            return cls(None)
        key = text.encode("utf-8")
        if len(key) < MIN_HASH_KEY_BYTES:
            raise ConfigError(f"{HASH_KEY_ENV} is shorter than {MIN_HASH_KEY_BYTES} bytes")
        return cls(key)

    @property
    def key_id(self) -> str | None:
        """A public fingerprint of the key (not the key): which key hashed what."""
        if self._key is None:
            return None
        return hmac.new(self._key, b"retention key id", hashlib.sha256).hexdigest()[:16]

    def apply(self, strategy: Strategy, value: Any) -> Any:
        """The anonymized value; None stays None."""
        if value is None or strategy.kind == "null":
            return None
        if strategy.kind == "hash":
            if self._key is None:
                raise ConfigError(f"{HASH_KEY_ENV} is needed to hash")
            return hmac.new(self._key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()
        if strategy.kind == "redact":
            text = str(value)
            keep = min(strategy.keep_last, len(text))
            return "*" * (len(text) - keep) + (text[len(text) - keep :] if keep else "")
        if strategy.unit == "prefix":
            return str(value)[: strategy.prefix]
        if isinstance(value, datetime):
            return value.replace(month=1 if strategy.unit == "year" else value.month, day=1,
                                 hour=0, minute=0, second=0, microsecond=0)
        if isinstance(value, date):
            return value.replace(month=1 if strategy.unit == "year" else value.month, day=1)
        if isinstance(value, str):  # SQLite keeps dates as text: YYYY-MM-DD…
            return value[:4] + "-01-01" if strategy.unit == "year" else value[:7] + "-01"
        raise ValueError(f"cannot generalize a {type(value).__name__} to a {strategy.unit}")
