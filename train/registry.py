"""Adapter registry: versioned adapter folders and each persona's active pointer.

Layout under ``PERSONA_HOME/adapters``::

    <persona>/v<N>/          PEFT adapter folder + meta.json
    <persona>/.staging-*/    a run in progress (never listed, never served)
    active.json              {"teto": {"version": 3, "history": [1, 2, 3], ...}}
    active.json.lock         the lock every change of active.json holds

A run writes into a staging folder and ``commit`` renames it to the next free
``v<N>`` only when it is complete, so a crashed run leaves nothing
registered. Version numbers are never reused. Which version serves is the
explicit pointer in ``active.json`` (one file for all personas), never "the
newest folder".

Writers are the gateway's retrain runs, the CLI and the scheduler, in several
processes at once, so every change of the pointer is a read-modify-write under
an exclusive ``flock`` of ``active.json.lock`` (``_edit_pointers``): none is
lost. The file is replaced atomically (temporary file, fsync, rename, fsync of
the folder, so the rename itself survives a power cut). Readers take no lock.

A persona's entry also records

* ``candidate``: the version tested side by side against the active one;
* ``marks``: versions the gate rejected or an operator retired, with the
  reason (``status`` reports them; the gateway refuses to serve them by pin);
* ``promoting``: a promotion under way (``promotion``). The pointer already
  names the new version while the gateway hot-swaps it; a process that dies
  in between leaves the marker, and ``reconcile`` (run by ``persona up``
  before the gateway starts) keeps the new version if its folder is complete,
  else goes back to the previous one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from feedback import settings
from feedback.errors import UserError
from feedback.naming import engine_name

VERSION_RE = re.compile(r"^v(\d+)$")
STATUSES = ("active", "candidate", "available", "rejected", "retired")
log = logging.getLogger(__name__)
_held = threading.local()  # the pointer lock this thread holds, if any


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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _read_pointers() -> dict:
    path = _pointer_file()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path} is corrupt ({exc.msg} at line {exc.lineno}); restore it or remove it") from None


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (the rename is an entry of the folder)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _edit_pointers() -> Iterator[dict]:
    """The pointers, read and written back under the exclusive lock (not written if the
    block raises). flock locks an open file description, so threads of one process
    exclude each other too; a nested edit would wait for itself, hence the check."""
    if getattr(_held, "locked", False):
        raise RuntimeError("the adapter pointer lock is already held by this thread (nested edit)")
    with open(root() / "active.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, on every path
        _held.locked = True
        try:
            pointers = _read_pointers()
            before = json.dumps(pointers, sort_keys=True)
            yield pointers
            if json.dumps(pointers, sort_keys=True) != before:
                _write_json_atomic(_pointer_file(), pointers)
        finally:
            _held.locked = False


def _folder(persona: str, version: int) -> Path:
    return root() / persona / f"v{version}"


def _exists(persona: str, version: int) -> bool:
    return (_folder(persona, version) / "meta.json").is_file()


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


def sft_version(persona: str) -> AdapterVersion | None:
    """The persona's newest SFT version (the one preference runs must not drift from)."""
    found = [v for v in versions(persona) if v.meta.get("kind") == "sft"]
    return found[-1] if found else None


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
        target = _folder(persona, version)
        try:
            os.rename(staging, target)  # atomic; fails if target exists
        except OSError:
            continue
        _fsync_dir(target.parent)
        return AdapterVersion(persona, version, target, meta)
    raise RegistryError(f"could not allocate a version number for {persona}")


def add_metrics(persona: str, version: int, metrics: dict) -> AdapterVersion:
    """Add measured figures to a registered version's ``meta.json`` metrics (its adapter and
    everything else stay as they are); returns the version as now recorded."""
    folder = _folder(persona, version)
    if not _exists(persona, version):
        raise RegistryError(f"{persona} has no version v{version}")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    meta["metrics"] = {**(meta.get("metrics") or {}), **metrics}
    _write_json_atomic(folder / "meta.json", meta)
    return AdapterVersion(persona, version, folder, meta)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def active(persona: str) -> AdapterVersion | None:
    version = _read_pointers().get(persona, {}).get("version")
    return None if version is None else get(persona, version)


def active_adapters() -> list[AdapterVersion]:
    """The active adapter of every persona that has one (the engines serve these)."""
    from train.personas import list_persona_names

    return [a for a in (active(n) for n in list_persona_names()) if a is not None]


def _activate(persona: str, entry: dict, version: int, reason: str) -> None:
    """Point ``entry`` (a persona's pointer, edited in place) at ``version``. Promoting a
    version ends its side-by-side test and lifts a rejection or retirement: it is an
    explicit decision to serve it."""
    if not _exists(persona, version):
        get(persona, version)  # raises with the versions there are
    entry["history"] = [v for v in entry.get("history", []) if v != version] + [version]
    entry.update(version=version, since=_now(), reason=reason)
    if entry.get("candidate") == version:
        del entry["candidate"]
    entry.get("marks", {}).pop(str(version), None)


def _with_active(pointers: dict, persona: str, action: str) -> dict:
    entry = pointers.get(persona, {})
    if entry.get("version") is None:
        raise RegistryError(f"{persona} has no active adapter{action}")
    return entry


def set_active(persona: str, version: int, reason: str = "promote") -> AdapterVersion:
    with _edit_pointers() as pointers:
        _activate(persona, pointers.setdefault(persona, {}), version, reason)
    return get(persona, version)


def candidate(persona: str) -> AdapterVersion | None:
    """The version being tested against the active one (side by side), if any."""
    version = _read_pointers().get(persona, {}).get("candidate")
    return get(persona, version) if version is not None else None


def set_candidate(persona: str, version: int | None) -> AdapterVersion | None:
    """Mark ``version`` as the persona's candidate (``None`` clears it)."""
    with _edit_pointers() as pointers:
        entry = _with_active(pointers, persona, "; a candidate is tested against the active one")
        if version is None:
            entry.pop("candidate", None)
            return None
        target = get(persona, version)
        if version == entry["version"]:
            raise RegistryError(f"{persona} v{version} is the active version, not a candidate")
        entry["candidate"] = version
        entry.get("marks", {}).pop(str(version), None)  # chosen to be tested: no longer rejected
    return target


def rollback(persona: str) -> AdapterVersion:
    """Point the persona back at the version that was active before the current one
    (skipping versions deleted, rejected or retired since)."""
    with _edit_pointers() as pointers:
        entry = _with_active(pointers, persona, " to roll back from")
        current, marks = entry["version"], entry.get("marks", {})
        history = [v for v in entry["history"] if v != current and _exists(persona, v) and str(v) not in marks]
        if not history:
            raise RegistryError(f"{persona} v{current} has no earlier version to roll back to")
        _activate(persona, entry, history[-1], reason=f"rollback from v{current}")
        # Drop the rolled-back version from history so a second rollback goes further back.
        entry["history"] = history
    return get(persona, history[-1])


def _set_mark(entry: dict, version: int, status: str, reason: str) -> None:
    if entry.get("candidate") == version:
        del entry["candidate"]  # its side-by-side test is over
    entry.setdefault("marks", {})[str(version)] = {"status": status, "reason": reason, "at": _now()}


def _mark(persona: str, version: int, status: str, reason: str) -> None:
    with _edit_pointers() as pointers:
        entry = pointers.setdefault(persona, {})
        if not _exists(persona, version):
            get(persona, version)  # raises with the versions there are
        if entry.get("version") == version:
            raise RegistryError(f"{persona} v{version} is the active version: promote another or roll back first")
        _set_mark(entry, version, status, reason)


def mark_rejected(persona: str, version: int, reason: str) -> None:
    """The gate (or an engine) refused ``version``: it is kept on disk, never served by pin."""
    _mark(persona, version, "rejected", reason)


def retire(persona: str, version: int, reason: str) -> None:
    """Take ``version`` out of service for good (kept on disk, never served by pin)."""
    _mark(persona, version, "retired", reason)


def status(persona: str, version: int) -> tuple[str, str | None]:
    """(status, reason) of a registered version: status is one of ``STATUSES``; the reason
    says why it was rejected or retired (else None)."""
    if not _exists(persona, version):
        get(persona, version)  # raises with the versions there are
    entry = _read_pointers().get(persona, {})
    if entry.get("version") == version:
        return "active", None
    if entry.get("candidate") == version:
        return "candidate", None
    mark = entry.get("marks", {}).get(str(version))
    return (mark["status"], mark["reason"]) if mark else ("available", None)


# --- promotion in progress -------------------------------------------------------------

def _process_token(pid: int) -> str | None:
    """Host, pid and the process's start time (so a reused pid does not pass for the same
    process); None when no such process runs here."""
    if os.path.isdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
                started = fh.read().rsplit(")", 1)[1].split()[19]  # field 22, after the command name
        except OSError:
            return None
    else:  # no /proc (not Linux): the pid alone
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # someone else's process, but it runs
        started = "?"
    return f"{socket.gethostname()}:{pid}:{started}"


def _owner_alive(marker: dict) -> bool:
    owner = marker.get("owner") or ""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return bool(owner)  # another machine's process (a shared home): cannot tell, so leave it
    return _process_token(int(rest.partition(":")[0])) == owner


class Promotion:
    """A promotion under way (see ``promotion``)."""

    def __init__(self, persona: str, version: int, previous: int, run: str):
        self.persona, self.version, self.previous, self.run = persona, version, previous, run

    def undo(self, reason: str) -> None:
        """Go back to the previous version and mark this one rejected for ``reason``."""
        with _edit_pointers() as pointers:
            entry = pointers[self.persona]
            if entry.get("version") == self.version:
                _activate(self.persona, entry, self.previous, reason=f"v{self.version} refused")
            _set_mark(entry, self.version, "rejected", reason)


@contextlib.contextmanager
def promotion(persona: str, version: int, run: str) -> Iterator[Promotion]:
    """Point ``persona`` at ``version`` with a ``promoting`` marker, for as long as the
    gateway takes to hot-swap it; the marker is cleared on every way out, and an error
    inside also puts the previous version back. Only a killed process leaves the marker,
    for ``reconcile``. A second promotion of the persona meanwhile is refused."""
    with _edit_pointers() as pointers:
        entry = _with_active(pointers, persona, "; a promotion replaces the active one")
        if entry.get("promoting"):
            note = _settle(persona, entry)
            if entry.get("promoting"):
                raise RegistryError(f"another promotion is under way: {note}")
            log.warning(note)  # one a dead process left, settled first
        previous = entry["version"]
        _activate(persona, entry, version, reason=f"retrain {run}")
        entry["promoting"] = {"version": version, "previous": previous, "run": run, "started_at": _now(),
                              "owner": _process_token(os.getpid())}
    done = Promotion(persona, version, previous, run)
    ok = False
    try:
        yield done
        ok = True
    finally:
        with _edit_pointers() as pointers:
            entry = pointers[persona]
            if (entry.get("promoting") or {}).get("run") == run:
                del entry["promoting"]
            if not ok and entry.get("version") == version:
                _activate(persona, entry, previous, reason=f"promotion of v{version} by {run} failed")


def loadable(path: Path) -> bool:
    """Whether an adapter folder is complete: meta.json and adapter_config.json parse, and
    the weights are whole (a safetensors header that fits in the file), without torch."""
    try:
        for name in ("meta.json", "adapter_config.json"):
            json.loads((path / name).read_text(encoding="utf-8"))
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            return (path / "adapter_model.bin").is_file() and (path / "adapter_model.bin").stat().st_size > 0
        with open(weights, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            json.loads(fh.read(size))
        return weights.stat().st_size >= 8 + size
    except (OSError, ValueError, struct.error):
        return False


def _settle(persona: str, entry: dict) -> str:
    """Finish or undo the promotion ``entry`` records, unless its process still runs;
    says what it did."""
    marker = entry["promoting"]
    version, previous, run = marker["version"], marker["previous"], marker.get("run")
    if _owner_alive(marker):
        return f"{persona}: run {run} ({marker.get('owner')}) is still promoting v{version}; left alone"
    del entry["promoting"]
    what = f"the promotion of v{version} by run {run} was interrupted"
    if entry.get("version") != version:
        return f"{persona}: {what}; v{entry.get('version')} is active since, so only the marker went"
    if loadable(_folder(persona, version)):
        return f"{persona}: {what}; kept v{version} (its folder is complete)"
    if not loadable(_folder(persona, previous)):
        return f"{persona}: {what}; v{version} is incomplete and v{previous} is gone: promote a good version by hand"
    _activate(persona, entry, previous, reason=f"interrupted promotion of v{version} undone")
    _set_mark(entry, version, "rejected", f"{what} and its folder is incomplete")
    return f"{persona}: {what}; v{version} is incomplete, so back to v{previous}"


def reconcile(persona: str | None = None) -> list[str]:
    """Settle the promotions that processes which died left in progress (every persona's,
    or one's); returns (and logs) what it did. ``persona up`` runs it before serving."""
    notes = []
    with _edit_pointers() as pointers:
        for name, entry in pointers.items():
            if persona in (None, name) and entry.get("promoting"):
                notes.append(_settle(name, entry))
    for note in notes:
        log.warning(note)
    return notes
