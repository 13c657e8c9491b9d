"""The browser UI (Gradio), mounted at ``/`` on the gateway: chat, side by side, dashboard.

Every answer comes through ``serve.gateway.chat.start_turn`` and every vote through
``feedback.votes``, the same code as the OpenAI API; the dashboard reads
``feedback.stats``. Nothing here talks to an engine or writes SQL.

    app = create_gateway_app(gateway)        # mounts this UI (serve/ui/mount.py) unless ui=False
"""

from __future__ import annotations

import asyncio
import random

import gradio as gr

from feedback import stats
from feedback.errors import APIError
from serve.gateway.core import Gateway
from serve.ui import plots
from serve.ui.chat import Session, compare, contenders, prompt_messages, stream_answer, vote

# Thumbs, plus reasons a person may give for a thumbs down (recorded as the vote's reason).
FEEDBACK = ("Like", "Dislike", "Off persona", "Wrong", "Too long", "Unsafe")
COMPARE_HELP = ("Two answers to your message, in random order; which one is hidden until you vote. "
                "Pick the better one and the conversation goes on with it.")


def _session(request: gr.Request) -> Session:
    return Session(request.session_hash or "anonymous", getattr(request, "username", None))


def persona_choices(gateway: Gateway, languages: list[str] = ()) -> list[tuple[str, str]]:
    """(label, name) of every persona with an adapter; the label's description in the first of
    ``languages`` (the browser's, by preference) that the persona has one in."""
    choices = []
    for p in gateway.catalog.personas.values():
        if p.active is None:
            continue
        description = next((p.descriptions[lang] for lang in languages if lang in p.descriptions), p.description)
        choices.append((f"{p.display_name or p.name}" + (f" — {description}" if description else ""), p.name))
    return choices


def picker(gateway: Gateway, request: gr.Request):
    """The persona picker as this browser reads it: the current personas, described in its language."""
    return gr.update(choices=persona_choices(gateway, browser_languages(request)))


def browser_languages(request: gr.Request | None) -> list[str]:
    """The languages the browser asks for (its Accept-Language header, best first), as primary
    tags: "ko-KR,ko;q=0.9,en-US;q=0.8" is ["ko", "en"]."""
    header = request.headers.get("accept-language", "") if request is not None and request.headers else ""
    ranked = []
    for i, part in enumerate(header.split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if tag and tag != "*" and q > 0:
            ranked.append((-q, i, tag.split("-")[0].lower()))
    return list(dict.fromkeys(lang for *_, lang in sorted(ranked)))


async def merge(**streams):
    """Run several async generators at once; yield (name, item) as items arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(name, stream):
        try:
            async for item in stream:
                await queue.put((name, item))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((name, exc))
        finally:
            await queue.put((name, done))

    tasks = [asyncio.create_task(pump(n, s)) for n, s in streams.items()]
    try:
        running = len(tasks)
        while running:
            name, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield name, item
    finally:
        for task in tasks:
            task.cancel()


def build_ui(gateway: Gateway) -> gr.Blocks:
    with gr.Blocks(title="persona-chat", analytics_enabled=False) as demo:
        gr.Markdown("## persona-chat")
        choices = persona_choices(gateway)
        persona = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None, label="Persona",
                              elem_id="persona", interactive=True)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                chat_tab(gateway, persona)
            with gr.Tab("Side by side", id="compare"):
                compare_tab(gateway, persona)
            with gr.Tab("Dashboard", id="dashboard") as dash:
                refresh, outputs = dashboard_tab()
        dashboard = _dashboard(gateway)
        refresh.click(dashboard, None, outputs)
        dash.select(dashboard, None, outputs)

        def load_picker(request: gr.Request):  # on each page load, in the browser's language
            return picker(gateway, request)

        demo.load(load_picker, None, persona)
    return demo


# ---- chat ------------------------------------------------------------------------------------
def chat_tab(gateway: Gateway, persona: gr.Dropdown) -> None:
    chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420, feedback_options=FEEDBACK)
    turn_ids = gr.State([])  # one entry per chatbot message: the turn id of an answer, else None
    with gr.Row():
        message = gr.Textbox(placeholder="Write a message and press Enter", show_label=False, scale=6,
                             elem_id="chat-input", max_lines=6)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
    with gr.Row():
        regenerate = gr.Button("Regenerate", elem_id="chat-regenerate", size="sm")
        clear = gr.Button("Clear", elem_id="chat-clear", size="sm")
    status = gr.Markdown(elem_id="chat-status")

    async def answer(history, ids, name, session):
        """Stream an answer to ``history`` (ending in the user's message) into a new message."""
        history = [*history, {"role": "assistant", "content": ""}]
        ids = [*ids, None]
        try:
            async for text, turn_id, model_id in stream_answer(gateway, name, prompt_messages(history[:-1]),
                                                               session):
                history[-1] = {"role": "assistant", "content": text}
                ids[-1] = turn_id
                yield history, ids, f"answered by `{model_id}`"
        except APIError as exc:
            yield history[:-1], ids[:-1], f"**Error:** {exc.message}"

    async def respond(text, history, ids, name, request: gr.Request):
        if not name:
            yield text, history, ids, "**Pick a persona first.**"
            return
        if not text.strip():
            yield text, history, ids, "**Write a message first.**"
            return
        history = [*history, {"role": "user", "content": text}]
        ids = [*ids, None]
        yield "", history, ids, ""
        async for h, i, note in answer(history, ids, name, _session(request)):
            yield "", h, i, note

    async def again(history, ids, name, request: gr.Request):
        """A new answer to the last message; the old one stays in the store, a sibling of
        the same context (thumbs on both make a preference pair)."""
        if not history or history[-1]["role"] != "assistant":
            yield history, ids, "**Nothing to regenerate yet.**"
            return
        async for h, i, note in answer(history[:-1], ids[:-1], name, _session(request)):
            yield h, i, note

    async def rate(ids, data: gr.LikeData, request: gr.Request):
        index = data.index if isinstance(data.index, int) else data.index[0]
        turn_id = ids[index] if 0 <= index < len(ids) else None
        if turn_id is None:
            return "**That message has no stored answer to rate.**"
        if data.liked is True:
            value, reason = "up", None
        elif data.liked is False:
            value, reason = "down", None
        elif not data.liked:
            value, reason = "retract", None
        else:  # one of the reasons from the menu
            value, reason = "down", str(data.liked)
        try:
            result = await vote(gateway, turn_id, value, _session(request), reason)
        except APIError as exc:
            return f"**Vote refused:** {exc.message}"
        return f"vote `{value}`{f' ({reason})' if reason else ''} {result}"

    inputs = [message, chatbot, turn_ids, persona]
    send.click(respond, inputs, [message, chatbot, turn_ids, status])
    message.submit(respond, inputs, [message, chatbot, turn_ids, status])
    regenerate.click(again, [chatbot, turn_ids, persona], [chatbot, turn_ids, status])
    chatbot.like(rate, turn_ids, status)
    for trigger in (clear.click, persona.change):
        trigger(lambda: ([], [], ""), None, [chatbot, turn_ids, status])


# ---- side by side ----------------------------------------------------------------------------
def compare_tab(gateway: Gateway, persona: gr.Dropdown) -> None:
    gr.Markdown(COMPARE_HELP)
    history = gr.Chatbot(label="Conversation so far", elem_id="sbs-history", height=220)
    pending = gr.State(None)
    with gr.Row():
        left = gr.Textbox(label="A", lines=8, interactive=False, elem_id="answer-a")
        right = gr.Textbox(label="B", lines=8, interactive=False, elem_id="answer-b")
    with gr.Row():
        buttons = {"left": gr.Button("A is better", interactive=False, elem_id="vote-a"),
                   "right": gr.Button("B is better", interactive=False, elem_id="vote-b"),
                   "tie": gr.Button("Tie", interactive=False, elem_id="vote-tie"),
                   "both_bad": gr.Button("Both are bad", interactive=False, elem_id="vote-both-bad")}
    reveal = gr.Markdown(elem_id="sbs-reveal")
    with gr.Row():
        message = gr.Textbox(placeholder="Write a message for two answers", show_label=False, scale=6,
                             elem_id="sbs-input", max_lines=6)
        send = gr.Button("Ask both", variant="primary", scale=1, elem_id="sbs-send")
    disabled = [gr.update(interactive=False)] * len(buttons)

    async def ask(text, convo, name, request: gr.Request):
        if not name or not text.strip():
            yield (text, convo, None, "", "", "**Pick a persona and write a message first.**", *disabled)
            return
        session = _session(request)
        model_a, model_b, what = contenders(gateway, name)
        messages = [*prompt_messages(convo), {"role": "user", "content": text}]
        left_side = random.choice("ab")  # which of the two is shown on the left
        seeds = random.sample(range(1, 2**31), 2)
        got = {"a": ("", None, None), "b": ("", None, None)}
        shown = lambda: (got[left_side][0], got["b" if left_side == "a" else "a"][0])  # noqa: E731
        yield (text, convo, None, "", "", f"asking for two answers ({what}) ...", *disabled)
        try:
            async for side, item in merge(a=stream_answer(gateway, model_a, messages, session, seed=seeds[0]),
                                          b=stream_answer(gateway, model_b, messages, session, seed=seeds[1])):
                got[side] = item
                yield (text, convo, None, *shown(), "", *disabled)
        except APIError as exc:
            yield (text, convo, None, *shown(), f"**Error:** {exc.message}", *disabled)
            return
        state = {"message": text, "left": left_side, "what": what,
                 **{side: {"text": t, "turn": turn, "model": model} for side, (t, turn, model) in got.items()}}
        enabled = [gr.update(interactive=True)] * len(buttons)
        yield ("", convo, state, *shown(), "Which answer is better?", *enabled)

    def decide(shown_choice: str):
        async def handler(convo, state, request: gr.Request):
            if not state:
                return convo, None, "**Ask something first.**", *disabled
            left_side = state["left"]
            right_side = "b" if left_side == "a" else "a"
            choice = {"left": left_side, "right": right_side}.get(shown_choice, shown_choice)
            try:
                await compare(gateway, state["a"]["turn"], state["b"]["turn"], choice, left_side, _session(request))
            except APIError as exc:
                return convo, state, f"**Vote refused:** {exc.message}", *disabled
            names = {left_side: "A", right_side: "B"}
            verdict = {"a": f"{names['a']} is better", "b": f"{names['b']} is better", "tie": "a tie",
                       "both_bad": "both are bad"}[choice]
            text = (f"You chose **{verdict}**. A was `{state[left_side]['model']}`, "
                    f"B was `{state[right_side]['model']}` ({state['what']}).")
            kept = (state[left_side]["text"] if choice == "tie" else
                    state[choice]["text"] if choice in ("a", "b") else None)
            if kept is not None:
                convo = [*convo, {"role": "user", "content": state["message"]}, {"role": "assistant", "content": kept}]
            else:
                text += " Neither answer was kept: ask again."
            return convo, None, text, *disabled
        return handler

    outputs = [message, history, pending, left, right, reveal, *buttons.values()]
    send.click(ask, [message, history, persona], outputs)
    message.submit(ask, [message, history, persona], outputs)
    for shown_choice, button in buttons.items():
        button.click(decide(shown_choice), [history, pending], [history, pending, reveal, *buttons.values()])
    persona.change(lambda: ([], None, "", "", "", *disabled), None,
                   [history, pending, left, right, reveal, *buttons.values()])


# ---- dashboard -------------------------------------------------------------------------------
def dashboard_tab():
    refresh = gr.Button("Refresh", elem_id="dash-refresh", size="sm")
    summary = gr.Markdown(elem_id="dash-summary")
    with gr.Row():
        votes = gr.Plot(show_label=False, elem_id="plot-votes")
        thumbs = gr.Plot(show_label=False, elem_id="plot-thumbs")
    with gr.Row():
        wins = gr.Plot(show_label=False, elem_id="plot-wins")
        bias = gr.Plot(show_label=False, elem_id="plot-bias")
    with gr.Row():
        run_plot = gr.Plot(show_label=False, elem_id="plot-runs")
        adapters = gr.Dataframe(label="Adapters", elem_id="table-adapters", interactive=False)
    runs = gr.Dataframe(label="Training runs", elem_id="table-runs", interactive=False)
    experiments = gr.Dataframe(label="A/B experiments (challenger vs active; the decision rests on side-by-side "
                                     "verdicts, thumbs are shown beside them)",
                               elem_id="table-experiments", interactive=False)
    with gr.Row():
        agreement = gr.Dataframe(label="Agreement between voters (contexts judged by 2+ voters)",
                                 elem_id="table-agreement", interactive=False)
        voters = gr.Markdown(elem_id="dash-voters")
    return refresh, [summary, votes, thumbs, wins, bias, run_plot, adapters, runs, experiments, agreement, voters]


def _dashboard(gateway: Gateway):
    async def render():
        figures = await asyncio.to_thread(stats.summary, gateway.store)
        over_time = await asyncio.to_thread(stats.votes_over_time, gateway.store)
        tested = await asyncio.to_thread(gateway.experiments.recent)
        return dashboard_outputs(gateway, figures, over_time, tested)
    return render


def experiment_table(rows: list[dict]):
    """The dashboard's "A/B experiments" panel: the running and recent ones, with their figures."""
    import pandas as pd

    from feedback.experiments import summary

    return pd.DataFrame([summary(row) for row in rows])


def dashboard_outputs(gateway: Gateway, figures: dict, over_time: list[dict], tested: list[dict] = ()) -> list:
    import pandas as pd

    t = figures["totals"]
    lines = [f"**{t['turns']}** turns · **{t['votes']}** thumbs votes · **{t['comparisons']}** side-by-side votes · "
             f"**{t['voters']}** voters", ""]
    for p in gateway.catalog.personas.values():
        if p.active is not None:
            candidate = f", candidate **v{p.candidate}**" if p.candidate is not None else ", no candidate"
            exp = gateway.experiments.running.get(p.name)
            if exp is not None:
                candidate = f", challenger **v{exp['challenger']}** (A/B experiment `{exp['id']}`)"
            lines.append(f"- {p.display_name or p.name}: active **v{p.active}**{candidate}")
    adapters = adapter_table(figures["adapters"])
    runs = pd.DataFrame([
        {"run": r["id"], "persona": r["persona"], "kind": r["kind"], "status": r["status"],
         "from": f"v{r['parent_version']}" if r["parent_version"] else "",
         "to": f"v{r['adapter_version']}" if r["adapter_version"] else "",
         "examples": r["train_examples"], "reward accuracy": r["reward_accuracy"], "reward margin": r["reward_margin"],
         "reward model acc.": r.get("rm_accuracy"), "consistency": r.get("consistency"),
         "consistency before": r.get("consistency_active"),
         "started": str(r["started_at"])[:19], "note": r["message"] or ""}
        for r in figures["training_runs"]])
    return ["\n".join(lines),
            plots.votes_over_time(over_time),
            plots.rates(figures["thumbs"], "Thumbs-up rate per version (95% interval)", "no thumbs yet"),
            plots.rates(figures["win_rates"], "Side-by-side win rate per version (95% interval)",
                        "no comparison between versions yet"),
            plots.rates(figures["biases"], "Left answer wins / longer answer wins (0.5 = no bias)",
                        "no side-by-side votes yet", label=lambda r: r["bias"]),
            plots.runs(figures["training_runs"]),
            adapters, runs, experiment_table(list(tested)), *voter_outputs(figures)]


def adapter_table(rows: list[dict]):
    """The dashboard's "Adapters" table: each version's figures, with its SFT run's held-out
    loss per language ("held-out NLL ko", and how much below the base model's it is)."""
    import pandas as pd

    def per_language(metrics: dict) -> dict:
        out = {}
        for lang, m in sorted((metrics.get("heldout_by_language") or {}).items()):
            out[f"held-out NLL {lang}"] = m.get("heldout_nll_adapter")
            out[f"held-out NLL {lang} before"] = m.get("heldout_nll_base")
        return out

    return pd.DataFrame([
        {"persona": a["persona"], "version": f"v{a['version']}", "status": a["status"], "kind": a["kind"],
         "parent": f"v{a['parent_version']}" if a["parent_version"] else "",
         **{k: round(v, 4) for k, v in a["metrics"].items() if isinstance(v, float)},
         **per_language(a["metrics"])}
        for a in rows])


def voter_outputs(figures: dict) -> tuple:
    """The agreement table, and the voters per persona with those given no weight and why."""
    import pandas as pd

    def rounded(value):
        return None if value is None else round(value, 3)

    agreement = pd.DataFrame([
        {"persona": r["persona"], "votes": r["kind"].replace("_", " "), "Krippendorff's alpha": rounded(r["alpha"]),
         "Cohen's kappa": rounded(r["kappa"]), "contexts": r["contexts"], "voters": r["voters"]}
        for r in figures["agreement"]])
    lines = ["**Voters**", ""]
    for r in figures["personas"]:
        left_out = (f"; {r['own_prompt_turns']} turns with the caller's own system prompt left out of training"
                    if r["own_prompt_turns"] else "")
        lines.append(f"- {r['persona']}: **{r['voters']}** voters{left_out}")
    lines += ["", "**Voters given no weight**", ""]
    lines += [f"- {r['persona']}: `{r['voter']}` {r['reason']}" for r in figures["outliers"]] or [
        "- none: no voter goes against the others' consensus more than chance would"]
    return agreement, "\n".join(lines)
