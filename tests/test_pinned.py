"""Pinned versions (``teto@v3``): one the registry refuses (rejected by the gate, retired)
is a 404 that says why and is not listed; pinned versions loaded on demand are unloaded
from the engines past a cap, least recently used first, never an active or candidate
version nor one with turns in flight.

Runs against the contract stack (a real gateway on loopback in front of the embedded
engine on the tiny model) with a cap of one pinned version, and ``load_catalog``
against a registry in a temporary ``PERSONA_HOME``.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict

import httpx
import openai
import pytest

from contract_stack import ADMIN_KEY, API_KEY, EGEN_PROMPT, TETO_PROMPT, stack
from serve.gateway.catalog import Catalog, PersonaInfo, UnknownModel

REJECTED = "rejected: lost to the active version on held-out pairs (accuracy 0.41)"


@pytest.fixture(scope="module")
def s(tiny_model_dir, tmp_path_factory):
    with stack("embedded", tiny_model_dir, tmp_path_factory.mktemp("pinned"), max_pinned=1) as running:
        yield running


def teto_catalog(s, **teto) -> Catalog:
    """teto v1 active; v2 and v3 servable; v4 rejected by the gate, v5 retired."""
    a = s.adapters
    versions = {1: a["teto1"], 2: a["teto2"], 3: a["spare"], 4: a["egen1"], 5: a["egen1"]}
    teto = {"unservable": {4: REJECTED, 5: "retired"}, **teto}
    return Catalog({
        "teto": PersonaInfo("teto", TETO_PROMPT, active=1, versions=versions, **teto),
        "egen": PersonaInfo("egen", EGEN_PROMPT, active=1, versions={1: a["egen1"]}),
    })


def use(s, catalog: Catalog) -> None:
    s.state["catalog"] = catalog
    httpx.post(s.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
               timeout=120).raise_for_status()


def ask(s, model: str):
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "go"}], max_tokens=3)


def engine_models(s) -> set[str]:
    r = httpx.get(s.engine_url + "/v1/models", headers={"Authorization": f"Bearer {s.engine_key}"})
    return {m["id"] for m in r.json()["data"]}


def gateway_adapters(s) -> set[str]:
    r = httpx.get(s.url + "/admin/engines", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    return set(r.json()["engines"][0]["adapters"])


def test_a_refused_version_is_404_saying_why_and_not_listed(s):
    use(s, teto_catalog(s))
    for model, says in (("teto@v4", f"teto v4 was {REJECTED}"), ("teto@v5", "teto v5 was retired")):
        with pytest.raises(openai.NotFoundError) as err:
            ask(s, model)
        error = err.value.response.json()["error"]
        assert says in error["message"] and error["param"] == "model", error
    listed = {m.id for m in openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY).models.list().data}
    assert {"teto", "teto@v1", "teto@v2", "teto@v3"} <= listed and not {"teto@v4", "teto@v5"} & listed
    assert not {"teto-v4", "teto-v5"} & engine_models(s)
    status = dict(s.store.query("SELECT version, status FROM adapters WHERE persona = 'teto'"))
    assert status[4] == status[5] == "retired" and status[2] == "available"


def test_past_the_cap_the_least_recently_pinned_version_is_unloaded(s):
    use(s, teto_catalog(s))
    assert ask(s, "teto@v2").model == "teto@v2"
    assert "teto-v2" in engine_models(s)
    assert ask(s, "teto@v3").model == "teto@v3"
    on_engine = engine_models(s)
    assert "teto-v3" in on_engine and "teto-v2" not in on_engine, on_engine
    assert {"teto-v1", "egen-v1"} <= on_engine, "active versions stay"
    assert gateway_adapters(s) == {"teto-v1", "teto-v3", "egen-v1"}
    assert ask(s, "teto@v2").model == "teto@v2", "an unloaded pinned version loads again"
    assert "teto-v3" not in engine_models(s)


def test_a_candidate_is_never_unloaded_and_is_once_refused(s):
    use(s, teto_catalog(s, candidate=2))
    ask(s, "teto@v2")
    ask(s, "teto@v3")
    assert {"teto-v2", "teto-v3"} <= engine_models(s), "the candidate does not count against the cap"
    use(s, teto_catalog(s, unservable={2: "rejected: worse", 4: REJECTED, 5: "retired"}))
    assert "teto-v2" not in engine_models(s), "a reload unloads a version refused since"
    with pytest.raises(openai.NotFoundError, match="teto v2 was rejected: worse"):
        ask(s, "teto@v2")


def test_a_pinned_version_with_turns_in_flight_stays():
    from serve.gateway.core import Gateway, GatewayConfig

    unloaded = []

    class Pool:
        replicas = []

        async def unload(self, name):
            unloaded.append(name)

    cat = Catalog({"teto": PersonaInfo("teto", "sys", active=1, candidate=2,
                                       versions={v: f"/a/v{v}" for v in range(1, 6)})})
    gateway = Gateway(lambda: cat, Pool(), store=None, config=GatewayConfig(max_pinned=1))
    gateway.pinned = OrderedDict.fromkeys(["teto-v2", "teto-v3", "teto-v4", "teto-v5"])
    gateway.turns["teto-v3"] = 1
    asyncio.run(gateway.unload_pinned())
    assert unloaded == ["teto-v4"], "v2 is the candidate, v3 busy, v5 the one kept"
    assert list(gateway.pinned) == ["teto-v2", "teto-v3", "teto-v5"]


def test_load_catalog_takes_refused_versions_from_the_registry():
    from serve.cli_up import load_catalog
    from train import registry

    for version in (1, 2, 3, 4):
        folder = registry.root() / "teto" / f"v{version}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"kind": "sft"}), encoding="utf-8")
    registry.set_active("teto", 1)
    registry.mark_rejected("teto", 2, "lost on held-out pairs")
    registry.retire("teto", 3, "superseded")
    catalog = load_catalog()
    assert catalog.personas["teto"].unservable == {2: "rejected: lost on held-out pairs",
                                                   3: "retired: superseded"}
    assert [m for m, _ in catalog.model_ids() if m.startswith("teto")] == ["teto", "teto@v1", "teto@v4"]
    with pytest.raises(UnknownModel, match="teto v2 was rejected: lost on held-out pairs"):
        catalog.resolve("teto@v2")
    assert catalog.resolve("teto").version == 1
