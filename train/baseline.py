"""An SFT version's own scores, measured once when it is provisioned.

Every preference run compares its candidate with the active version and with the
persona's SFT version: persona consistency (``train.consistency``) and the held-out
persona and refusal losses. A DPO version records its candidate's figures, so the next
run reuses them; an SFT version used to be measured by the first run after it, which
made round one of the loop about a minute longer than the rest. ``persona setup``
measures it instead, with the same functions on the same model a run loads, and adds the
figures to the version's ``meta.json``; a run then reuses them where the judges and the
held-out files are still the same (``known_scores``, ``recorded``), and `persona
adapters list` shows the SFT version's consistency from the start.

    if baseline.missing(persona, version):
        baseline.measure(persona, version, base)
"""

from __future__ import annotations

from train import registry
from train.personas import Persona


def missing(persona: Persona, version: registry.AdapterVersion) -> bool:
    """Whether an SFT version lacks its scores, or has scores from other judges or data."""
    from train.consistency import data_fingerprint, same_judges
    from train.evaluate import split_hash

    metrics = version.meta.get("metrics") or {}
    if version.meta.get("kind") != "sft" or data_fingerprint(persona) is None:
        return False
    return (metrics.get("consistency_candidate") is None or not same_judges(metrics, persona)
            or metrics.get("sft_nll_data") != split_hash(persona, "heldout", ["en"]))


def measure(persona: Persona, version: registry.AdapterVersion, base: str) -> dict:
    """Score ``version`` (the persona's SFT version) as a run would score its candidate and
    record the figures in its meta; returns them."""
    import torch

    from train import base_model
    from train.consistency import consistency_scores, data_fingerprint, judge_versions
    from train.dpo import load_policy, safety_losses
    from train.evaluate import adapters_nll, split_hash
    from train.recipes import DPORecipe, SFTRecipe, load_recipe, sft_languages

    cuda = torch.cuda.is_available()
    tokenizer = base_model.load_tokenizer(base)
    model, _ = load_policy(base, version.path, load_recipe("dpo", DPORecipe), cuda)
    languages = sft_languages(load_recipe(persona.recipe, SFTRecipe), base)
    out = {}
    data = split_hash(persona, "heldout", ["en"])
    nll = adapters_nll(model, tokenizer, persona, "heldout", ["en"])
    if nll:
        out.update(sft_nll_candidate=nll["candidate"], sft_nll_sft=nll["candidate"], sft_nll_data=data,
                   sft_version=version.version)
    out.update(safety_losses(model, tokenizer, persona, languages))
    scores = consistency_scores(model, tokenizer, persona, {"candidate": "default"}, {"sft": "candidate"})
    if scores:
        out.update(consistency_candidate=scores["candidate"], consistency_sft=scores["sft"],
                   consistency_judges=judge_versions(persona), consistency_data=data_fingerprint(persona))
    registry.add_metrics(persona.name, version.version, out)
    return out
