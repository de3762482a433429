"""What each control of the page does, without gradio: the app passes plain values in and shows what comes back.

A job: validate the form, wait in line, check the model and download it, then (on the GPU when there is one) load
it, measure the base model, prune (progress per layer), measure the pruned model, optionally measure the speed of
both, save it with its recipe and a card carrying the measurements; zip it. Every failure becomes a readable message
(see `errors.friendly`); the job's folder is removed on failure, on cancellation and when its result is evicted.
"""
from __future__ import annotations

import functools
import gc
import logging
import shutil
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch

import core
from core.layer_config import layer_shapes
from core.memory import too_big_for_memory
from core.model_io import LoadOptions, load_model, load_pruned, load_tokenizer
from core.speed import folder_bytes

from . import card, chart, evaluation, forms, gpu, hub, models
from .errors import Redactor, SpaceError
from .evaluation import Evidence
from .jobs import Cancelled, JobQueue, Reporter, ResultStore, Ticket, stream
from .settings import ROOT, Settings
from .stages import Board

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Python Library Documentation: module json\n\nNAME\n    json -"


@dataclass
class JobResult:
    job_id: int
    model: models.ModelInfo
    recipe_yaml: str
    evidence: Evidence
    chart_rows: list
    folder: Path  # the saved model
    base_folder: Path  # where the base model can be reloaded from
    zip_path: Path
    method: str
    seconds: float
    warning: str | None = None  # the model came out badly damaged
    sparsity: float | None = None  # a sparsity stage: the measured share of zero decoder-linear weights

    def suggest_repo(self, user: str | None) -> str:
        return hub.suggest_repo_id(user, self.model.short_name, self.method, self.removed())

    def removed(self) -> float:
        """The share named in repo names: zeroed weights for sparsity (same shapes), else parameters removed."""
        return self.sparsity if self.sparsity is not None else self.evidence.removed_fraction


# -- small handlers ------------------------------------------------------------------------------------------------

def method_form(method: str) -> dict:
    """Scores, default score, options YAML and help text of a method (from the core's registry)."""
    from core.methods import METHODS

    m = METHODS.get(method)
    return {"scores": forms.score_choices(method), "score": m.default_score, "options": forms.options_yaml(method),
            "help": method_help(method, m.default_score)}


def method_help(method: str, score: str | None, options_text: str = "") -> str:
    """The method's and the score's description, their ids in small print (as recipes and the CLI name them)."""
    text = forms.method_doc(method)
    doc = forms.score_doc(method, score)
    if doc:
        text += f"\n\n**{forms.score_title(score)}**: {doc}"
    data = forms.needs_calibration(method, score, options_text)
    text += ("\n\n*Uses calibration data (below).*" if data else "\n\n*Weights only: no calibration data needed.*")
    ids = f"method `{method}`" + (f" · score `{score}`" if doc else "")
    return text + f"\n\n<small>In recipes and on the command line: {ids}</small>"


def check_model(text: str, settings: Settings, oauth_token: str | None = None) -> str:
    """Markdown describing the model, or raises SpaceError."""
    return models.resolve(text, settings, hub.read_token(oauth_token, settings)).markdown()


# -- the job -------------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """What the checks and the download hand to the GPU part (it pickles: on ZeroGPU it crosses processes)."""

    info: models.ModelInfo
    recipe: core.Recipe
    base_folder: Path
    calib_name: str | None


@dataclass
class Measured:
    """What the GPU part hands back (pickles too: no models in it)."""

    evidence: Evidence
    chart_rows: list
    method: str
    recipe_yaml: str
    sparsity: float | None = None


def job_stages(form: forms.Form) -> list[str]:
    keys = ["check", "download", "load", "base", "prune"] + (["recover"] if forms.recovery(form) else []) + ["pruned"]
    return keys + (["speed"] if form.measure_speed else []) + ["save"]


def run_job(form: forms.Form, settings: Settings, store: ResultStore, jobs: JobQueue, session: str,
            oauth_token: str | None = None, user: str | None = None) -> Iterator[tuple]:
    """One job, start to finish, as events for the page:

    ('wait', jobs ahead, expected seconds or None) while it waits in line; ('stage', Board) as it runs;
    ('log', line); then ('done', JobResult), ('error', message) or ('cancelled', message).

    The job's folder is kept in `store` on success and deleted on failure and cancellation. Closing this generator
    (the page went away) cancels the job too.
    """
    try:
        forms.build_recipe(form, None, settings.max_upload_mb)  # settings wrong for any model fail before the line
        ticket = jobs.join(session)
    except SpaceError as err:
        yield ("error", str(err))
        return
    board = Board(job_stages(form), jobs.history, kind=f"{form.method}/{form.score or ''}")
    try:
        yield from jobs.wait_turn(ticket)
        ticket.board = board
        board.start()
        yield ("done", (yield from _run(ticket, board, form, settings, store, jobs, oauth_token, user)))
    except Cancelled:
        logger.info("job %d cancelled", ticket.id)
        yield ("cancelled", "Cancelled: the job stopped and its files were deleted." if ticket.started
               else "Cancelled before it started.")
    except SpaceError as err:
        logger.info("job %d failed: %s", ticket.id, err)
        yield ("error", str(err))
    finally:
        jobs.leave(ticket)
        gc.collect()  # the models died with the job's frames: give their memory back now


def _run(ticket: Ticket, board: Board, form: forms.Form, settings: Settings, store: ResultStore, jobs: JobQueue,
         oauth_token: str | None, user: str | None) -> Iterator[tuple]:
    start = time.perf_counter()
    folder = store.new_folder(ticket.id)
    redact = Redactor({str(folder): "job folder", str(store.root): "job folders",
                       str(settings.default_model): settings.default_model_label, str(ROOT): "."})
    try:
        logger.info("job %d started", ticket.id)
        yield ("log", f"job {ticket.id} started")
        token = hub.read_token(oauth_token, settings)
        prep = yield from _relay(stream(functools.partial(_prepare, form=form, settings=settings, folder=folder,
                                                          token=token), redact=redact), board, ticket)
        board.params = prep.info.params
        measured = yield from _relay(run_on_gpu(prep, form, settings, folder, user, redact), board, ticket)
        repo_id = hub.suggest_repo_id(user, prep.info.short_name, measured.method, measured.evidence.removed_fraction
                                      if measured.sparsity is None else measured.sparsity)
        zip_path = yield from _relay(stream(functools.partial(_zip, folder=folder, name=repo_id.split("/")[-1]),
                                            redact=redact), board, ticket)
        res = JobResult(ticket.id, prep.info, measured.recipe_yaml, measured.evidence, measured.chart_rows,
                        folder / "model", prep.base_folder, zip_path, measured.method, time.perf_counter() - start,
                        measured.evidence.damage(settings.ppl_warn_ratio), measured.sparsity)
        store.put(ticket.id, ticket.session, folder, res)
        board.finish()
        jobs.history.record(board)
        logger.info("job %d done in %.1f s", ticket.id, res.seconds)
        yield ("log", f"job {ticket.id} done in {res.seconds:.1f} s")
        return res
    except BaseException:
        store.discard(folder)
        raise


def _relay(events: Iterator[tuple], board: Board, ticket: Ticket, refresh: float = 1.0, busy: float = 0.25
           ) -> Iterator[tuple]:
    """Pass one part's events on to the page (progress through `board`, at most every `busy` seconds unless the
    stage changes; every `refresh` seconds the clocks move on) and return its value. Stops the part, and waits until
    it has stopped, when the ticket is cancelled or the page goes away."""
    shown, stage = 0.0, None
    try:
        for event in events:
            ticket.check()
            kind = event[0]
            if kind == "progress":
                board.update(*event[1:])
            elif kind == "log":
                yield event
                continue
            elif kind == "done":
                return event[1]
            elif kind == "error":
                raise SpaceError(event[1])
            elif kind == "cancelled":
                raise Cancelled()
            now, current = time.monotonic(), board.current
            if current is not stage or now - shown >= (busy if kind == "progress" else refresh):
                shown, stage = now, current
                yield ("stage", board)
        raise SpaceError("The job ended without a result.")  # a stream always ends with one; defensive
    finally:
        events.close()


def _prepare(reporter: Reporter, form: forms.Form, settings: Settings, folder: Path, token) -> Prepared:
    """Check the model and the settings (config only), then download the model into the job's folder."""
    reporter.stage("check", None, "reading the model's configuration")
    info = models.resolve(form.model, settings, token)
    recipe = forms.build_recipe(form, info.recipe_model, settings.max_upload_mb)
    wanted = recipe.target.target_params
    if wanted is not None and wanted >= info.params:
        raise SpaceError(f"The model has {models.fmt_params(info.params)} parameters, so keeping "
                         f"{models.fmt_params(wanted)} removes nothing. Give a smaller number of parameters after "
                         "pruning, or a share to remove.")
    recipe, calib_name = _own_calibration(recipe, folder)
    logger.info("model %s: %s parameters; method %s, score %s", info.label, models.fmt_params(info.params),
                recipe.method, recipe.score or "the method's default")
    base_folder = info.path
    if base_folder is None:
        size = f" ({info.weight_bytes / 1e9:,.1f} GB)" if info.weight_bytes else ""
        reporter.stage("download", None, f"{info.repo_id}{size}")
        base_folder = models.fetch(info, folder / "base", settings, token)
    return Prepared(info, recipe, base_folder, calib_name)


def _gpu_part(prep: Prepared, form: forms.Form, settings: Settings, folder: Path, user: str | None,
              redact: Redactor) -> Iterator[tuple]:
    """Load, measure, prune, measure, save: the part that uses the GPU (a generator of `stream` events, so that
    on ZeroGPU the progress crosses from the GPU process to the page)."""
    try:
        yield from stream(functools.partial(_prune_and_measure, prep=prep, form=form, settings=settings,
                                            folder=folder, user=user), redact=redact)
    finally:  # the models died with the job's thread: give their memory back now
        gc.collect()
        if torch.cuda.is_available():  # here even on ZeroGPU: this runs in the process that holds the GPU
            torch.cuda.empty_cache()


def _gpu_seconds(prep: Prepared, form: forms.Form, settings: Settings, *_) -> int:
    rec = prep.recipe.recover
    return gpu.job_seconds(prep.info.params, form.measure_speed, form.lm_eval, settings.gpu_max_seconds,
                           recover_steps=rec.steps if rec else 0, recover_seconds=rec.max_seconds if rec else None)


run_on_gpu = gpu.gpu_task(_gpu_part, duration=_gpu_seconds)


def _prune_and_measure(reporter: Reporter, prep: Prepared, form: forms.Form, settings: Settings, folder: Path,
                       user: str | None) -> Measured:
    info, opts = prep.info, LoadOptions(device=settings.device)
    # a model larger than free memory streams (one decoder block in memory at a time, core.streaming)
    too_big = too_big_for_memory(str(prep.base_folder), opts)
    opts = replace(opts, stream=bool(too_big))
    reporter.stage("load", None, f"{info.label}, {models.fmt_params(info.params)} parameters"
                                 f"{', streamed block by block' if too_big else ''}")
    model, tokenizer = load_model(str(prep.base_folder), opts)
    if too_big:  # changed blocks wait in the job's folder (deleted with it when the job fails)
        model.core_stream.use_work_folder(folder / "blocks")
        logger.info("streamed on %s: %s", model.core_stream.device, too_big)
    else:
        logger.info("loaded on %s (%s)", next(model.parameters()).device, str(next(model.parameters()).dtype)[6:])
    tasks = [t.strip() for t in form.lm_eval_tasks.split(",") if t.strip()] if form.lm_eval else None
    measured = evaluation.eval_settings(settings, tasks, int(form.lm_eval_limit or 0) or None)
    prompt = form.prompt or ""
    if too_big and prompt.strip():  # generating would read the whole model from disk for every token
        logger.warning("sample generation skipped: it needs the model in memory and %s", too_big)
        prompt = ""

    def measure(stage: str, name: str):
        def step(what: str) -> None:
            reporter.stage(stage, None, what)
            logger.info("%s model: %s", name, what)

        m = evaluation.measure(model, tokenizer, measured, step)
        logger.info("%s model: perplexity %.3f", name, m.perplexity)
        if not prompt.strip():
            return m, None
        step("sample generation")
        return m, evaluation.generate(model, tokenizer, prompt, settings.generation_tokens)

    def on_layer(name: str, done: int, total: int) -> None:
        if name.startswith("recover"):  # recovery training after pruning: optimizer steps
            reporter.stage("recover", done / max(total, 1), f"{name}: step {done} of {total}")
            return
        reporter.stage("prune", done / max(total, 1), f"{name}: layer {done} of {total}")
        logger.info("pruning (%s): layer %d/%d", name, done, total)

    base, base_text = measure("base", "base")
    before = [{"layer": i, **s.overrides()} for i, s in enumerate(layer_shapes(model.config))]
    reporter.stage("prune", 0.0, "scoring")
    result = core.prune(model, tokenizer, prep.recipe, progress=on_layer, base_model=str(prep.base_folder))
    result.base_revision = info.revision or result.base_revision
    zeros = result.extra.get("sparsity", {}).get("zeros", 0)  # sparsity keeps the shapes: zeroed weights count
    if result.params_after["total"] - zeros >= result.params_before["total"]:
        raise SpaceError("Nothing was removed with these settings: the method removes whole units (neurons, heads "
                         "or layers) and the target rounds to none. Remove a larger share.")
    if prep.calib_name:  # record the uploaded file's name, not the job folder's path
        result.recipe = result.recipe.replace(calibration=replace(result.recipe.calibration, source=prep.calib_name))
        result.calibration = result.recipe.calibration.describe()
    pruned, pruned_text = measure("pruned", "pruned")
    if form.measure_speed and too_big:
        logger.warning("speed not measured: it needs the model on one device and %s", too_big)
    elif form.measure_speed:
        reporter.stage("speed", None, "base and pruned model, in alternation")
        logger.info("speed: base and pruned model, %d rounds", settings.speed_rounds)
        base_again, _ = load_model(str(prep.base_folder), opts)
        reporter.check()
        base.speed, pruned.speed = evaluation.compare_speed(base_again, model, settings)
        del base_again
    evidence = Evidence(evaluation.Comparison(base, pruned, measured), prompt,
                        (base_text or "", pruned_text or "") if prompt.strip() else None, streamed=too_big)
    rows = chart.layer_rows(before, result.layers(), result.report.get("removed"))
    sparsity = result.extra.get("sparsity")
    if sparsity:
        chart.add_sparsity(rows, sparsity)
    reporter.stage("save", None, "writing the pruned model")
    out = folder / "model"
    repo_id = hub.suggest_repo_id(user, info.short_name, result.recipe.method,
                                  sparsity["sparsity"] if sparsity else evidence.removed_fraction)
    core.save_pruned(result, out, repo_name=repo_id)
    card.record_base_name(out, info.base_name)  # by the name the user chose, never a server path
    evidence.disk_bytes = (info.weight_bytes, folder_bytes(out))
    card.write_card(out, repo_id, evidence, info.repo_id, info.base_name)
    return Measured(evidence, rows, result.recipe.method, (out / "pruning_recipe.yaml").read_text(encoding="utf-8"),
                    sparsity["sparsity"] if sparsity else None)


def _zip(reporter: Reporter, folder: Path, name: str) -> Path:
    reporter.stage("save", None, "zipping")
    return zip_folder(folder / "model", folder / f"{name}.zip")


def _own_calibration(recipe: core.Recipe, folder: Path) -> tuple[core.Recipe, str | None]:
    """Copy an uploaded calibration file into the job folder (Gradio's upload cache is cleaned separately)."""
    source = recipe.calibration.source
    if recipe.calibration.source in ("builtin",) or source.startswith("dataset:") or not Path(source).is_file():
        return recipe, None
    target = folder / f"calibration{Path(source).suffix.lower()}"
    shutil.copyfile(source, target)
    return recipe.replace(calibration=replace(recipe.calibration, source=str(target))), Path(source).name


def write_card(res: JobResult, repo_id: str) -> None:
    card.write_card(res.folder, repo_id, res.evidence, res.model.repo_id, res.model.base_name)


def zip_folder(folder: Path, target: Path) -> Path:
    """A zip of the folder's files under a top-level folder named like the zip (weights stored, text deflated)."""
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                kind = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                zf.write(path, f"{target.stem}/{path.relative_to(folder)}", compress_type=kind)
    return target


# -- after the job -------------------------------------------------------------------------------------------------

def _generate_pair(base_folder: Path, folder: Path, prompt: str, new_tokens: int, device: str | None
                   ) -> tuple[str, str]:
    too_big = too_big_for_memory(str(base_folder), LoadOptions(device=device))
    if too_big:
        raise SpaceError(f"Sample generations need the whole model in memory and {too_big}: this Space prunes and "
                         "evaluates it block by block from disk, but cannot generate with it.")
    tokenizer = load_tokenizer(str(folder))
    out = []
    for loader in (lambda: load_model(str(base_folder), LoadOptions(device=device))[0],
                   lambda: load_pruned(str(folder), device=device)):
        model = loader()
        try:
            out.append(evaluation.generate(model, tokenizer, prompt, new_tokens))
        finally:
            del model
            gc.collect()
    return out[0], out[1]


_generate_on_gpu = gpu.gpu_task(_generate_pair, duration=60)


def regenerate(store: ResultStore, jobs: JobQueue, job_id: int | None, session: str, prompt: str,
               settings: Settings) -> tuple[str, str]:
    """Greedy continuations of `prompt` by the base and the pruned model of a finished job (in line with the jobs:
    both models are loaded)."""
    res: JobResult = store.get(job_id, session)
    if not prompt.strip():
        raise SpaceError("Type a prompt first.")
    ticket = jobs.join(session)
    try:
        for _ in jobs.wait_turn(ticket):
            pass
        return _generate_on_gpu(res.base_folder, res.folder, prompt, settings.generation_tokens, settings.device)
    except Cancelled:
        raise SpaceError("Cancelled.") from None
    finally:
        jobs.leave(ticket)


def push(store: ResultStore, job_id: int | None, session: str, repo_id: str, private: bool, settings: Settings,
         oauth_token: str | None = None) -> str:
    """Push the job's model; returns the repo URL. The card is rewritten for the final repo id first."""
    res: JobResult = store.get(job_id, session)
    token = hub.write_token(oauth_token, settings)
    repo_id = hub.check_repo_id(repo_id, token, settings)
    write_card(res, repo_id)
    message = (f"Pruned {res.model.base_name} with {res.method} ({res.evidence.removed_fraction:.1%} of parameters "
               "removed)")
    url = hub.push_folder(res.folder, repo_id, token, bool(private), settings, message)
    logger.info("pushed job %d to %s", res.job_id, repo_id)
    return url


# -- rendering -----------------------------------------------------------------------------------------------------

def done_status(res: JobResult) -> str:
    ev = res.evidence
    before, after = ev.comparison.base, ev.comparison.pruned
    ppl = (f"; perplexity {before.perplexity:,.2f} → {after.perplexity:,.2f}"
           if before.perplexity and after.perplexity else "")
    mark = "⚠ Done, but see the warning" if res.warning else "✔ Done"
    zeros = (f"; {res.sparsity:.1%} of the decoder-block linear weights set to zero (same shapes: no speed-up "
             "without sparse kernels)" if res.sparsity is not None else "")
    return (f"{mark} in {res.seconds:.1f} s: {before.params:,} → {after.params:,} parameters "
            f"({ev.removed_fraction:.1%} removed){zeros}{ppl}.")


def summary_markdown(res: JobResult) -> str:
    comparison = res.evidence.comparison
    rows = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in res.evidence.rows())
    return (f"| measure | base | pruned | change |\n|---|--:|--:|--:|\n{rows}\n\n"
            f"<small>Perplexity on the first {comparison.pruned.eval_tokens:,} tokens of the "
            f"{comparison.settings.text_label}.</small>\n\n"
            f"{evaluation.speed_markdown(comparison, res.evidence.streamed)}")


def chart_markdown(res: JobResult) -> str:
    return "<h4 style='margin:0 0 6px'>Kept per layer</h4>" + chart.chart_html(res.chart_rows)


def api_summary(res: JobResult) -> dict:
    """The result of a job as plain data (the `/prune` API returns it with the zip)."""
    ev, comparison = res.evidence, res.evidence.comparison
    return {
        "job_id": res.job_id, "base_model": res.model.base_name, "method": res.method,
        "params_before": comparison.base.params, "params_after": comparison.pruned.params,
        "removed_fraction": round(ev.removed_fraction, 6),
        "perplexity_before": comparison.base.perplexity, "perplexity_after": comparison.pruned.perplexity,
        "warning": res.warning, "speed": {"base": comparison.base.speed, "pruned": comparison.pruned.speed},
        "lm_eval": {"base": comparison.base.lm_eval, "pruned": comparison.pruned.lm_eval},
        "generations": list(ev.generations) if ev.generations else None,
        "recipe": res.recipe_yaml, "seconds": round(res.seconds, 1),
    }
