"""The dashboard's voter figures (agreement table, voters given no weight) from a store
with a known contrarian; the browser test (tests/test_ui.py) checks the tab renders."""

from __future__ import annotations

from feedback import stats
from feedback.store import Store
from test_pairs import contrarian_panel, serve


def test_dashboard_lists_agreement_and_the_voters_given_no_weight(tmp_path):
    from serve.ui.app import voter_outputs

    store = Store.open(tmp_path / "f.duckdb")
    contrarian_panel(store)
    serve(store, "own", "mine", question="own", client="h1", own=True)
    agreement, text = voter_outputs(stats.summary(store))
    store.close()
    assert agreement.to_dict("records") == [{"persona": "teto", "votes": "side by side",
                                             "Krippendorff's alpha": agreement["Krippendorff's alpha"][0],
                                             "Cohen's kappa": None, "contexts": 30, "voters": 4}]
    assert "teto: **4** voters; 1 turns with the caller's own system prompt left out" in text
    assert "`contra` disagreed with the other voters' consensus on 30 of 30 shared contexts" in text
