"""What each control of the page does, without gradio: the app passes plain values in and shows what comes back.

A job: validate the form and the model, load it, measure the base model, prune (progress per layer), measure the
pruned model, save it with its recipe and a card carrying the measurements, zip it. Every failure raises a
`SpaceError` with a readable message (see `errors.friendly`); the job's folder is removed on failure and when its
result is evicted.
"""
from __future__ import annotations

import gc
import logging
import shutil
import time
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import core
from core.layer_config import layer_shapes
from core.model_io import LoadOptions, load_model, load_pruned, load_tokenizer
from core.speed import folder_bytes

from . import card, chart, evaluation, forms, hub, models
from .errors import SpaceError
from .evaluation import Evidence
from .jobs import JobSlot, Reporter, ResultStore
from .settings import Settings

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

    def suggest_repo(self, user: str | None) -> str:
        return hub.suggest_repo_id(user, self.model.short_name, self.method, self.evidence.removed_fraction)


# -- small handlers ------------------------------------------------------------------------------------------------

def method_form(method: str) -> dict:
    """Scores, default score, options YAML and help text of a method (from the core's registry)."""
    from core.methods import METHODS

    m = METHODS.get(method)
    return {"scores": forms.score_choices(method), "score": m.default_score, "options": forms.options_yaml(method),
            "help": method_help(method, m.default_score)}


def method_help(method: str, score: str | None, options_text: str = "") -> str:
    text = forms.method_doc(method)
    doc = forms.score_doc(method, score)
    if doc:
        text += f"\n\n**{score}**: {doc}"
    data = forms.needs_calibration(method, score, options_text)
    text += ("\n\n*Uses calibration data (below).*" if data else "\n\n*Weights only: no calibration data needed.*")
    return text


def check_model(text: str, settings: Settings, oauth_token: str | None = None) -> str:
    """Markdown describing the model, or raises SpaceError."""
    return models.resolve(text, settings, hub.read_token(oauth_token, settings)).markdown()


# -- the job -------------------------------------------------------------------------------------------------------

class _Steps:
    """Maps the job's stages onto one progress bar."""

    SPANS = {"load": (0.0, 0.1), "base": (0.1, 0.25), "prune": (0.25, 0.6), "pruned": (0.6, 0.75),
             "speed": (0.75, 0.9), "save": (0.9, 1.0)}

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def __call__(self, stage: str, text: str, part: float = 0.0) -> None:
        lo, hi = self.SPANS[stage]
        self.reporter.progress(lo + (hi - lo) * part, text)

    def prune_callback(self, name: str, done: int, total: int) -> None:
        self("prune", f"pruning ({name}): layer {done}/{total}", done / max(total, 1))
        logger.info("pruning (%s): layer %d/%d", name, done, total)


def run_job(form: forms.Form, settings: Settings, store: ResultStore, slot: JobSlot, session: str,
            reporter: Reporter, oauth_token: str | None = None, user: str | None = None) -> JobResult:
    """One job, start to finish; its folder is kept in `store` on success and deleted on any failure."""
    job_id = slot.acquire()
    folder = None
    try:
        logger.info("job %d started", job_id)
        folder = store.new_folder(job_id)
        res = _job(job_id, folder, form, settings, reporter, oauth_token, user)
        store.put(job_id, session, folder, res)
        logger.info("job %d done in %.1f s", job_id, res.seconds)
        reporter.progress(1.0, "done")
        return res
    except BaseException:
        if folder is not None:
            store.discard(folder)
        raise
    finally:  # the models died with _job's frame: give their memory back now
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        slot.release()


def _job(job_id: int, folder: Path, form: forms.Form, settings: Settings, reporter: Reporter,
         oauth_token: str | None, user: str | None) -> JobResult:
    start = time.perf_counter()
    steps = _Steps(reporter)
    steps("load", "checking the model")
    token = hub.read_token(oauth_token, settings)
    info = models.resolve(form.model, settings, token)
    recipe = forms.build_recipe(form, info.recipe_model, settings.max_upload_mb)
    recipe, calib_name = _own_calibration(recipe, folder)
    logger.info("model %s: %s parameters; recipe %s / %s", info.label, models.fmt_params(info.params),
                recipe.method, recipe.score or "-")
    steps("load", f"loading {info.label}", 0.3)
    base_folder = models.fetch(info, folder / "base", settings, token)
    model, tokenizer = load_model(str(base_folder), LoadOptions())
    tasks = [t.strip() for t in form.lm_eval_tasks.split(",") if t.strip()] if form.lm_eval else None
    measured = evaluation.eval_settings(settings, tasks, int(form.lm_eval_limit or 0) or None)
    prompt = form.prompt or ""

    def measure(stage: str):
        def step(what: str) -> None:
            steps(stage, f"{stage} model: {what}", 0.5)
            logger.info("%s model: %s", stage, what)

        m = evaluation.measure(model, tokenizer, measured, step)
        logger.info("%s model: perplexity %.3f", stage, m.perplexity)
        return m, (evaluation.generate(model, tokenizer, prompt, settings.generation_tokens) if prompt.strip()
                   else None)

    base, base_text = measure("base")
    before = [{"layer": i, **s.overrides()} for i, s in enumerate(layer_shapes(model.config))]
    result = core.prune(model, tokenizer, recipe, progress=steps.prune_callback,
                        base_model=info.repo_id or str(base_folder))
    result.base_revision = info.revision or result.base_revision
    if calib_name:  # record the uploaded file's name, not the job folder's path
        result.recipe = result.recipe.replace(calibration=replace(result.recipe.calibration, source=calib_name))
        result.calibration = result.recipe.calibration.describe()
    pruned, pruned_text = measure("pruned")
    steps("speed", "speed of both models")
    logger.info("speed: base and pruned model, %d rounds", settings.speed_rounds)
    base_again, _ = load_model(str(base_folder), LoadOptions())
    base.speed, pruned.speed = evaluation.compare_speed(base_again, model, settings)
    del base_again
    evidence = Evidence(evaluation.Comparison(base, pruned, measured), prompt,
                        (base_text or "", pruned_text or "") if prompt.strip() else None)
    rows = chart.layer_rows(before, result.layers(), result.report.get("removed"))
    steps("save", "saving the pruned model")
    res = JobResult(job_id, info, "", evidence, rows, folder / "model", base_folder, folder / "model.zip",
                    result.recipe.method, 0.0)
    repo_id = res.suggest_repo(user)
    core.save_pruned(result, res.folder, repo_name=repo_id)
    evidence.disk_bytes = (info.weight_bytes, folder_bytes(res.folder))
    res.recipe_yaml = (res.folder / "pruning_recipe.yaml").read_text(encoding="utf-8")
    write_card(res, repo_id)
    steps("save", "zipping", 0.5)
    res.zip_path = zip_folder(res.folder, folder / f"{repo_id.split('/')[-1]}.zip")
    res.seconds = time.perf_counter() - start
    return res


def _own_calibration(recipe: core.Recipe, folder: Path) -> tuple[core.Recipe, str | None]:
    """Copy an uploaded calibration file into the job folder (Gradio's upload cache is cleaned separately)."""
    source = recipe.calibration.source
    if recipe.calibration.source in ("builtin",) or source.startswith("dataset:") or not Path(source).is_file():
        return recipe, None
    target = folder / f"calibration{Path(source).suffix.lower()}"
    shutil.copyfile(source, target)
    return recipe.replace(calibration=replace(recipe.calibration, source=str(target))), Path(source).name


def write_card(res: JobResult, repo_id: str) -> None:
    card.write_card(res.folder, repo_id, res.evidence, res.model.repo_id, res.model.label)


def zip_folder(folder: Path, target: Path) -> Path:
    """A zip of the folder's files under a top-level folder named like the zip (weights stored, text deflated)."""
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                kind = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                zf.write(path, f"{target.stem}/{path.relative_to(folder)}", compress_type=kind)
    return target


# -- after the job -------------------------------------------------------------------------------------------------

def regenerate(store: ResultStore, job_id: int | None, session: str, prompt: str,
               settings: Settings) -> tuple[str, str]:
    """Greedy continuations of `prompt` by the base and the pruned model of a finished job."""
    res: JobResult = store.get(job_id, session)
    if not prompt.strip():
        raise SpaceError("Type a prompt first.")
    tokenizer = load_tokenizer(str(res.folder))
    out = []
    for loader in (lambda: load_model(str(res.base_folder), LoadOptions())[0], lambda: load_pruned(str(res.folder))):
        model = loader()
        try:
            out.append(evaluation.generate(model, tokenizer, prompt, settings.generation_tokens))
        finally:
            del model
            gc.collect()
    return out[0], out[1]


def push(store: ResultStore, job_id: int | None, session: str, repo_id: str, private: bool, settings: Settings,
         oauth_token: str | None = None) -> str:
    """Push the job's model; returns the repo URL. The card is rewritten for the final repo id first."""
    res: JobResult = store.get(job_id, session)
    token = hub.write_token(oauth_token, settings)
    repo_id = hub.check_repo_id(repo_id, token, settings)
    write_card(res, repo_id)
    message = (f"Pruned {res.model.label} with {res.method} ({res.evidence.removed_fraction:.1%} of parameters "
               "removed)")
    url = hub.push_folder(res.folder, repo_id, token, bool(private), settings, message)
    logger.info("pushed job %d to %s", res.job_id, repo_id)
    return url


# -- rendering -----------------------------------------------------------------------------------------------------

def summary_markdown(res: JobResult) -> str:
    comparison = res.evidence.comparison
    rows = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in res.evidence.rows())
    speed = comparison.base.speed or {}
    return (f"| measure | base | pruned | change |\n|---|--:|--:|--:|\n{rows}\n\n"
            f"<small>Perplexity on the first {comparison.pruned.eval_tokens:,} tokens of the "
            f"{comparison.settings.text_label}. Speed on "
            f"{speed.get('device', '?')} ({speed.get('dtype', '?')}), {speed.get('prompt_tokens', '?')}-token prompt, "
            f"{speed.get('new_tokens', '?')} new tokens, both models measured in alternation: compare the ratios, "
            "not the absolute times.</small>")


def chart_markdown(res: JobResult) -> str:
    return "<h4 style='margin:0 0 6px'>Kept per layer</h4>" + chart.chart_html(res.chart_rows)
