"""Dashboard figures (matplotlib, drawn off-screen): one function per plot, each taking
the rows of ``feedback.stats``. Figures are built with the object API, never pyplot,
so requests on different threads do not share state."""

from __future__ import annotations

from matplotlib.figure import Figure

UP, DOWN, CMP, NEUTRAL = "#2e7d32", "#c62828", "#1565c0", "#9e9e9e"


def _figure(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 3.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    return fig, ax


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", color=NEUTRAL, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def votes_over_time(rows: list[dict]) -> Figure:
    fig, ax = _figure("Votes per day")
    if not rows:
        _empty(ax, "no votes yet")
        return fig
    days = sorted({r["day"] for r in rows})
    totals = {d: {"up": 0, "down": 0, "comparisons": 0} for d in days}
    for r in rows:
        for key in totals[r["day"]]:
            totals[r["day"]][key] += r[key]
    labels = [d.strftime("%m-%d") for d in days]
    up = [totals[d]["up"] for d in days]
    down = [totals[d]["down"] for d in days]
    cmp = [totals[d]["comparisons"] for d in days]
    ax.bar(labels, up, color=UP, label="thumbs up")
    ax.bar(labels, down, bottom=up, color=DOWN, label="thumbs down")
    ax.bar(labels, cmp, bottom=[u + d for u, d in zip(up, down)], color=CMP, label="side by side")
    ax.set_ylabel("votes")
    ax.legend(fontsize=8)
    return fig


def rates(rows: list[dict], title: str, empty: str, label=lambda r: f"{r['persona']} v{r['version']}") -> Figure:
    """A rate per row with its 95% interval as an error bar, and the 50% line."""
    fig, ax = _figure(title)
    rows = [r for r in rows if r.get("rate") is not None]
    if not rows:
        _empty(ax, empty)
        return fig
    names = [f"{label(r)}\nn={r.get('votes', r.get('games', r.get('n')))}" for r in rows]
    values = [r["rate"] for r in rows]
    errors = [[r["rate"] - r["low"] for r in rows], [r["high"] - r["rate"] for r in rows]]
    ax.bar(names, values, yerr=errors, capsize=6, color=CMP, alpha=0.8)
    ax.axhline(0.5, color=NEUTRAL, linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate (95% interval)")
    return fig


def runs(rows: list[dict]) -> Figure:
    """Held-out implicit reward accuracy (bars) and margin (dots) of each preference run."""
    fig, ax = _figure("Training runs: held-out reward accuracy and margin")
    rows = [r for r in reversed(rows) if r.get("reward_accuracy") is not None]
    if not rows:
        _empty(ax, "no preference training run yet")
        return fig
    names = [f"{r['persona']} v{r['adapter_version'] or '?'}\n{r['kind']} ({r['status']})" for r in rows]
    ax.bar(names, [r["reward_accuracy"] for r in rows], color=UP, alpha=0.8, label="reward accuracy")
    ax.axhline(0.5, color=NEUTRAL, linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    margin = ax.twinx()
    margin.plot(names, [r["reward_margin"] or 0.0 for r in rows], "o", color=CMP, label="reward margin")
    margin.set_ylabel("margin")
    fig.legend(fontsize=8, loc="lower right")
    return fig
