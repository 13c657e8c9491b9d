"""Two at once: pointer updates from many processes and threads lose none (the registry's
file lock), and two runs started in the same second get their own folders."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from test_registry import make_version
from train import registry

# Each thread of each process promotes its own teto versions (every promotion appends to
# the history) and rejects or retires its own egen versions, all at the same moment.
WORKER = """
import sys, threading, time
from train import registry

start, process, threads, per = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def work(thread):
    first = 2 + (process * threads + thread) * per
    for v in range(first, first + per):
        registry.set_active("teto", v)
        (registry.retire if v % 2 else registry.mark_rejected)("egen", v, f"by {process}.{thread}")

time.sleep(max(0.0, start - time.time()))
workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
"""


def test_concurrent_pointer_updates_lose_none():
    processes, threads, per = 6, 2, 4
    last = 1 + processes * threads * per
    for persona in ("teto", "egen"):
        for _ in range(last):
            make_version(persona)
        registry.set_active(persona, 1)
    start = time.time() + 2  # every process imported and waiting by then
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(start), str(p), str(threads), str(per)],
                                env=os.environ.copy()) for p in range(processes)]
    assert [w.wait(120) for w in workers] == [0] * processes
    pointers = registry._read_pointers()
    assert sorted(pointers["teto"]["history"]) == list(range(1, last + 1))
    assert sorted(int(v) for v in pointers["egen"]["marks"]) == list(range(2, last + 1))
    assert [registry.status("egen", v)[0] for v in (2, 3)] == ["rejected", "retired"]


def test_nested_pointer_edit_is_an_error_not_a_deadlock():
    with registry._edit_pointers():
        with pytest.raises(RuntimeError, match="already held"):
            with registry._edit_pointers():
                pass


def test_runs_started_in_the_same_second_get_their_own_folders(monkeypatch):
    from train import loop

    monkeypatch.setattr(time, "strftime", lambda fmt, *rest: "20250101-120000")
    suffixes = iter(["aaaaaa", "aaaaaa", "bbbbbb"])          # the second draw collides with the first
    monkeypatch.setattr(loop.secrets, "token_hex", lambda n: next(suffixes))
    one, two = loop.new_run_dir("teto"), loop.new_run_dir("teto")
    assert (one.name, two.name) == ("teto-20250101-120000-aaaaaa", "teto-20250101-120000-bbbbbb")
    assert one.is_dir() and two.is_dir()


def test_run_folders_of_one_second_differ_by_their_random_suffix(monkeypatch):
    from train import loop

    monkeypatch.setattr(time, "strftime", lambda fmt, *rest: "20250101-120000")
    folders = [loop.new_run_dir("teto") for _ in range(20)]
    assert len({f.name for f in folders}) == 20 and all(f.is_dir() for f in folders)
