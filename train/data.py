"""Load dialogue datasets in the formats people bring, validating every record.

Accepted record shapes (JSON Lines, or a JSON array / ``{"data": [...]}``):

* chat:        ``{"messages": [{"role": "user", "content": "..."}, ...]}``
* Alpaca:      ``{"instruction": "...", "input": "...", "output": "..."}``
* prompt pair: ``{"prompt": "...", "response": "..."}`` (``completion`` is accepted for ``response``)

Alpaca and prompt pairs may carry a ``"system"`` string. Any record may carry
``"language"``/``"lang"`` to override its file's language, and other keys
(``topic``, ``id``) are kept as metadata. A bad record raises ``DataError``
naming the file, the line and the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from feedback.errors import UserError

ROLES = ("system", "user", "assistant")
MAX_CONTENT_CHARS = 20_000


class DataError(UserError):
    def __init__(self, path: Path | str, line: int, field_name: str, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field_name, message
        super().__init__(f"{path}:{line}: field {field_name!r}: {message}")


@dataclass
class Example:
    messages: list[dict[str, str]]
    language: str
    source: str  # "file:line", for error messages and provenance
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> list[dict[str, str]]:
        """Messages before the last assistant answer."""
        return self.messages[:-1]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed record) for a .jsonl or .json file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(path, line, "(file)", "not valid UTF-8") from None
    except OSError as exc:
        raise DataError(path, 0, "(file)", f"cannot read: {exc.strerror}") from None
    if path.suffix == ".jsonl":
        for number, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, "(line)", f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    elif path.suffix == ".json":
        yield from _iter_json_array(path, text)
    else:
        raise DataError(path, 0, "(file)", "unsupported file type: use .jsonl or .json")


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    # Decode element by element so every record keeps its line number.
    decoder = json.JSONDecoder()
    try:
        top = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, "(file)", f"invalid JSON: {exc.msg}") from None
    if isinstance(top, dict) and isinstance(top.get("data"), list):
        start = text.index("[", text.index('"data"'))
    elif isinstance(top, list):
        start = text.index("[")
    else:
        raise DataError(path, 1, "(file)", 'expected a JSON array of records or {"data": [...]}')
    pos = start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        record, end = decoder.raw_decode(text, pos)
        yield text.count("\n", 0, pos) + 1, record
        pos = end


def to_example(record: Any, path: Path, line: int, language: str) -> Example:
    """Validate one record and turn it into chat messages."""
    def fail(field_name: str, message: str):
        raise DataError(path, line, field_name, message)

    if not isinstance(record, dict):
        fail("(record)", f"expected a JSON object, got {type(record).__name__}")
    meta = {k: v for k, v in record.items()
            if k not in ("messages", "instruction", "input", "output", "prompt", "response",
                         "completion", "system", "language", "lang")}
    lang = record.get("language", record.get("lang", language))
    if not isinstance(lang, str) or not lang:
        fail("language", "must be a non-empty string such as 'en'")

    if "messages" in record:
        messages = _check_messages(record["messages"], fail)
    elif "instruction" in record or "output" in record:
        instruction = _text(record, "instruction", fail)
        extra = _text(record, "input", fail, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = _with_system(record, fail) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _text(record, "output", fail)},
        ]
    elif "prompt" in record:
        answer_key = "response" if "response" in record or "completion" not in record else "completion"
        messages = _with_system(record, fail) + [
            {"role": "user", "content": _text(record, "prompt", fail)},
            {"role": "assistant", "content": _text(record, answer_key, fail)},
        ]
    else:
        fail("(record)", "unknown format: expected 'messages', 'instruction' + 'output', "
                         "or 'prompt' + 'response'")
    return Example(messages=messages, language=lang, source=f"{path}:{line}", meta=meta)


def _text(record: dict, key: str, fail, required: bool = True) -> str:
    if key not in record:
        if required:
            fail(key, "missing")
        return ""
    value = record[key]
    if not isinstance(value, str):
        fail(key, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        fail(key, "is empty")
    if len(value) > MAX_CONTENT_CHARS:
        fail(key, f"is {len(value)} characters; the limit is {MAX_CONTENT_CHARS}")
    return value


def _with_system(record: dict, fail) -> list[dict[str, str]]:
    if "system" not in record:
        return []
    return [{"role": "system", "content": _text(record, "system", fail)}]


def _check_messages(messages: Any, fail) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        fail("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            fail(where, f"must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            fail(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            fail(f"{where}.role", "a system message may only come first")
        content = _text(msg, "content", lambda f, m: fail(f"{where}.{f}", m))
        out.append({"role": role, "content": content})
    turns = [m["role"] for m in out if m["role"] != "system"]
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            fail(f"messages[{i + (len(out) - len(turns))}].role",
                 f"expected {expected!r}: turns must alternate user, assistant, starting with user")
    if not turns or turns[-1] != "assistant":
        fail("messages", "must end with an assistant message (the answer to learn)")
    return out


def load_file(path: Path, language: str) -> list[Example]:
    return [to_example(rec, Path(path), line, language) for line, rec in iter_records(path)]


def load_files(files: list[tuple[Path, str]], languages: list[str] | None = None) -> list[Example]:
    """Load (path, language) pairs, keeping only examples in ``languages``."""
    examples = []
    for path, language in files:
        examples.extend(load_file(path, language))
    if languages is not None:
        examples = [e for e in examples if e.language in languages]
    return examples


def data_hash(files: list[Path], languages: list[str] | None = None) -> str:
    """A short fingerprint of the training data, recorded with each adapter."""
    h = hashlib.sha256()
    for path in sorted(map(str, files)):
        h.update(Path(path).name.encode())
        h.update(Path(path).read_bytes())
    h.update(json.dumps(sorted(languages or [])).encode())
    return "sha256:" + h.hexdigest()[:16]
