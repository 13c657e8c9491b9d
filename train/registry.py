"""Adapter registry: versioned adapter folders and each persona's active pointer.

Layout under ``PERSONA_HOME/adapters``::

    <persona>/v<N>/          PEFT adapter folder + meta.json
    <persona>/.staging-*/    a run in progress (never listed, never served)
    active.json              {"teto": {"version": 3, "history": [1, 2, 3], ...}}

A run writes into a staging folder and ``commit`` renames it to the next free
``v<N>`` only when it is complete, so a crashed run leaves nothing
registered. Version numbers are never reused. Which version serves is the
explicit pointer in ``active.json`` (one file for all personas, replaced
atomically), never "the newest folder".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from feedback import settings
from feedback.errors import UserError
from feedback.naming import engine_name

VERSION_RE = re.compile(r"^v(\d+)$")


class RegistryError(UserError):
    pass


@dataclass
class AdapterVersion:
    persona: str
    version: int
    path: Path
    meta: dict

    @property
    def name(self) -> str:
        """The name engines serve it under, e.g. ``teto-v3`` (never reused)."""
        return engine_name(self.persona, self.version)


def root() -> Path:
    path = settings.adapters_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pointer_file() -> Path:
    return root() / "active.json"


def _read_pointers() -> dict:
    path = _pointer_file()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is corrupt ({exc.msg} at line {exc.lineno}); restore it or remove it") from None


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def versions(persona: str) -> list[AdapterVersion]:
    folder = root() / persona
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            m = VERSION_RE.match(child.name)
            if m and (child / "meta.json").is_file():
                meta = json.loads((child / "meta.json").read_text(encoding="utf-8"))
                found.append(AdapterVersion(persona, int(m.group(1)), child, meta))
    return sorted(found, key=lambda v: v.version)


def get(persona: str, version: int) -> AdapterVersion:
    for v in versions(persona):
        if v.version == version:
            return v
    known = ", ".join(f"v{v.version}" for v in versions(persona)) or "none"
    raise RegistryError(f"{persona} has no adapter v{version} (versions: {known})")


def staging_dir(persona: str) -> Path:
    folder = root() / persona
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))


def _next_version(persona: str) -> int:
    folder = root() / persona
    used = [int(m.group(1)) for c in folder.iterdir() if (m := VERSION_RE.match(c.name))] if folder.is_dir() else []
    history = _read_pointers().get(persona, {}).get("history", [])
    return max(used + history + [0]) + 1


def commit(persona: str, staging: Path, meta: dict) -> AdapterVersion:
    """Write meta.json into a finished staging folder and register it as v<N+1>."""
    for attempt in range(100):  # another run may take the same number first
        version = _next_version(persona)
        meta = {**meta, "persona": persona, "version": version}
        _write_json_atomic(staging / "meta.json", meta)
        target = root() / persona / f"v{version}"
        try:
            os.rename(staging, target)  # atomic; fails if target exists
        except OSError:
            continue
        return AdapterVersion(persona, version, target, meta)
    raise RegistryError(f"could not allocate a version number for {persona}")


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def active(persona: str) -> AdapterVersion | None:
    entry = _read_pointers().get(persona)
    if not entry:
        return None
    return get(persona, entry["version"])


def active_adapters() -> list[AdapterVersion]:
    """The active adapter of every persona that has one (the engines serve these)."""
    from train.personas import list_persona_names

    return [a for a in (active(n) for n in list_persona_names()) if a is not None]


def set_active(persona: str, version: int, reason: str = "promote") -> AdapterVersion:
    target = get(persona, version)  # raises if it does not exist
    pointers = _read_pointers()
    entry = pointers.get(persona, {"history": []})
    history = [v for v in entry.get("history", []) if v != version] + [version]
    pointers[persona] = {
        "version": version,
        "history": history,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": reason,
    }
    if entry.get("candidate") not in (None, version):
        pointers[persona]["candidate"] = entry["candidate"]
    _write_json_atomic(_pointer_file(), pointers)
    return target


def candidate(persona: str) -> AdapterVersion | None:
    """The version being tested against the active one (side by side), if any."""
    version = _read_pointers().get(persona, {}).get("candidate")
    return get(persona, version) if version is not None else None


def set_candidate(persona: str, version: int | None) -> AdapterVersion | None:
    """Mark ``version`` as the persona's candidate (``None`` clears it)."""
    pointers = _read_pointers()
    entry = pointers.get(persona)
    if not entry:
        raise RegistryError(f"{persona} has no active adapter; a candidate is tested against the active one")
    if version is None:
        entry.pop("candidate", None)
        _write_json_atomic(_pointer_file(), pointers)
        return None
    target = get(persona, version)
    if version == entry["version"]:
        raise RegistryError(f"{persona} v{version} is the active version, not a candidate")
    entry["candidate"] = version
    _write_json_atomic(_pointer_file(), pointers)
    return target


def rollback(persona: str) -> AdapterVersion:
    """Point the persona back at the version that was active before the current one."""
    entry = _read_pointers().get(persona)
    if not entry:
        raise RegistryError(f"{persona} has no active adapter to roll back from")
    history = [v for v in entry["history"] if v != entry["version"] and (root() / persona / f"v{v}").is_dir()]
    if not history:
        raise RegistryError(f"{persona} v{entry['version']} has no earlier version to roll back to")
    pointers = _read_pointers()
    previous = history[-1]
    # Drop the rolled-back version from history so a second rollback goes further back.
    pointers[persona] = {
        "version": previous,
        "history": history,
        "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": f"rollback from v{entry['version']}",
    }
    _write_json_atomic(_pointer_file(), pointers)
    return get(persona, previous)
