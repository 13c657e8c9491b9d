"""Bearer-key checks. Keys are compared in constant time; with no key
configured, only loopback clients are served.

Keys come from the environment and, optionally, from a key file (one key a
line) that a ``KeyRing`` re-reads whenever the file changes: deleting a line
revokes that key for the next request, without a restart. The gateway holds
the rings; the routes check keys through the dependencies of ``routes/deps.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from feedback.errors import APIError
from feedback.keys import read_key_file

log = logging.getLogger(__name__)


def is_loopback(host: str | None) -> bool:
    """Whether a client's address is a loopback address. Only an address counts: a name
    (``localhost``) is whatever a resolver or a header says it is."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def fingerprint(key: str) -> str:
    """A short, stable, non-reversible id for a key (what the store records as the client)."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    found = False
    for key in keys:  # no early exit: the time taken does not tell which key matched
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


class KeyRing:
    """The keys of one kind (API or admin): fixed ones plus a key file's, re-read when the
    file's stat changes (one ``os.stat`` per request). A missing or unreadable file counts
    as empty, so removing it revokes its keys."""

    def __init__(self, keys: tuple[str, ...] = (), path: Path | None = None):
        self.fixed, self.path = tuple(keys), path
        self._seen: tuple | None = None
        self._from_file: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        """A key is required: some are configured, or a key file is (even an empty one)."""
        return bool(self.fixed) or self.path is not None

    def keys(self) -> tuple[str, ...]:
        if self.path is not None:
            self._refresh()
        return self.fixed + self._from_file

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            seen = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            seen = None
        if seen == self._seen:
            return
        self._seen = seen
        try:
            self._from_file = read_key_file(self.path) if seen else ()
        except (OSError, UnicodeDecodeError) as exc:
            self._from_file = ()
            log.warning("key file %s cannot be read (%s); its keys are refused", self.path, type(exc).__name__)
            return
        log.info("key file %s read: %d key(s)", self.path, len(self._from_file))

    def has(self, token: str | None) -> bool:
        return token is not None and _matches(token, self.keys())


def check(header: str | None, host: str | None, keys: tuple[str, ...], what: str = "API",
          required: bool = False) -> str:
    """Return the client id for the store, or raise a 401/403 ``APIError``. Without ``keys`` (and
    unless a key is ``required``, as with an empty key file), only loopback clients are served."""
    token = bearer(header)
    if not keys and not required:
        if is_loopback(host):
            return f"ip:{host}"
        raise APIError(403, f"No {what} key is configured on this server, so it only serves loopback clients.",
                       code="loopback_only")
    if token is None:
        raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                       code="missing_api_key")
    if not _matches(token, keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return fingerprint(token)


def check_admin(header: str | None, host: str | None, admin: KeyRing, api: KeyRing) -> str:
    """``check`` for admin routes: a valid API key there is known but not enough (403)."""
    try:
        return check(header, host, admin.keys(), "admin", admin.required)
    except APIError as exc:
        if exc.status == 401 and api.has(bearer(header)):
            raise APIError(403, "This route needs an admin key; the key given is an API key.",
                           code="admin_key_required") from None
        raise
