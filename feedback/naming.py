"""The name an engine serves an adapter version under: ``teto`` version 3 is ``teto-v3``.

One rule for the registry (``train``), which names what it stores, and the gateway
(``serve``), which loads and routes by name; it lives in ``feedback`` because both may
import it and neither may import the other. Versions are never reused, so neither is a
name: an engine never serves a stale cache under an old name.
"""

from __future__ import annotations


def engine_name(persona: str, version: int) -> str:
    return f"{persona}-v{version}"
