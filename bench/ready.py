"""What a benchmark needs under ``PERSONA_HOME`` before it starts anything.

Each ``persona bench ...`` checks first, so that an empty or half-set-up home
gives one line that says what to run (``persona setup``) instead of a child
server's failure half a minute later.
"""

from __future__ import annotations

from feedback import settings
from feedback.errors import UserError


def base_model() -> str:
    """The provisioned base model's folder (or the path or hub id PERSONA_BASE_MODEL names)."""
    from train import base_model as models

    name = settings.get("PERSONA_BASE_MODEL")
    try:
        return models.resolve(provision=False)
    except models.ModelError as exc:
        if name in models.BUILTINS:
            raise UserError(f"the base model {name} is not provisioned in {settings.home()}: "
                            "run `persona setup` first") from None
        raise UserError(str(exc)) from None


def adapters() -> list:
    """The active adapters (``load_catalog().active_targets()``); at least one persona must have one."""
    from serve.cli_up import load_catalog

    base_model()
    active = load_catalog().active_targets()
    if not active:
        raise UserError(f"no persona has an adapter in {settings.home()}: run `persona setup` first")
    return active
