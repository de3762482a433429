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
import contextlib  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402

import gradio as gr  # noqa: E402

from gradio.data_classes import FileData  # noqa: E402

from space import forms, handlers, hub  # noqa: E402
from space.errors import as_markdown, friendly  # noqa: E402
from space.jobs import JobQueue, ResultStore  # noqa: E402
from space.settings import Settings  # noqa: E402
from space.stages import render, render_wait  # noqa: E402

logger = logging.getLogger("space.app")

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial",
                "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "monospace"]
CSS = """
.gradio-container {max-width: 1280px !important; margin: auto}
#status {min-height: 1.5em}
#status p {font-size: 15px}
#summary table {width: 100%}
#summary td, #summary th {white-space: nowrap}
#summary td:first-child, #summary th:first-child {white-space: normal}
#summary, .layer-chart {max-width: 100%; overflow-x: auto}
#damage {border: 2px solid #dc2626; border-radius: 8px; padding: 10px 14px; background: rgba(220, 38, 38, .08)}
#damage p {font-size: 15px; margin: 0}
#cancel {min-width: 110px}
.small-note p {font-size: 13px; opacity: .8}
@media (max-width: 640px) {
  #results-row {flex-direction: column}
  #results-row > * {min-width: 100% !important}
  .layer-chart td.cell {min-width: 64px !important}
  .layer-chart td, .layer-chart th {padding: 3px 4px !important}
  #summary td, #summary th {padding: 4px 5px !important; font-size: 13px}
}
"""
LOG_LINES = 200
SCROLL_TO_STAGES = "() => document.querySelector('#results-heading')?.scrollIntoView({behavior: 'smooth', block: 'start'})"
SCROLL_TO_RESULTS = """() => { const done = document.querySelector('#summary');
  const target = done && done.offsetParent !== null ? '#status' : '#results-heading';
  document.querySelector(target)?.scrollIntoView({behavior: 'smooth', block: 'start'}); }"""
SCROLL_LOG = "() => { const e = document.querySelector('#log textarea'); if (e) e.scrollTop = e.scrollHeight; }"
PRIVATE = {"api_visibility": "private"}  # page events: the API is /prune and /push only


def theme() -> gr.themes.Base:
    # system fonts only: the default theme would fetch web fonts from a CDN, and the app must work offline
    return gr.themes.Soft(primary_hue="indigo", font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def _api_error(message: str) -> gr.Error:
    return gr.Error(message, print_exception=False)  # a message for the caller, not a bug: no traceback in the log


def _oauth(oauth_token) -> str | None:
    return oauth_token.token if oauth_token is not None else None


def build_app(settings: Settings | None = None, store: ResultStore | None = None) -> gr.Blocks:
    settings = settings or Settings.from_env()
    if store is None:
        store = ResultStore(settings.keep_results, settings.work_dir)
        atexit.register(store.close)
    jobs = JobQueue(settings.queue_size)
    local_user = functools.lru_cache(maxsize=1)(lambda: hub.username(None, settings))
    first = "mlp_width" if "mlp_width" in forms.method_names() else forms.method_names()[0]
    first_form = handlers.method_form(first)
    speed_default = settings.speed_by_default()
    job_limit = settings.queue_size + 1  # the waiting ones run too: they show their place in line

    def user_of(profile) -> str | None:
        return profile.username if profile is not None else (None if settings.on_space else local_user())

    with gr.Blocks(title="Structured pruning", delete_cache=(900, 3600)) as demo:
        job_state = gr.State(None)
        gr.Markdown("# ✂️ Structured pruning\nMake a causal language model smaller by removing whole neurons, "
                    "attention heads or layers, measure what it costs, and publish the result with its recipe.")
        with gr.Row():
            if settings.on_space:
                gr.LoginButton(scale=0, min_width=260)
            token_md = gr.Markdown(elem_classes="small-note")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=320):
                gr.Markdown("### 1 · Model")
                model_box = gr.Textbox(label="Hub model id", elem_id="model-id",
                                       placeholder=f"empty = {settings.default_model_label}; or org/name")
                check_btn = gr.Button("Check the model", elem_id="check-model", size="sm")
                model_md = gr.Markdown(elem_id="model-info")
                gr.Markdown("### 2 · Method and target")
                with gr.Row():
                    method = gr.Dropdown(forms.method_choices(), value=first, label="Method", elem_id="method",
                                         min_width=200)
                    score = gr.Dropdown(first_form["scores"], value=first_form["score"], label="Score",
                                        elem_id="score", visible=bool(first_form["scores"]), min_width=200)
                method_md = gr.Markdown(first_form["help"], elem_classes="small-note", elem_id="method-help")
                with gr.Row():
                    target_kind = gr.Radio([(v, k) for k, v in forms.TARGET_KINDS.items()], value="ratio",
                                           label="Target", elem_id="target-kind", scale=3, min_width=200)
                    target_value = gr.Textbox("30%", label="Value", elem_id="target-value", scale=2, min_width=160,
                                              info="share to remove: 30% or 0.3; parameters after pruning: 800M")
                with gr.Accordion("Method options and layers", open=False):
                    options = gr.Textbox(first_form["options"], lines=4, label="Method options (YAML, the method's "
                                         "defaults)", elem_id="options")
                    with gr.Row():
                        round_to = gr.Number(1, precision=0, minimum=1, label="Round widths to", min_width=100)
                        protect_first = gr.Number(0, precision=0, minimum=0, label="Keep first N layers",
                                                  min_width=100)
                        protect_last = gr.Number(0, precision=0, minimum=0, label="Keep last N layers",
                                                 min_width=100)
            with gr.Column(min_width=320):
                gr.Markdown("### 3 · Calibration data")
                calib_source = gr.Radio([(v, k) for k, v in forms.CALIBRATION_SOURCES.items()], value="shipped",
                                        label="Source (used by data-driven scores only)", elem_id="calib-source")
                calib_dataset = gr.Textbox(label="Dataset (NAME or NAME:CONFIG, field `text`)", visible=False,
                                           placeholder="wikitext:wikitext-2-raw-v1")
                calib_file = gr.File(label="Calibration file (.txt, or .jsonl with a \"text\" field)",
                                     file_types=[".txt", ".jsonl"], type="filepath", visible=False,
                                     elem_id="calib-file", height=120)
                with gr.Row():
                    calib_samples = gr.Number(32, precision=0, minimum=1, label="Samples", min_width=100)
                    calib_seq_len = gr.Number(128, precision=0, minimum=2, label="Tokens per sample", min_width=100)
                gr.Markdown("### 4 · Evaluation")
                prompt = gr.Textbox(handlers.DEFAULT_PROMPT, lines=3, label="Prompt for sample generations",
                                    elem_id="prompt")
                measure_speed = gr.Checkbox(
                    speed_default, label="Measure speed (base vs pruned)", elem_id="measure-speed",
                    info="Quick on a GPU; on a CPU it takes longer than the pruning itself" +
                         (" (off by default here)." if not speed_default else "."))
                with gr.Accordion("Recovery training (optional, slow)", open=False):
                    gr.Markdown("After pruning, the pruned model learns from the unpruned one (logit distillation) "
                                "on the calibration source for a number of steps; the base model stays in memory "
                                "as the teacher. A few hundred steps win back much of the lost perplexity.",
                                elem_classes="small-note")
                    with gr.Row():
                        recover_steps = gr.Number(0, precision=0, minimum=0, label="Steps (0 = none)",
                                                  min_width=120, elem_id="recover-steps")
                        recover_minutes = gr.Number(0, minimum=0, label="Time limit, minutes (0 = none)",
                                                    min_width=120, elem_id="recover-minutes")
                with gr.Accordion("lm-eval tasks (optional, slow)", open=False):
                    gr.Markdown("lm-eval runs every task on the base and on the pruned model: seconds for the "
                                "bundled `pydoc_cloze` on the reference model, minutes to hours for large models "
                                "or the literature's tasks (which need their datasets from the Hub).",
                                elem_classes="small-note")
                    lm_eval = gr.Checkbox(False, label="Run lm-eval")
                    with gr.Row():
                        lm_tasks = gr.Textbox("pydoc_cloze", label="Tasks (comma separated)", min_width=160)
                        lm_limit = gr.Number(50, precision=0, minimum=0, label="Examples per task (0 = all)",
                                             min_width=160)
        with gr.Row(elem_id="run-row"):
            run_btn = gr.Button("Prune", variant="primary", elem_id="run", size="lg", scale=4)
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel", size="lg", scale=1, visible=False)

        gr.Markdown("### Results", elem_id="results-heading")
        stages_html = gr.HTML(elem_id="stages")
        status = gr.Markdown("Choose a model and a method, then press **Prune**.", elem_id="status")
        damage = gr.Markdown(visible=False, elem_id="damage")
        with gr.Accordion("Log", open=True):
            log = gr.Textbox(lines=5, max_lines=5, interactive=False, autoscroll=True, elem_id="log",
                             show_label=False)
        with gr.Row(visible=False, equal_height=False, elem_id="results-row") as results:
            with gr.Column(min_width=320):
                summary = gr.Markdown(elem_id="summary")
            with gr.Column(min_width=320):
                chart = gr.HTML(elem_id="chart")
        with gr.Group(visible=False) as samples:
            with gr.Row():
                base_gen = gr.Textbox(label="Base model", lines=4, interactive=False, elem_id="gen-base",
                                      min_width=240)
                pruned_gen = gr.Textbox(label="Pruned model", lines=4, interactive=False, elem_id="gen-pruned",
                                        min_width=240)
            regen_btn = gr.Button("Generate again with the prompt above", size="sm")
        with gr.Accordion("Recipe (pruning_recipe.yaml)", open=False, visible=False) as recipe_box:
            recipe = gr.Code(language="yaml", interactive=False, elem_id="recipe", show_label=False)
        with gr.Column(visible=False) as output:
            gr.Markdown("### Output")
            repo_id = gr.Textbox(label="Hub repository (editable)", elem_id="repo-id")
            with gr.Row(equal_height=True):
                private = gr.Checkbox(False, label="Private", elem_id="private", scale=1, min_width=110)
                push_btn = gr.Button("Push to the Hub", variant="primary", elem_id="push", scale=2, min_width=160)
                download = gr.DownloadButton("Download as zip", elem_id="download", scale=2, min_width=160)
            push_md = gr.Markdown(elem_id="push-status")

        # -- events ----------------------------------------------------------------------------------------------
        def on_load():
            if settings.on_space:
                return "Sign in to push to your account; without signing in you can still download the zip."
            user = local_user()
            if user:
                return f"Local run: pushes use the Hugging Face token stored on this machine (**{user}**)."
            return "Local run: no usable Hugging Face token found (`hf auth login`); you can still download the zip."

        demo.load(on_load, outputs=token_md, **PRIVATE)

        def on_method(name):
            f = handlers.method_form(name)
            return (gr.update(choices=f["scores"], value=f["score"], visible=bool(f["scores"])), f["options"],
                    f["help"])

        method.change(on_method, method, [score, options, method_md], queue=False, **PRIVATE)
        score.change(handlers.method_help, [method, score, options], method_md, queue=False, **PRIVATE)
        options.blur(handlers.method_help, [method, score, options], method_md, queue=False, **PRIVATE)
        calib_source.change(lambda s: (gr.update(visible=s == "dataset"), gr.update(visible=s == "upload")),
                            calib_source, [calib_dataset, calib_file], queue=False, **PRIVATE)

        def on_check(text, oauth_token: gr.OAuthToken | None = None):
            try:
                return handlers.check_model(text, settings, _oauth(oauth_token))
            except Exception as err:  # every failure becomes a message
                return f"⚠ {as_markdown(friendly(err))}"

        check_btn.click(on_check, model_box, model_md, concurrency_limit=2, concurrency_id="check", **PRIVATE)
        model_box.submit(on_check, model_box, model_md, concurrency_limit=2, concurrency_id="check", **PRIVATE)

        fields = {"model": model_box, "method": method, "score": score, "target_kind": target_kind,
                  "target_value": target_value, "options_yaml": options, "round_to": round_to,
                  "protect_first": protect_first, "protect_last": protect_last, "calib_source": calib_source,
                  "calib_dataset": calib_dataset, "calib_file": calib_file, "calib_samples": calib_samples,
                  "calib_seq_len": calib_seq_len, "prompt": prompt, "lm_eval": lm_eval, "lm_eval_tasks": lm_tasks,
                  "lm_eval_limit": lm_limit, "measure_speed": measure_speed, "recover_steps": recover_steps,
                  "recover_minutes": recover_minutes}

        def hidden() -> dict:  # fresh dicts every time: Gradio consumes the updates it is given
            return {results: gr.update(visible=False), samples: gr.update(visible=False),
                    recipe_box: gr.update(visible=False), output: gr.update(visible=False),
                    damage: gr.update(visible=False)}

        def idle() -> dict:
            return {run_btn: gr.update(value="Prune", interactive=True),
                    cancel_btn: gr.update(value="Cancel", visible=False, interactive=True)}

        def on_run(data: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None,
                   profile: gr.OAuthProfile | None = None):
            form = forms.Form(**{name: data[comp] for name, comp in fields.items()})
            lines: list[str] = []
            board = None
            yield {run_btn: gr.update(value="Running…", interactive=False), cancel_btn: gr.update(visible=True),
                   status: "", stages_html: "", log: "", job_state: None, push_md: "", **hidden()}
            user = user_of(profile)
            try:
                with contextlib.closing(handlers.run_job(form, settings, store, jobs, request.session_hash or
                                                         "anonymous", _oauth(oauth_token), user)) as events:
                    for event in events:  # closed when the page goes away: the job stops and cleans up
                        kind = event[0]
                        if kind == "wait":
                            yield {stages_html: render_wait(event[1], event[2]),
                                   run_btn: gr.update(value="Waiting in line…", interactive=False)}
                        elif kind == "stage":
                            board = event[1]
                            yield {stages_html: render(board),
                                   run_btn: gr.update(value="Running…", interactive=False)}
                        elif kind == "log":
                            lines.append(event[1])
                            yield {log: "\n".join(lines[-LOG_LINES:])}
                        elif kind in ("error", "cancelled"):
                            mark, title = ("⚠", "Failed") if kind == "error" else ("⏹", "Cancelled")
                            yield {**idle(), status: f"{mark} {as_markdown(event[1])}",
                                   log: "\n".join(lines[-LOG_LINES:]),
                                   stages_html: render(board, title=title) if board is not None else ""}
                        elif kind == "done":
                            res = event[1]
                            yield {**idle(), **_result_updates(res, user), log: "\n".join(lines[-LOG_LINES:]),
                                   stages_html: render(board, title="Done") if board is not None else "",
                                   job_state: res.job_id}
            except Exception as err:  # a bug must not leave the page "Running…"
                yield {**idle(), status: f"⚠ {as_markdown(friendly(err))}"}

        def _result_updates(res, user):
            texts = res.evidence.generations or ("", "")
            return {
                status: handlers.done_status(res),
                damage: gr.update(value=f"**⚠ Warning.** {res.warning}", visible=True) if res.warning
                else gr.update(visible=False),
                summary: handlers.summary_markdown(res),
                chart: handlers.chart_markdown(res),
                base_gen: texts[0], pruned_gen: texts[1],
                recipe: res.recipe_yaml, download: gr.update(value=str(res.zip_path)),
                repo_id: res.suggest_repo(user),
                push_md: "⚠ Pushing publishes a badly damaged model (see the warning above)." if res.warning else "",
                results: gr.update(visible=True), samples: gr.update(visible=res.evidence.generations is not None),
                recipe_box: gr.update(visible=True), output: gr.update(visible=True),
            }

        run_outputs = [run_btn, cancel_btn, stages_html, status, damage, log, job_state, push_md, summary, chart,
                       base_gen, pruned_gen, recipe, download, repo_id, results, samples, recipe_box, output]
        run_btn.click(None, js=SCROLL_TO_STAGES)
        log.change(None, js=SCROLL_LOG)
        run_event = run_btn.click(on_run, set(fields.values()), run_outputs, concurrency_limit=job_limit,
                                  concurrency_id="job", trigger_mode="once", show_progress="hidden", **PRIVATE)
        run_event.then(None, js=SCROLL_TO_RESULTS)

        def on_cancel(request: gr.Request):
            jobs.cancel(request.session_hash or "anonymous")
            return gr.update(value="Cancelling…", interactive=False)

        cancel_btn.click(on_cancel, None, cancel_btn, queue=False, **PRIVATE)

        def on_generate(text, job_id, request: gr.Request):
            try:
                return (*handlers.regenerate(store, jobs, job_id, request.session_hash, text, settings), gr.update())
            except Exception as err:
                return gr.update(), gr.update(), f"⚠ {as_markdown(friendly(err))}"

        regen_btn.click(on_generate, [prompt, job_state], [base_gen, pruned_gen, status], concurrency_limit=job_limit,
                        concurrency_id="job", trigger_mode="once", **PRIVATE)

        def on_push(name, is_private, job_id, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
            try:
                url = handlers.push(store, job_id, request.session_hash, name, is_private, settings,
                                    _oauth(oauth_token))
            except Exception as err:
                return f"⚠ {as_markdown(friendly(err))}"
            return f"✔ Pushed to [{url.rstrip('/').split('/', 3)[-1]}]({url})"

        push_btn.click(on_push, [repo_id, private, job_state], push_md, concurrency_limit=1, concurrency_id="push",
                       trigger_mode="once", **PRIVATE)

        # -- the API: two named endpoints ------------------------------------------------------------------------
        def prune(model: str = "", method: str = "mlp_width", ratio: str = "30%", score: str = "",
                  target: str = "ratio", options: str = "", calibration: str = "shipped", dataset: str = "",
                  samples: int = 32, seq_len: int = 128, prompt: str = handlers.DEFAULT_PROMPT,
                  speed: bool | None = None, lm_eval_tasks: str = "", lm_eval_limit: int = 50, round_to: int = 1,
                  protect_first: int = 0, protect_last: int = 0, recover_steps: int = 0,
                  recover_minutes: float = 0, request: gr.Request = None,
                  oauth_token: gr.OAuthToken | None = None, profile: gr.OAuthProfile | None = None
                  ) -> tuple[dict, FileData]:
            """Prune a model and measure it against its base; returns the results and the pruned model as a zip.

            Args:
                model: Hub model id (org/name); empty for the Space's default model.
                method: pruning method id: mlp_width, attention_heads, depth, slimllm, ...
                ratio: how much to remove: a share (0.3 or "30%"), or with target="target_params" the parameters
                    to keep ("800M").
                score: importance score id (empty: the method's default).
                target: "ratio" (share of the prunable part), "param_ratio" (share of all parameters) or
                    "target_params" (parameters after pruning).
                options: the method's options as YAML ("mode: query").
                calibration: "shipped" (the Space's text) or "dataset" (a Hub dataset, see `dataset`).
                dataset: NAME or NAME:CONFIG of a Hub dataset with a `text` field.
                samples: calibration samples.
                seq_len: tokens per calibration sample.
                prompt: prompt for the sample generations (empty: none).
                speed: measure the speed of both models (default: on with a GPU, off on a CPU).
                lm_eval_tasks: comma-separated lm-eval tasks run on both models (empty: none).
                lm_eval_limit: examples per lm-eval task (0: all).
                round_to: round kept widths to a multiple of this.
                protect_first: keep the first N layers unpruned.
                protect_last: keep the last N layers unpruned.
                recover_steps: recovery training steps after pruning (distillation from the base model; 0: none).
                recover_minutes: time limit of the recovery training in minutes (0: the steps alone).
            """
            form = forms.Form(model=model, method=method, score=score or None, target_kind=target,
                              target_value=str(ratio), options_yaml=options, round_to=round_to,
                              protect_first=protect_first, protect_last=protect_last,
                              calib_source=calibration, calib_dataset=dataset, calib_samples=samples,
                              calib_seq_len=seq_len, prompt=prompt, lm_eval=bool(lm_eval_tasks.strip()),
                              lm_eval_tasks=lm_eval_tasks, lm_eval_limit=lm_eval_limit,
                              measure_speed=speed_default if speed is None else bool(speed),
                              recover_steps=recover_steps, recover_minutes=recover_minutes)
            if form.calib_source not in ("shipped", "dataset"):
                raise _api_error("calibration must be \"shipped\" or \"dataset\" (uploads are for the page).")
            session = request.session_hash if request is not None else "api"
            for event in handlers.run_job(form, settings, store, jobs, session, _oauth(oauth_token),
                                          user_of(profile)):
                if event[0] in ("error", "cancelled"):
                    raise _api_error(event[1])
                if event[0] == "done":
                    res = event[1]
                    return handlers.api_summary(res), FileData(path=str(res.zip_path))
            raise _api_error("The job ended without a result.")

        def push(job_id: int, repo_id: str, private: bool = False, request: gr.Request = None,
                 oauth_token: gr.OAuthToken | None = None) -> str:
            """Push the model of a `/prune` job (same client session) to the Hub; returns the repository URL.

            Args:
                job_id: the `job_id` that /prune returned.
                repo_id: namespace/name of the new repository (or just name: the token's user is the namespace).
                private: create it private.
            """
            try:
                return handlers.push(store, job_id, request.session_hash, repo_id, private, settings,
                                     _oauth(oauth_token))
            except Exception as err:
                raise _api_error(friendly(err)) from None

        gr.api(prune, api_name="prune", concurrency_limit=job_limit, concurrency_id="job")
        gr.api(push, api_name="push", concurrency_limit=1, concurrency_id="push")

        def on_unload(request: gr.Request):
            jobs.cancel(request.session_hash)  # a job whose page went away stops (and cleans up)
            store.drop_session(request.session_hash)

        demo.unload(on_unload)
    demo.queue(max_size=settings.queue_size + 8, default_concurrency_limit=1)
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
