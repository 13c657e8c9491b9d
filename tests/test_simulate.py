"""`persona simulate` with several raters, on a fake API (no model): each rater votes with
its own keys, judges the same answers as the others, and --flip turns verdicts round."""

from __future__ import annotations

import random
import threading
from argparse import Namespace

import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from feedback.errors import UserError
from train import simulate


class FakeApi:
    """Answers whose length depends on the seed; records every comparison posted."""

    def __init__(self):
        self.posted = []

    def ask(self, model, prompt, max_tokens, temperature, seed=None, headers=None):
        key = (headers or {}).get("Authorization", "-")
        return {"id": f"{key}/{prompt}/{seed}", "choices": [{"message": {"content": "x" * (seed % 7 + 1)}}]}

    def compare(self, turn_a, turn_b, choice, left, headers):
        self.posted.append((headers["Authorization"], turn_a, turn_b, choice, left))

    def running_experiment(self, persona):
        return None


def shorter(prompt, a, b):
    return "tie" if len(a) == len(b) else ("a" if len(a) < len(b) else "b")


def args(**kw):
    return Namespace(**{"prompts_list": ["p1", "p2", "p3"], "pairs_per_round": 200, "flip": 0.0, "persona": "teto",
                        "max_tokens": 8, "temperature": 1.0, "workers": 4, **kw})


def test_keys_are_dealt_to_the_raters(monkeypatch):
    monkeypatch.setenv("PERSONA_API_KEY", "k1,k2,k3,k4,k5")
    keys = simulate.rater_keys(2)
    assert [[h["Authorization"] for h in r] for r in keys] == [["Bearer k1", "Bearer k3", "Bearer k5"],
                                                               ["Bearer k2", "Bearer k4"]]
    monkeypatch.setenv("PERSONA_API_KEY", "k1")
    with pytest.raises(UserError, match="2 raters vote as 2 voters at least"):
        simulate.rater_keys(2)
    monkeypatch.delenv("PERSONA_API_KEY")
    assert simulate.rater_keys(1) == [[{}]]          # one rater, a gateway without keys


def test_every_rater_judges_the_same_pairs_with_its_own_keys_and_flip_adds_noise(monkeypatch):
    monkeypatch.setenv("PERSONA_API_KEY", "k1,k2,k3")
    raters = [simulate.Rater("shorter", shorter, keys) for keys in simulate.rater_keys(2)]
    api = FakeApi()
    counts, experiment = simulate.rate_round(api, raters, args(), random.Random(0), 1)
    assert experiment is None
    assert sum(counts.values()) == 400
    by_key = {}
    for key, turn_a, turn_b, choice, left in api.posted:
        assert turn_a.startswith(key) and turn_b.startswith(key)      # a key rates only the turns it asked
        by_key.setdefault(key, []).append((turn_a.split("/", 1)[1], turn_b.split("/", 1)[1], choice))
    assert set(by_key) == {"Bearer k1", "Bearer k2", "Bearer k3"}
    assert len(by_key["Bearer k2"]) == 200 and len(by_key["Bearer k1"]) == len(by_key["Bearer k3"]) == 100
    # Identical tastes, the same seeds: both raters posted the same verdicts on the same answers.
    assert sorted(by_key["Bearer k1"] + by_key["Bearer k3"]) == sorted(by_key["Bearer k2"])
    api = FakeApi()
    simulate.rate_round(api, raters, args(flip=0.3), random.Random(0), 1)
    decided = [(choice, honest(a, b, left)) for _, a, b, choice, left in api.posted if honest(a, b, left) != "tie"]
    assert 0.2 < sum(c != h for c, h in decided) / len(decided) < 0.4    # about 30% turned round


def honest(turn_a: str, turn_b: str, left: str) -> str:
    """The choice the rater posts without noise (answer lengths follow from the seeds)."""
    one, two = ("x" * (int(t.rsplit("/", 1)[1]) % 7 + 1) for t in (turn_a, turn_b))
    verdict = shorter("", *((one, two) if left == "a" else (two, one)))
    return verdict if verdict == "tie" or left == "a" else simulate.flip(verdict)


# --- against a fake gateway on loopback: the scheduler's runs (409) and A/B experiments ---------------------------

ADMIN = {"Authorization": "Bearer adm"}


class FakeGateway:
    """The routes ``persona simulate`` uses, with a scripted run and experiment. Version 1 is
    active; version v answers with 12 - 4v words (so the challenger v2 is the shorter). A run
    finishes after ``polls`` looks at /admin/runs; ``going`` makes one already going (the
    scheduler's: /admin/retrain answers 409 until it ends), recorded or not yet; a run ending
    as "challenger" starts an experiment, decided after ``decide_after`` comparisons (never
    when None)."""

    def __init__(self, going: str | None = None, status: str = "promoted", polls: int = 2,
                 decide_after: int | None = None, busy_every: int = 0, in_share: bool = False,
                 decide_at_stop: bool = False, retire: bool = False):
        from feedback import runs

        self.retire = retire  # the experiment ends with the challenger retired (no longer served)

        self.decide_at_stop = decide_at_stop

        self.in_share = in_share  # this client is in the challenger's share of API traffic

        self.busy_every, self.busy = busy_every, 0  # every busy_every-th chat: 503 with Retry-After

        self.now, self.status, self.polls, self.decide_after = runs.now, status, polls, decide_after
        self.active, self.lock = 1, threading.Lock()
        self.turns, self.chats, self.comparisons, self.retrains, self.stops = {}, [], [], [], []
        self.experiments, self.looks = [], {}
        self.runs = [{"id": "old-0", "persona": "teto", "status": "promoted", "started_at": "2020-01-01 00:00:00"}]
        going_run = {"id": "sched-1", "persona": "teto", "status": "running", "started_at": runs.now()}
        self.unrecorded = going_run if going == "unrecorded" else None
        if going == "recorded":
            self.runs.insert(0, going_run)

    def app(self):
        app = FastAPI()

        def admin(request: Request):
            if request.headers.get("authorization") != ADMIN["Authorization"]:
                raise HTTPException(403)

        @app.post("/v1/chat/completions")
        def chat(body: dict, request: Request):
            model, seed = body["model"], body.get("seed") or 0
            version = int(model.split("@v")[1]) if "@v" in model else self.active
            if "@v" in model and any(e["status"] == "retired" and e["challenger"] == version for e in self.experiments):
                return JSONResponse({"error": {"message": f"The model `{model}` is not served: teto v{version} was "
                                                          "retired: lost A/B experiment exp-1",
                                               "code": "model_not_found"}}, 404)
            running = next((e for e in self.experiments if e["status"] == "running"), None)
            if "@v" not in model and self.in_share and running:
                version = running["challenger"]
            with self.lock:
                if self.busy_every and (len(self.chats) + self.busy + 1) % self.busy_every == 0:
                    self.busy += 1
                    return JSONResponse({"error": {"message": "The engine failed: ReadError"}}, 503,
                                        headers={"Retry-After": "0"})
                turn = f"turn-{len(self.turns)}"
                self.turns[turn] = (version, request.headers.get("authorization"))
                self.chats.append((model, seed, body["temperature"]))
            words = " ".join(["word"] * (12 - 4 * version + seed % 2))
            return {"id": turn, "model": f"teto@v{version}", "choices": [{"message": {"content": words}}]}

        @app.post("/v1/comparisons")
        def compare(body: dict, request: Request):
            with self.lock:
                self.comparisons.append((request.headers.get("authorization"), body))
                self._count(body)
            return {"ok": True}

        @app.post("/admin/retrain")
        def retrain(body: dict, request: Request):
            admin(request)
            with self.lock:
                self.retrains.append(body)
                if self.unrecorded or self.runs[0]["status"] == "running":
                    return JSONResponse({"error": {"message": "A retrain of teto is already running."}}, 409)
                self.runs.insert(0, {"id": f"run-{len(self.retrains)}", "persona": "teto", "status": "running",
                                     "started_at": self.now()})
            return {"persona": "teto", "status": "started", "log": "-"}

        @app.get("/admin/runs")
        def list_runs(persona: str, limit: int, request: Request):
            admin(request)
            with self.lock:
                self._advance()
                return {"runs": self.runs[:limit]}

        @app.get("/admin/experiments")
        def experiments(persona: str, request: Request):
            admin(request)
            return {"experiments": self.experiments}

        @app.post("/admin/experiments/{experiment_id}/stop")
        def stop(experiment_id: str, request: Request):
            admin(request)
            if self.decide_at_stop:  # the last votes decided it just before the stop arrived
                self.experiments[0]["status"], self.active = "promoted", 2
                return JSONResponse({"error": {"message": f"Experiment {experiment_id} is promoted already"}}, 409)
            self.stops.append(experiment_id)
            self.experiments[0]["status"] = "stopped"
            return {"id": experiment_id, "status": "stopped"}

        return app

    def _advance(self) -> None:
        """A look at the runs: a run not recorded yet records itself; a going one ends at last."""
        if self.unrecorded:  # the scheduler's run records itself at the third look
            self.looks["unrecorded"] = self.looks.get("unrecorded", 0) + 1
            if self.looks["unrecorded"] >= 3:
                self.runs.insert(0, self.unrecorded)
                self.unrecorded = None
            return
        run = self.runs[0]
        self.looks[run["id"]] = looks = self.looks.get(run["id"], 0) + 1
        if run["status"] != "running" or looks < self.polls:
            return
        status = "rejected" if any(e["status"] == "retired" for e in self.experiments) else self.status
        run.update(status=status, adapter_version=2, reward_accuracy=0.75,
                   metrics={"reward_model": {"heldout_accuracy": 0.625}})
        if status == "challenger":
            self.experiments.insert(0, {"id": "exp-1", "persona": "teto", "challenger": 2, "active": 1,
                                        "status": "running", "figures": {"votes": 0, "wins": 0}})
        elif status == "promoted":
            self.active = 2

    def _count(self, body: dict) -> None:
        """A comparison between the active's and the challenger's turns counts in the experiment."""
        experiment = self.experiments[0] if self.experiments else None
        versions = {self.turns[body["turn_a"]][0]: "a", self.turns[body["turn_b"]][0]: "b"}
        if not experiment or experiment["status"] != "running" or set(versions) != {1, 2}:
            return
        figures = experiment["figures"]
        figures["votes"] += 1
        figures["wins"] += 1 if body["choice"] == versions[2] else 0.5 if body["choice"] == "tie" else 0
        figures.update(win_rate=figures["wins"] / figures["votes"], low=0.4, high=0.9)
        if self.decide_after is not None and figures["votes"] >= self.decide_after:
            if self.retire:
                experiment["status"] = "retired"
            else:
                experiment["status"], self.active = "promoted", 2


@pytest.fixture
def gateway(monkeypatch):
    """Start a FakeGateway (its arguments) on loopback; yields (fake, url)."""
    from feedback import runs
    from serve.processes import serve_in_thread

    monkeypatch.setenv("PERSONA_ADMIN_KEY", "adm")
    monkeypatch.setattr(simulate, "RUN_POLL_SECONDS", 0.05)
    if "challenger" not in runs.FINISHED:  # the A/B engineer adds it to FINISHED; until then, here
        monkeypatch.setattr(runs, "FINISHED", (*runs.FINISHED, "challenger"))
    servers = []

    def start(**kw):
        fake = FakeGateway(**kw)
        url, server = serve_in_thread(fake.app())
        servers.append(server)
        return fake, url

    yield start
    for server in servers:
        server.should_exit = True


def simulate_main(url: str, tmp_path, *flags: str, rounds: int = 1) -> list[dict]:
    """``persona simulate`` (one round, a few pairs) against ``url``; returns its --out rows."""
    import argparse
    import json

    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    (tmp_path / "prompts.txt").write_text("p1\np2\np3\n")
    out = tmp_path / "sim.json"
    parsed = parser.parse_args(["--persona", "teto", "--rounds", str(rounds), "--pairs-per-round", "4", "--heldout", "2",
                                "--workers", "2", "--gateway", url, "--prompts", str(tmp_path / "prompts.txt"),
                                "--out", str(out), *flags])
    parsed.func(parsed)
    return json.loads(out.read_text())


def said(capsys) -> str:
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("going", ["recorded", "unrecorded"])
def test_a_round_waits_for_the_run_already_going_and_reports_it(gateway, tmp_path, capsys, going):
    fake, url = gateway(going=going, status="rejected")
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter")
    assert len(fake.retrains) == 1 and "promotion" not in fake.retrains[0]   # asked once; no second run after it
    assert fake.retrains[0] == {"persona": "teto", "force": True}
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["run"] == "sched-1" and rows[1]["status"] == "rejected" and rows[1]["ab"] is None
    assert rows[1]["rm_accuracy"] == 0.625 and rows[1]["reward_accuracy"] == 0.75
    out = said(capsys)
    assert "the round's run was the scheduler's: sched-1" in out
    assert f"the table is in {tmp_path / 'sim.json'}" in out


def test_the_promotion_field_is_sent_only_when_asked(gateway, tmp_path):
    fake, url = gateway()
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter", "--promotion", "gate")
    assert fake.retrains == [{"persona": "teto", "force": True, "promotion": "gate"}]
    assert rows[1]["run"] == "run-1" and rows[1]["status"] == "promoted" and rows[1]["served"] == 2


def test_promotion_ab_plays_the_pinned_versions_until_the_experiment_is_decided(gateway, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setenv("PERSONA_API_KEY", "k1,k2")
    fake, url = gateway(status="challenger", decide_after=20)
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter", "--rater", "train.raters:direct",
                         "--promotion", "ab", "--temperature", "0.7")
    assert fake.retrains == [{"persona": "teto", "force": True, "promotion": "ab"}]
    ab = [(key, body) for key, body in fake.comparisons
          if {fake.turns[body["turn_a"]][0], fake.turns[body["turn_b"]][0]} == {1, 2}]
    assert 20 <= len(ab) <= 32 and len(fake.stops) == 0        # batches of 16, until decided
    for key, body in ab:
        assert fake.turns[body["turn_a"]] == (1, key) and fake.turns[body["turn_b"]] == (2, key)  # active, challenger
    assert {key for key, _ in ab} == {"Bearer k1", "Bearer k2"}                  # each rater under its own key
    assert {body["left"] for _, body in ab} == {"a", "b"}                       # shown in random order
    shorter_votes = [body["choice"] for key, body in ab if key == "Bearer k1"]
    assert set(shorter_votes) == {"b"}                           # shorter prefers the challenger's, wherever shown
    pinned = [(m, seed, t) for m, seed, t in fake.chats if "@v" in m and t == 0.7]
    assert {m for m, _, _ in pinned} == {"teto@v1", "teto@v2"}
    assert sorted(s for m, s, _ in pinned if m == "teto@v1") == sorted(s for m, s, _ in pinned if m == "teto@v2")
    row = rows[1]
    assert row["status"] == "challenger" and row["served"] == 2
    assert row["ab"]["status"] == "promoted" and row["ab"]["played"] == len(ab)
    cell = simulate.ab_cell(row["ab"])
    assert cell.startswith(f"promoted {row['ab']['figures']['wins']:g}/{row['ab']['figures']['votes']} (0.40-0.90)")
    assert "promoted after" in said(capsys)


def test_pairs_of_a_challenger_retired_mid_round_are_dropped_not_fatal(gateway, tmp_path, capsys):
    """The round's votes retire the challenger while the rest of its batch is still being
    asked: those pinned chats hear 404 (the version is no longer served); the simulator
    drops them and goes on with the active version."""
    fake, url = gateway(status="challenger", decide_after=4, retire=True)
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter", "--pairs-per-round", "16", rounds=2)
    assert rows[2]["ab"]["status"] == "retired" and rows[2]["served"] == 1
    gone = [m for m, _, _ in fake.chats if m == "teto@v2"]
    ab = [b for _, b in fake.comparisons if fake.turns[b["turn_b"]][0] == 2]
    assert len(ab) < 16 and len(ab) >= 4        # the batch was cut short by the retirement
    assert len(gone) >= len(ab)


def test_promotion_ab_stops_an_undecided_experiment_at_ab_max_votes(gateway, tmp_path, capsys):
    fake, url = gateway(status="challenger", decide_after=None)
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter", "--promotion", "ab",
                         "--ab-max-votes", "40")
    ab = [body for _, body in fake.comparisons if fake.turns[body["turn_b"]][0] == 2]
    assert len(ab) == 40 and fake.stops == ["exp-1"]
    assert rows[1]["ab"]["status"] == "stopped" and rows[1]["served"] == 1
    assert simulate.ab_cell(rows[1]["ab"]).startswith("stopped 40/40")
    assert "still undecided at --ab-max-votes 40, after 40 comparisons" in said(capsys)
    assert simulate.ab_cell(None) == "-"


@pytest.mark.parametrize("futility,played", [(None, 16), ("0", 128)])
def test_an_ab_that_cannot_promote_within_the_budget_stops_early(gateway, tmp_path, capsys, futility, played):
    """The challenger loses every verdict: after the first batch its chance of a promotion
    within --ab-max-votes is nil, so the play stops there (unless --ab-futility 0)."""
    fake, url = gateway(status="challenger", decide_after=None)
    flags = ("--ab-futility", futility) if futility else ()
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:longer", "--promotion", "ab", *flags)
    ab = [body for _, body in fake.comparisons if fake.turns[body["turn_b"]][0] == 2]
    assert len(ab) == played and fake.stops == ["exp-1"]
    assert rows[1]["ab"]["status"] == "stopped" and rows[1]["served"] == 1
    text = said(capsys)
    assert ("0 wins of 16 decisive, 0.0% chance of a promotion within the 112 still to play" in text) == (not futility)


def test_the_next_round_pits_the_challenger_against_the_active_version_and_decides_it(gateway, tmp_path):
    """As in the side-by-side view: while an experiment runs, a round's comparisons are the active
    version against the challenger, so the round's votes decide it; no extra A/B phase but the last."""
    fake, url = gateway(status="challenger", decide_after=8)
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter", "--pairs-per-round", "40", rounds=2)
    first_run = len(fake.chats)
    pairs = [{fake.turns[b["turn_a"]][0], fake.turns[b["turn_b"]][0]} for _, b in fake.comparisons]
    assert pairs[:40] == [{1}] * 40                          # round 1: two answers of v1
    assert pairs[40:56] == [{1, 2}] * 16       # round 2: v1 against the challenger, one batch (decided at 8)
    assert pairs[56:80] == [{2}] * 24          # then, v2 promoted, two answers of the new active version
    assert rows[1]["status"] == "challenger" and rows[2]["ab"]["status"] == "promoted" and first_run


def test_a_round_that_decides_one_experiment_and_plays_the_next_shows_both():
    """The last round's votes decide the experiment running (v3 promoted) and then play its own
    run's challenger (v4) to its end: its row names both, each with its challenger."""
    decided = {"id": "e3", "status": "promoted", "challenger": 3, "figures": {"wins": 50, "votes": 73,
                                                                             "low": 0.5, "high": 0.83}}
    played = {"id": "e4", "status": "stopped", "challenger": "teto-v4", "figures": {"wins": 40, "votes": 74,
                                                                                    "low": 0.38, "high": 0.69}}
    assert simulate.ab_cells({"experiments": [decided, played]}) == \
        "v3 promoted 50/73 (0.50-0.83); v4 stopped 40/74 (0.38-0.69)"
    assert simulate.ab_cells({"experiments": [decided]}) == "promoted 50/73 (0.50-0.83)"
    assert simulate.ab_cells({"ab": None}) == "-"


def test_a_chat_answered_503_with_retry_after_is_asked_again(gateway, tmp_path):
    """An engine connection lost mid-simulation (503 with Retry-After) costs a wait, not the run."""
    fake, url = gateway(busy_every=5)
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter")
    assert fake.busy >= 2, "the fake refused some chats"
    assert rows[-1]["comparisons"] == 4 and len(fake.comparisons) == 4


def test_the_out_file_carries_the_measured_answers_and_they_score_as_the_table_says(gateway, tmp_path):
    """Round 0 holds the held-out prompts and the original's greedy answers, each round the
    served version's: the rater's rate can be computed again from the file alone."""
    from train import raters

    fake, url = gateway(status="promoted")
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter")
    prompts, old = rows[0]["heldout_prompts"], rows[0]["heldout_answers"]
    assert len(prompts) == len(old) == 2 and rows[-1]["served"] == 2
    new = rows[-1]["heldout_answers"]
    assert len(new) == 2 and new != old
    again = 0.0
    for i, (prompt, mine, theirs) in enumerate(zip(prompts, new, old)):
        verdict = raters.shorter(prompt, mine, theirs) if i % 2 == 0 else raters.shorter(prompt, theirs, mine)
        again += 0.5 if verdict == "tie" else float((verdict == "a") == (i % 2 == 0))
    assert rows[-1]["preferred"][0]["rate"] == again / 2 == 1.0  # v2's answers are shorter on every prompt


def test_the_served_version_is_the_active_one_even_for_a_client_in_the_challengers_share(gateway, tmp_path):
    """The round's run left a challenger whose A/B share serves this client: the table's
    "served" is still the active version, measured as such."""
    fake, url = gateway(status="challenger", in_share=True)
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter", "--ab-max-votes", "4", rounds=2)
    assert rows[1]["status"] == "challenger", "round 1 was measured while its experiment ran"
    assert [r["served"] for r in rows] == [1, 1, 1]
    assert rows[1]["preferred"][0]["rate"] == 0.5  # v1 against itself


def test_an_experiment_decided_just_before_the_stop_counts_as_decided(gateway, tmp_path, capsys):
    """At --ab-max-votes the simulator stops the experiment, but the last votes had just
    promoted the challenger (409 "promoted already"): the round reports the promotion."""
    fake, url = gateway(status="challenger", decide_at_stop=True)
    rows = simulate_main(url, tmp_path, "--rater", "train.raters:shorter", "--ab-max-votes", "4")
    assert rows[-1]["experiments"][-1]["status"] == "promoted" and rows[-1]["served"] == 2
    assert "still undecided" not in said(capsys)


@pytest.mark.parametrize("flag,value", [("--ab-futility", "1"), ("--ab-futility", "-0.1"), ("--ab-max-votes", "0")])
def test_bad_ab_budget_is_named(tmp_path, flag, value):
    with pytest.raises(UserError, match=f"{flag} {value}"):
        simulate_main("http://127.0.0.1:9", tmp_path, "--rater", "train.raters:shorter", flag, value)


def test_decisive_comparisons_left_follow_the_share_of_ties():
    assert simulate.decisive_left(128, 0, 0) == 128              # a priori half the comparisons decide
    assert simulate.decisive_left(128, 160, 10) == 23            # a taste that ties 15 times in 16
    assert simulate.decisive_left(128, 100, 90) == 38            # the decisive cap binds
    assert simulate.decisive_left(128, 512, 100) == 0            # the comparison cap is spent


def test_a_tie_heavy_ab_that_cannot_reach_min_votes_is_futile():
    experiment = {"status": "running", "alpha": 0.05, "min_votes": 40, "figures": {"votes": 10, "wins": 9}}
    assert "chance of a promotion within the 23 still to play" in simulate.futile(experiment, 23, 0.03)
    assert simulate.futile(experiment, 60, 0.03) is None         # 9 of 10 with room to reach 40: play on
    assert simulate.futile(experiment, 23, 0.0) is None          # --ab-futility 0: never stops early


def test_a_connection_closed_unanswered_is_sent_again():
    """A real loopback server that closes the first connection without answering (as a
    kept-alive connection is closed when the server's idle timer fires just as a request
    goes out): the simulator's client sends the request again and goes on."""
    import json
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    seen = []

    def serve():
        for count in range(3):
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                while len(body) < length:
                    body += conn.recv(65536)
                seen.append(json.loads(body))
                if count == 0:
                    continue  # closed with no answer
                reply = json.dumps({"id": "turn-1", "model": "teto@v1",
                                    "choices": [{"message": {"content": "hi"}}]}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             + f"Content-Length: {len(reply)}\r\n\r\n".encode() + reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    api = simulate.Api(f"http://127.0.0.1:{listener.getsockname()[1]}")
    reply = api.ask("teto", "hello", 8, 0.8, seed=3)
    assert reply["choices"][0]["message"]["content"] == "hi"
    assert len(seen) == 2 and seen[0] == seen[1] and seen[0]["seed"] == 3  # the same request, twice
    listener.close()
