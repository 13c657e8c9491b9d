"""Bearer-key checks. Keys are compared in constant time; with no key
configured, only loopback clients are served."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress


class AuthError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host == "localhost"


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


def check(header: str | None, host: str | None, keys: tuple[str, ...], what: str = "API") -> str:
    """Return the client id for the store, or raise ``AuthError``."""
    token = bearer(header)
    if not keys:
        if is_loopback(host):
            return f"ip:{host}"
        raise AuthError(403, f"No {what} key is configured on this server, so it only serves loopback clients.",
                        "loopback_only")
    if token is None:
        raise AuthError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                        "missing_api_key")
    if not _matches(token, keys):
        raise AuthError(401, "Incorrect API key provided.", "invalid_api_key")
    return fingerprint(token)
