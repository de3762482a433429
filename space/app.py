"""The Gradio page: components and event wiring only (the work is in `space.handlers`).

Run locally on the shipped reference model:  python -m space.app   (or: python space/app.py)
Environment: SPACE_DEFAULT_MODEL (model pruned when the box is empty), HF_ENDPOINT / HF_TOKEN (Hub and stored
token for local runs), GRADIO_SERVER_PORT / GRADIO_SERVER_NAME, SPACE_* settings (see space/settings.py).
"""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python space/app.py`: make `space` and `core` importable
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import atexit  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402

import gradio as gr  # noqa: E402

from space import forms, handlers, hub  # noqa: E402
from space.errors import friendly  # noqa: E402
from space.jobs import JobSlot, ResultStore, stream  # noqa: E402
from space.settings import Settings  # noqa: E402

logger = logging.getLogger("space.app")

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
                "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "monospace"]
CSS = """
.gradio-container {max-width: 1280px !important; margin: auto}
#status {min-height: 1.5em}
#status p {font-size: 15px}
#summary table {width: 100%}
.small-note p {font-size: 13px; opacity: .8}
"""
LOG_LINES = 200
SCROLL_TO_STATUS = "() => document.querySelector('#status')?.scrollIntoView({behavior: 'smooth', block: 'center'})"
SCROLL_LOG = "() => { const e = document.querySelector('#log textarea'); if (e) e.scrollTop = e.scrollHeight; }"


def theme() -> gr.themes.Base:
    # system fonts only: the default theme would fetch web fonts from a CDN, and the app must work offline
    return gr.themes.Soft(primary_hue="indigo", font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def _oauth(oauth_token) -> str | None:
    return oauth_token.token if oauth_token is not None else None


def build_app(settings: Settings | None = None, store: ResultStore | None = None) -> gr.Blocks:
    settings = settings or Settings.from_env()
    if store is None:
        store = ResultStore(settings.keep_results, settings.work_dir)
        atexit.register(store.close)
    slot = JobSlot()
    local_user = functools.lru_cache(maxsize=1)(lambda: hub.username(None, settings))
    first = forms.method_names()[0] if "mlp_width" not in forms.method_names() else "mlp_width"
    first_form = handlers.method_form(first)

    with gr.Blocks(title="Structured pruning", delete_cache=(900, 3600)) as demo:
        job_state = gr.State(None)
        gr.Markdown("# ✂️ Structured pruning\nMake a causal language model smaller by removing whole neurons, "
                    "attention heads or layers, measure what it costs, and publish the result with its recipe.")
        with gr.Row():
            if settings.on_space:
                gr.LoginButton(scale=0, min_width=260)
            token_md = gr.Markdown(elem_classes="small-note")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=360):
                gr.Markdown("### 1 · Model")
                model_box = gr.Textbox(label="Hub model id", elem_id="model-id",
                                       placeholder=f"empty = {settings.default_model_label}; or org/name")
                check_btn = gr.Button("Check the model", elem_id="check-model", size="sm")
                model_md = gr.Markdown(elem_id="model-info")
                gr.Markdown("### 2 · Method and target")
                with gr.Row():
                    method = gr.Dropdown(forms.method_names(), value=first, label="Method", elem_id="method")
                    score = gr.Dropdown(first_form["scores"], value=first_form["score"], label="Score",
                                        elem_id="score", visible=bool(first_form["scores"]))
                method_md = gr.Markdown(first_form["help"], elem_classes="small-note")
                with gr.Row():
                    target_kind = gr.Radio([(v, k) for k, v in forms.TARGET_KINDS.items()], value="ratio",
                                           label="Target", elem_id="target-kind", scale=3)
                    target_value = gr.Textbox("0.3", label="Value", elem_id="target-value", scale=2, min_width=120,
                                              info="0.3 removes 30%; counts like 800M")
                with gr.Accordion("Method options and layers", open=False):
                    options = gr.Textbox(first_form["options"], lines=4, label="Method options (YAML, the method's "
                                         "defaults)", elem_id="options")
                    with gr.Row():
                        round_to = gr.Number(1, precision=0, minimum=1, label="Round widths to")
                        protect_first = gr.Number(0, precision=0, minimum=0, label="Keep first N layers")
                        protect_last = gr.Number(0, precision=0, minimum=0, label="Keep last N layers")
            with gr.Column(min_width=360):
                gr.Markdown("### 3 · Calibration data")
                calib_source = gr.Radio([(v, k) for k, v in forms.CALIBRATION_SOURCES.items()], value="shipped",
                                        label="Source (used by data-driven scores only)", elem_id="calib-source")
                calib_dataset = gr.Textbox(label="Dataset (NAME or NAME:CONFIG, field `text`)", visible=False,
                                           placeholder="wikitext:wikitext-2-raw-v1")
                calib_file = gr.File(label="Calibration file (.txt, or .jsonl with a \"text\" field)",
                                     file_types=[".txt", ".jsonl"], type="filepath", visible=False,
                                     elem_id="calib-file", height=120)
                with gr.Row():
                    calib_samples = gr.Number(32, precision=0, minimum=1, label="Samples")
                    calib_seq_len = gr.Number(128, precision=0, minimum=2, label="Tokens per sample")
                gr.Markdown("### 4 · Evaluation")
                prompt = gr.Textbox(handlers.DEFAULT_PROMPT, lines=3, label="Prompt for sample generations",
                                    elem_id="prompt")
                with gr.Accordion("lm-eval tasks (optional, slow)", open=False):
                    gr.Markdown("lm-eval runs every task on the base and on the pruned model: seconds for the "
                                "bundled `pydoc_cloze` on the reference model, minutes to hours for large models "
                                "or the literature's tasks (which need their datasets from the Hub).",
                                elem_classes="small-note")
                    lm_eval = gr.Checkbox(False, label="Run lm-eval")
                    with gr.Row():
                        lm_tasks = gr.Textbox("pydoc_cloze", label="Tasks (comma separated)")
                        lm_limit = gr.Number(50, precision=0, minimum=0, label="Examples per task (0 = all)")
        run_btn = gr.Button("Prune", variant="primary", elem_id="run", size="lg")

        gr.Markdown("### Results")
        status = gr.Markdown("Choose a model and a method, then press **Prune**.", elem_id="status")
        with gr.Accordion("Log", open=True):
            log = gr.Textbox(lines=6, max_lines=6, interactive=False, autoscroll=True, elem_id="log",
                             show_label=False)
        with gr.Row(visible=False, equal_height=False) as results:
            summary = gr.Markdown(elem_id="summary")
            chart = gr.HTML(elem_id="chart")
        with gr.Group(visible=False) as samples:
            with gr.Row():
                base_gen = gr.Textbox(label="Base model", lines=4, interactive=False, elem_id="gen-base")
                pruned_gen = gr.Textbox(label="Pruned model", lines=4, interactive=False, elem_id="gen-pruned")
            regen_btn = gr.Button("Generate again with the prompt above", size="sm")
        with gr.Accordion("Recipe (pruning_recipe.yaml)", open=False, visible=False) as recipe_box:
            recipe = gr.Code(language="yaml", interactive=False, elem_id="recipe", show_label=False)
        with gr.Column(visible=False) as output:
            gr.Markdown("### Output")
            with gr.Row(equal_height=False):
                repo_id = gr.Textbox(label="Hub repository (editable)", elem_id="repo-id", scale=5)
                private = gr.Checkbox(False, label="Private", elem_id="private", scale=1, min_width=100)
                push_btn = gr.Button("Push to the Hub", variant="primary", elem_id="push", scale=2)
                download = gr.DownloadButton("Download as zip", elem_id="download", scale=2)
            push_md = gr.Markdown(elem_id="push-status")

        # -- events ----------------------------------------------------------------------------------------------
        def on_load():
            if settings.on_space:
                return "Sign in to push to your account; without signing in you can still download the zip."
            user = local_user()
            if user:
                return f"Local run: pushes use the Hugging Face token stored on this machine (**{user}**)."
            return "Local run: no usable Hugging Face token found (`hf auth login`); you can still download the zip."

        demo.load(on_load, outputs=token_md)

        def on_method(name):
            f = handlers.method_form(name)
            return (gr.update(choices=f["scores"], value=f["score"], visible=bool(f["scores"])), f["options"],
                    f["help"])

        method.change(on_method, method, [score, options, method_md], queue=False)
        score.change(handlers.method_help, [method, score, options], method_md, queue=False)
        options.blur(handlers.method_help, [method, score, options], method_md, queue=False)
        calib_source.change(lambda s: (gr.update(visible=s == "dataset"), gr.update(visible=s == "upload")),
                            calib_source, [calib_dataset, calib_file], queue=False)

        def on_check(text, oauth_token: gr.OAuthToken | None = None):
            try:
                return handlers.check_model(text, settings, _oauth(oauth_token))
            except Exception as err:  # every failure becomes a message
                return f"⚠ {friendly(err)}"

        check_btn.click(on_check, model_box, model_md, concurrency_limit=2, concurrency_id="check")
        model_box.submit(on_check, model_box, model_md, concurrency_limit=2, concurrency_id="check")

        fields = {"model": model_box, "method": method, "score": score, "target_kind": target_kind,
                  "target_value": target_value, "options_yaml": options, "round_to": round_to,
                  "protect_first": protect_first, "protect_last": protect_last, "calib_source": calib_source,
                  "calib_dataset": calib_dataset, "calib_file": calib_file, "calib_samples": calib_samples,
                  "calib_seq_len": calib_seq_len, "prompt": prompt, "lm_eval": lm_eval, "lm_eval_tasks": lm_tasks,
                  "lm_eval_limit": lm_limit}
        hidden = {results: gr.update(visible=False), samples: gr.update(visible=False),
                  recipe_box: gr.update(visible=False), output: gr.update(visible=False)}

        def on_run(data: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None,
                   profile: gr.OAuthProfile | None = None, progress=gr.Progress()):
            form = forms.Form(**{name: data[comp] for name, comp in fields.items()})
            lines: list[str] = []
            yield {status: "… Running", log: "", job_state: None, push_md: "", **hidden}
            session = request.session_hash or "anonymous"
            user = profile.username if profile is not None else (None if settings.on_space else local_user())
            job = functools.partial(handlers.run_job, form, settings, store, slot, session,
                                    oauth_token=_oauth(oauth_token), user=user)
            for event in stream(job):
                if event[0] == "progress":
                    progress(event[1], desc=event[2])
                elif event[0] == "log":
                    lines.append(event[1])
                    yield {log: "\n".join(lines[-LOG_LINES:])}
                elif event[0] == "error":
                    yield {status: f"⚠ {event[1]}", log: "\n".join(lines[-LOG_LINES:])}
                elif event[0] == "done":
                    res = event[1]
                    yield {**_result_updates(res, user), log: "\n".join(lines[-LOG_LINES:]), job_state: res.job_id}

        def _result_updates(res, user):
            ev, (before, after) = res.evidence, (res.evidence.comparison.base, res.evidence.comparison.pruned)
            texts = ev.generations or ("", "")
            return {
                status: (f"✔ Done in {res.seconds:.1f} s: {before.params:,} → {after.params:,} parameters "
                         f"({ev.removed_fraction:.1%} removed)."),
                summary: handlers.summary_markdown(res),
                chart: handlers.chart_markdown(res),
                base_gen: texts[0], pruned_gen: texts[1],
                recipe: res.recipe_yaml, download: gr.update(value=str(res.zip_path)),
                repo_id: res.suggest_repo(user),
                results: gr.update(visible=True), samples: gr.update(visible=ev.generations is not None),
                recipe_box: gr.update(visible=True), output: gr.update(visible=True),
            }

        run_outputs = [status, log, job_state, push_md, summary, chart, base_gen, pruned_gen, recipe, download,
                       repo_id, results, samples, recipe_box, output]
        run_btn.click(None, js=SCROLL_TO_STATUS)  # the progress bar is on the status line
        log.change(None, js=SCROLL_LOG)
        run_btn.click(on_run, set(fields.values()), run_outputs, concurrency_limit=1, concurrency_id="job",
                      trigger_mode="once", show_progress_on=[status])

        def on_generate(text, job_id, request: gr.Request):
            try:
                return (*handlers.regenerate(store, job_id, request.session_hash, text, settings), gr.update())
            except Exception as err:
                return gr.update(), gr.update(), f"⚠ {friendly(err)}"

        regen_btn.click(on_generate, [prompt, job_state], [base_gen, pruned_gen, status], concurrency_limit=1,
                        concurrency_id="job", trigger_mode="once")

        def on_push(name, is_private, job_id, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
            try:
                url = handlers.push(store, job_id, request.session_hash, name, is_private, settings,
                                    _oauth(oauth_token))
            except Exception as err:
                return f"⚠ {friendly(err)}"
            return f"✔ Pushed to [{url.rstrip('/').split('/', 3)[-1]}]({url})"

        push_btn.click(on_push, [repo_id, private, job_state], push_md, concurrency_limit=1, concurrency_id="push",
                       trigger_mode="once")

        def on_unload(request: gr.Request):
            store.drop_session(request.session_hash)

        demo.unload(on_unload)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    return demo


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # Gradio closes the server on it, then the exit hooks delete the job folders


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # Spaces and process managers stop apps with SIGTERM
    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored there)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = Settings.from_env()
    store = ResultStore(settings.keep_results, settings.work_dir)
    atexit.register(store.close)
    build_app(settings, store).launch(theme=theme(), css=CSS, show_error=False, footer_links=["api"],
                                      allowed_paths=[str(store.root)])  # the zips are served from there


if __name__ == "__main__":
    main()
