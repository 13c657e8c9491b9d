"""The browser UI in a real browser: headless Debian Chromium driven by Playwright,
against a real gateway (UI mounted at /) in front of the embedded engine on the tiny
model, with a real DuckDB store. Each step's screenshot is saved under
test-output/ui/<test>/."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import REPO
from contract_stack import stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("CI"),
                                reason="Debian chromium is not installed (make test installs it)")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def ui(tiny_model_dir, tmp_path_factory):
    with stack("embedded", tiny_model_dir, tmp_path_factory.mktemp("ui")) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Steps:
    """Screenshots of one test, numbered in order."""

    def __init__(self, page, name: str):
        self.folder = REPO / "test-output" / "ui" / name
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self.page, self.n = page, 0

    def shot(self, step: str) -> Path:
        self.n += 1
        path = self.folder / f"{self.n:02d}-{step}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def page(browser, ui, request):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    p = context.new_page()
    p.set_default_timeout(TIMEOUT_MS)
    p.goto(ui.url + "/")
    p.get_by_text("persona-chat").first.wait_for()
    yield p, Steps(p, request.node.name)
    context.close()


def pick_persona(p, label: str) -> None:
    p.locator("#persona input").click()
    p.get_by_role("option", name=re.compile(label, re.I)).click()


def words(text: str) -> list[str]:
    return text.split()


def wait_until(predicate, timeout: float = 30.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_chat_streams_and_thumbs_land_in_store(page, ui):
    p, steps = page
    steps.shot("opened")
    pick_persona(p, "egen")
    p.locator("#chat-input textarea").fill("Hello there, who are you?")
    steps.shot("typed")
    p.locator("#chat-send").click()
    bot = p.locator("#chatbot .message-row.bot-row, #chatbot [data-testid='bot']").last
    bot.wait_for()
    # The answer streams in; the status line names the version once it started.
    p.locator("#chat-status").get_by_text("egen@v1").wait_for()
    steps.shot("answered")

    turn = wait_until(lambda: ui.store.query(
        "SELECT id, json_extract_string(answers, 0), client FROM turns WHERE persona = 'egen' "
        "AND messages::VARCHAR LIKE '%who are you%' AND status = 'ok'"))
    turn_id, answer, client = turn[0]
    assert client.startswith("ui:") and answer
    p.wait_for_function("t => document.querySelector('#chatbot').innerText.includes(t)", arg=answer[:20].strip())

    p.locator("#chatbot").get_by_role("button", name="Like").last.click()
    p.locator("#chat-status").get_by_text("recorded").wait_for()
    steps.shot("liked")
    votes = ui.store.query("SELECT vote, client, voter FROM votes WHERE turn_id = ?", [turn_id])
    assert votes == [("up", client, "ui")], "without logins every browser session is the one voter ui"

    # Clicking the same thumb again takes the vote back.
    p.locator("#chatbot").get_by_role("button", name="Liked").last.click()
    p.locator("#chat-status").get_by_text("retracted").wait_for()
    steps.shot("retracted")
    assert ui.store.query("SELECT count(*) FROM current_votes WHERE turn_id = ?", [turn_id])[0][0] == 0

    # Regenerate: a second answer to the same context; the first stays in the store.
    p.locator("#chat-regenerate").click()
    second = wait_until(lambda: ui.store.query(
        "SELECT id FROM turns WHERE messages::VARCHAR = (SELECT messages::VARCHAR FROM turns WHERE id = ?) "
        "AND id <> ?", [turn_id, turn_id]))
    p.locator("#chat-status").get_by_text("egen@v1").wait_for()
    steps.shot("regenerated")
    assert ui.store.query("SELECT count(*) FROM turns WHERE id = ?", [turn_id])[0][0] == 1
    p.locator("#chatbot").get_by_role("button", name="Dislike").last.click()
    p.locator("#chat-status").get_by_text("recorded").wait_for()
    assert ui.store.query("SELECT vote FROM current_votes WHERE turn_id = ?", [second[0][0]]) == [("down",)]

    p.locator("#chat-clear").click()
    p.wait_for_function("() => !document.querySelector('#chatbot').innerText.includes('who are you')")
    steps.shot("cleared")


def test_side_by_side_vote_is_stored_with_order(page, ui):
    p, steps = page
    import httpx

    from contract_stack import ADMIN_KEY

    ui.state["catalog"] = candidate_catalog(ui)  # teto v1 active, v2 under test
    httpx.post(ui.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).raise_for_status()
    p.reload()
    p.get_by_text("persona-chat").first.wait_for()
    pick_persona(p, "teto")
    p.get_by_role("tab", name="Side by side").click()
    p.locator("#sbs-input textarea").fill("Pick a plan for today.")
    p.locator("#sbs-send").click()
    p.locator("#sbs-reveal").get_by_text("Which answer is better?").wait_for()
    steps.shot("two-answers")
    left_text = p.locator("#answer-a textarea").input_value()
    assert left_text and p.locator("#answer-b textarea").input_value()

    p.locator("#vote-a").click()
    p.locator("#sbs-reveal").get_by_text("You chose").wait_for()
    steps.shot("revealed")
    reveal = p.locator("#sbs-reveal").inner_text()
    assert "teto@v1" in reveal and "teto@v2" in reveal

    rows = ui.store.query_dicts("SELECT c.*, ta.requested_model AS model_a, tb.requested_model AS model_b, "
                                "json_extract_string(tl.answers, 0) AS left_answer FROM comparisons c "
                                "JOIN turns ta ON ta.id = c.turn_a JOIN turns tb ON tb.id = c.turn_b "
                                "JOIN turns tl ON tl.id = c.left_turn")
    assert len(rows) == 1
    row = rows[0]
    assert (row["model_a"], row["model_b"]) == ("teto", "teto@v2")
    assert words(row["left_answer"]) == words(left_text)  # the stored order is the order shown
    assert row["choice"] == ("a" if row["left_turn"] == row["turn_a"] else "b")  # "A" was the left one
    assert row["client"].startswith("ui:") and row["voter"] == "ui"
    # The conversation goes on with the chosen answer.
    p.wait_for_function("t => document.querySelector('#sbs-history').innerText.includes(t)",
                        arg=left_text[:20].strip())
    steps.shot("continued")


def test_dashboard_renders_plots(page, ui):
    p, steps = page
    p.get_by_role("tab", name="Dashboard").click()
    for plot in ("plot-votes", "plot-thumbs", "plot-wins", "plot-bias", "plot-runs"):
        p.locator(f"#{plot} img").first.wait_for()
    p.locator("#table-adapters").get_by_text("teto").first.wait_for()
    summary = p.locator("#dash-summary").inner_text()
    assert re.search(r"\d+ turns", summary) and "active v1" in summary
    steps.shot("dashboard")
    for plot in ("plot-votes", "plot-thumbs"):
        box = p.locator(f"#{plot} img").first.bounding_box()
        assert box["width"] > 200 and box["height"] > 100


def candidate_catalog(ui):
    from dataclasses import replace

    from serve.gateway.catalog import Catalog

    personas = dict(ui.state["catalog"].personas)
    personas["teto"] = replace(personas["teto"], candidate=2)
    return Catalog(personas)


@pytest.mark.parametrize("locale, shown, hidden", [("ko-KR", "대담한 코치.", "Bold coach."),
                                                    ("en-US", "Bold coach.", "대담한 코치.")])
def test_persona_picker_speaks_the_browsers_language(browser, ui, request, locale, shown, hidden):
    """A browser that asks for Korean (its locale sets Accept-Language) reads the persona's
    Korean description in the picker; another reads the default one."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, locale=locale)
    try:
        p = context.new_page()
        p.set_default_timeout(TIMEOUT_MS)
        p.goto(ui.url + "/")
        p.get_by_text("persona-chat").first.wait_for()
        p.locator("#persona input").click()
        option = p.get_by_role("option", name=re.compile("teto"))
        option.wait_for()
        p.wait_for_function("t => [...document.querySelectorAll('[role=option]')].some(o => o.innerText.includes(t))",
                            arg=shown)
        Steps(p, request.node.name.replace("[", "-").replace("]", "")).shot("picker")
        assert shown in option.inner_text() and hidden not in option.inner_text()
    finally:
        context.close()


def test_browser_languages_come_from_accept_language():
    from types import SimpleNamespace

    from serve.ui.app import browser_languages

    def asks(header):
        return browser_languages(SimpleNamespace(headers={"accept-language": header}))

    assert asks("ko-KR,ko;q=0.9,en-US;q=0.8,en;q=0.7") == ["ko", "en"]
    assert asks("en;q=0.5, ko;q=0.9") == ["ko", "en"]
    assert asks("de, *;q=0.1") == ["de"] and asks("") == [] and asks("ko;q=0") == []
    assert browser_languages(None) == []


def test_ui_session_cannot_vote_on_api_turns(ui):
    """A browser session is its own client: it cannot rate a turn served to an API key."""
    from feedback.errors import APIError
    from feedback.votes import record_vote
    from openai import OpenAI

    from contract_stack import API_KEY

    client = OpenAI(base_url=ui.url + "/v1", api_key=API_KEY)
    reply = client.chat.completions.create(model="teto", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with pytest.raises(APIError) as err:
        record_vote(ui.store, reply.id, "up", client="ui:some-session")
    assert err.value.status == 403
    assert json.loads(ui.store.query("SELECT answers FROM turns WHERE id = ?", [reply.id])[0][0])
