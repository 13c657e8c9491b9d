"""Caps on the browser UI: Gradio's upload route refuses a file over PERSONA_UI_MAX_UPLOAD_BYTES,
and its queue refuses events past PERSONA_UI_QUEUE_SIZE. A real gateway with the UI mounted,
on loopback, in front of the embedded engine (tiny model)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from contract_stack import stack


@pytest.fixture(scope="module")
def url(tiny_model_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PERSONA_UI_MAX_UPLOAD_BYTES", "1000")
        env.setenv("PERSONA_UI_QUEUE_SIZE", "1")
        with stack("embedded", tiny_model_dir, tmp_path_factory.mktemp("ui-limits")) as s:
            yield s.url


def upload(url: str, size: int) -> httpx.Response:
    return httpx.post(url + "/gradio_api/upload", files={"files": ("a.txt", b"x" * size)}, timeout=30)


def test_an_upload_over_the_cap_is_refused(url):
    assert upload(url, 900).status_code == 200
    big = upload(url, 5000)
    assert big.status_code == 413 and "1000 bytes" in big.text


def test_events_past_the_queue_size_are_refused(url):
    """16 events sent at once: the queue holds one waiting event, the rest hear 503 at once."""
    def join(i: int) -> httpx.Response:
        return httpx.post(url + "/gradio_api/queue/join", timeout=30,
                          json={"data": [], "fn_index": 0, "session_hash": f"s{i}", "event_data": None})

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(join, range(16)))
    full = [r for r in answers if r.status_code == 503]
    assert full and all("Queue is full" in r.text for r in full), [(r.status_code, r.text[:100]) for r in answers]
    assert all(r.status_code in (200, 503) for r in answers)
