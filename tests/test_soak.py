"""``persona bench soak``'s verdict: each target passes or fails on its own figure.

The whole bench runs for minutes on the real model (README, "Soak"); here its
verdict and its readings are checked on figures made up for the purpose.
"""

from __future__ import annotations

import argparse
import io
import os

import pytest
from rich.console import Console

from bench import load, soak

ARGS = argparse.Namespace(minutes=2, load=0.7, max_tokens=32)
START = {"gateway": 250.0, "engine": 800.0}


def verdict(tally: load.Tally, found: int, end: dict) -> tuple[bool, str]:
    table, passed = soak.verdict_table(ARGS, 1.0, 0.7, tally, found, START, end, end, requests=100)
    console = Console(width=300, file=io.StringIO(), record=True)
    console.print(table)
    return passed, console.export_text()


def clean_tally() -> load.Tally:
    tally = load.Tally(chats_ok=50)
    tally.votes = {f"chatcmpl-{i}": "up" for i in range(50)}
    return tally


def test_a_clean_run_passes():
    passed, cells = verdict(clean_tally(), 50, {"gateway": 260.0, "engine": 810.0})
    assert passed and "FAIL" not in cells, cells


@pytest.mark.parametrize("spoil, says", [
    (lambda t: setattr(t, "timeouts", 1), "1 of 100 requests"),
    (lambda t: t.refused.update({429: 2}), "2 of 100 requests"),
    (lambda t: setattr(t, "incomplete", 1), "1 of 100 requests"),
])
def test_any_error_fails(spoil, says):
    tally = clean_tally()
    spoil(tally)
    passed, cells = verdict(tally, 50, START)
    assert not passed and says in cells, cells


def test_a_lost_vote_fails():
    passed, cells = verdict(clean_tally(), 49, START)
    assert not passed and "1 (50 acknowledged, 49 in the store)" in cells, cells


@pytest.mark.parametrize("name", ["gateway", "engine"])
def test_rss_growth_of_ten_percent_fails(name):
    passed, _ = verdict(clean_tally(), 50, {**START, name: START[name] * 1.099})
    assert passed
    passed, cells = verdict(clean_tally(), 50, {**START, name: START[name] * 1.10})
    assert not passed and "+10.0%" in cells, cells


def test_rss_is_read_from_the_process():
    assert 5 < soak.rss_mb(os.getpid()) < 20_000
