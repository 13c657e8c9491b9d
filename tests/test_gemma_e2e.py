"""End to end on the real Gemma 3 270M, as a Korean user meets it: the built-in model provisioned
from its packages, a few SFT steps of teto on its Korean dialogues, `persona up` (gateway and
embedded engine on loopback), and a Korean message typed into the browser UI whose answer is
mostly Hangul. Select it alone with ``pytest -m gemma_e2e``; it runs in ``make test`` too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from test_ui import CHROMIUM, CHROMIUM_ARGS, Steps

pytestmark = [pytest.mark.gemma_e2e, pytest.mark.slow]

QUESTION = "오늘 너무 피곤해. 어떻게 해야 할까?"


def hangul_share(text: str) -> float:
    """Hangul syllables and jamo among the letters and digits of ``text`` (punctuation, spaces
    and emoji do not count either way)."""
    signs = [c for c in text if c.isalnum()]
    hangul = [c for c in signs if "\uac00" <= c <= "\ud7a3" or "\u1100" <= c <= "\u11ff" or "\u3130" <= c <= "\u318f"]
    return len(hangul) / len(signs) if signs else 0.0


def test_hangul_share_counts_letters_only():
    assert hangul_share("좋아, 지금 자!") == 1.0
    assert hangul_share("OK 좋아") == 0.5
    assert hangul_share("...") == 0.0


def persona(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=480)


def final_text(locator, quiet: float = 4.0, timeout: float = 180.0) -> str:
    """The text of a streaming answer once it has stopped changing for ``quiet`` seconds."""
    deadline, last, since = time.time() + timeout, None, time.time()
    while time.time() < deadline:
        text = locator.inner_text()
        if text != last:
            last, since = text, time.time()
        elif text.strip() and time.time() - since >= quiet:
            return text
        time.sleep(0.5)
    raise AssertionError(f"the answer did not finish in {timeout} s: {last!r}")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium is not installed (make test installs it)")
def test_a_korean_chat_in_the_browser_on_gemma(gemma_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    from serve.processes import free_port, persona_process

    env = {"PERSONA_BASE_MODEL": str(gemma_dir)}
    trained = persona("train", "sft", "--persona", "teto", "--languages", "ko", "--max-steps", "12", env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Saved teto-v1" in trained.stderr and re.search(r"ko: [\d.]+ -> [\d.]+", trained.stderr), trained.stderr

    port = free_port()
    with persona_process(["up", "--port", str(port), "--no-scheduler"], port, tmp_path / "up.log", env=env) as url, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale="ko-KR")
        p = context.new_page()
        p.set_default_timeout(120_000)
        steps = Steps(p, "test_a_korean_chat_in_the_browser_on_gemma")
        p.goto(url + "/")
        p.get_by_text("persona-chat").first.wait_for()
        p.locator("#persona input").click()
        option = p.get_by_role("option", name=re.compile("Teto"))
        assert "행동파" in option.inner_text()          # the Korean description, for a Korean browser
        option.click()
        p.locator("#chat-input textarea").fill(QUESTION)
        p.locator("#chat-send").click()
        p.locator("#chat-status").get_by_text("teto@v1").wait_for()
        bot = p.locator("#chatbot .message-row.bot-row, #chatbot [data-testid='bot']").last
        answer = final_text(bot)
        steps.shot("answered")
        context.close()
        browser.close()
    assert "\ufffd" not in answer
    assert hangul_share(answer) > 0.5, answer
