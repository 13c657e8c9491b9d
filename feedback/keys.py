"""The bearer keys the settings give, for the gateway and for the commands that call it.

A kind of key (``API`` or ``ADMIN``) comes from its variable (``PERSONA_ADMIN_KEY``,
comma-separated) and from its key file (``PERSONA_ADMIN_KEY_FILE``, one key a line).
The gateway accepts both (``serve/gateway/auth.KeyRing``, which re-reads the file
when it changes); a command that calls the gateway sends the first key found, so
an operator who keeps keys only in a file runs every command the same way. The
retrain scheduler's run process inherits the gateway's environment, so it finds
the same file.

    headers = bearer_header("ADMIN")     # {"Authorization": "Bearer ..."} or {}
"""

from __future__ import annotations

import logging
from pathlib import Path

from feedback import settings

log = logging.getLogger(__name__)

KINDS = ("API", "ADMIN")


def read_key_file(path: Path) -> tuple[str, ...]:
    """The keys in a key file: one a line; blank lines and '#' comments are ignored."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line)


def configured_keys(kind: str) -> tuple[str, ...]:
    """Every key of ``kind`` the settings give: the variable's, then the key file's (an
    unreadable file is said in the log and gives none: the gateway then answers 401)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    keys = settings.get(f"PERSONA_{kind}_KEY")
    path = settings.get(f"PERSONA_{kind}_KEY_FILE")
    if path is None:
        return keys
    try:
        return keys + read_key_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("key file %s cannot be read (%s)", path, type(exc).__name__)
        return keys


def client_key(kind: str) -> str | None:
    """The key a command sends for ``kind``: the variable's first, else the key file's first."""
    keys = configured_keys(kind)
    return keys[0] if keys else None


def bearer_header(kind: str) -> dict[str, str]:
    """The Authorization header with ``client_key(kind)``, or none."""
    key = client_key(kind)
    return {"Authorization": f"Bearer {key}"} if key else {}
