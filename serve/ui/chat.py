"""What the browser UI does, without Gradio: chat turns and votes through the gateway's
own code paths (``serve.gateway.chat.start_turn``, its vote queue and ``Gateway.compare``).

The UI is one more client of the gateway: its turns are logged like API turns,
under the client id ``ui:<browser session>``, so a session can only rate the
answers it was served. Its voter is the login (``user:<login>``) or, without
logins, ``ui``: the UI then serves loopback only, and the browser picks its own
session id, so separate sessions must not count as separate voters.
"""

from __future__ import annotations

from dataclasses import dataclass

from feedback.errors import APIError
from feedback.votes import SIDE_BY_SIDE_TEMPERATURE, Vote
from serve.gateway.chat import start_turn
from serve.gateway.core import Gateway
from serve.protocol import CHAT_REPETITION_PENALTY, ChatCompletionRequest, strip_controls

MAX_TOKENS = 200       # per answer in the UI
TEMPERATURE = SIDE_BY_SIDE_TEMPERATURE


@dataclass
class Session:
    """Who is in the browser: the session id, and the user when logins are on."""

    id: str
    user: str | None = None

    @property
    def client(self) -> str:
        return f"ui:{self.id}"

    @property
    def voter(self) -> str:
        """Whose votes these are (the pair builder caps and compares voters): the login, else
        the one voter of the loopback-only UI."""
        return f"user:{self.user}" if self.user else "ui"


def prompt_messages(history: list[dict]) -> list[dict]:
    """The chat so far as plain OpenAI messages (Gradio adds display fields). Control
    characters (a pasted one, or one a model wrote) are dropped: requests refuse them."""
    return [{"role": m["role"], "content": strip_controls(_text(m["content"]))} for m in history
            if m.get("role") in ("user", "assistant")]


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio 6 may hand back [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


async def stream_answer(gateway: Gateway, model: str, messages: list[dict], session: Session,
                        temperature: float = TEMPERATURE, seed: int | None = None):
    """Yield (answer so far, turn id, model id that answered) as the answer streams in;
    the turn is in the store before the last yield."""
    body = ChatCompletionRequest(model=model, messages=messages, stream=True, max_tokens=MAX_TOKENS,
                                 temperature=temperature, seed=seed, user=session.user,
                                 repetition_penalty=CHAT_REPETITION_PENALTY)
    turn = await start_turn(gateway, body, session.client, session.voter)
    text, turn_id, model_id = "", turn.row.id, turn.target.model_id
    async with turn:  # ended on every path: a closed tab, an error raised here
        async for chunk in turn.chunks():
            if "error" in chunk:
                raise APIError(503, chunk["error"]["message"])
            for choice in chunk.get("choices", []):
                text += (choice.get("delta") or {}).get("content") or ""
            yield text, turn_id, model_id
    yield text, turn_id, model_id


async def vote(gateway: Gateway, turn_id: str, value: str, session: Session, reason: str | None = None) -> str:
    vote = Vote(turn_id, value, session.client, 0, reason, None, session.user)
    return await gateway.vote(vote, session.voter)


async def compare(gateway: Gateway, turn_a: str, turn_b: str, choice: str, left: str, session: Session) -> str:
    return await gateway.compare(turn_a, turn_b, choice, left, session.client, session.user, session.voter)


def contenders(gateway: Gateway, persona: str) -> tuple[str, str, str]:
    """The two model ids a side-by-side round asks, and what is being compared: the active
    version against the challenger of a running A/B experiment, or against the candidate when
    one is under test, else two samples of the active one."""
    tested = gateway.experiments.contenders(persona)
    if tested is not None:
        return *tested, "active vs challenger (A/B experiment)"
    info = gateway.catalog.personas[persona]
    if info.candidate is not None and info.candidate in info.versions and info.candidate not in info.unservable:
        return persona, f"{persona}@v{info.candidate}", "active vs candidate"
    return persona, persona, "two samples of the active version"
