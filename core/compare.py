"""Measuring a base model and its pruned variant the same way, and describing the difference.

One definition for every front end: the CLI, the Space and the bot all report `Comparison`s — perplexity on a
held-out text, speed ratios measured in the same process, optional lm-eval scores — and put them in model cards
as `model-index` results plus a before/after table.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from huggingface_hub import EvalResult

from .architectures import spec_for_config
from .evaluate import perplexity_of_file
from .params import count_parameters
from .speed import measure_speed, speed_ratios, weight_bytes
from .memory import model_too_big
from .streaming import is_streamed, whole

logger = logging.getLogger(__name__)

EVAL_TEXT = Path(__file__).resolve().parent.parent / "reference" / "corpus" / "eval.txt"


@dataclass(frozen=True)
class EvalSettings:
    """How models are measured. Speed figures are only meaningful as ratios between models measured alike."""

    text: Path = EVAL_TEXT
    text_label: str = "held-out reference text (Python stdlib docs)"
    max_tokens: int | None = 4096
    max_length: int = 256
    speed: bool = True
    prompt_tokens: int = 128
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1,)
    repeats: int = 3
    tasks: tuple[str, ...] = ()
    task_dirs: tuple[str, ...] = ()
    task_limit: int | None = None


@dataclass
class Measurement:
    """One model's numbers (None where not measured)."""

    params: int
    weight_bytes: int
    perplexity: float | None = None
    eval_tokens: int | None = None
    speed: dict | None = None
    lm_eval: dict | None = None  # {task: {metric: value}}

    def to_dict(self) -> dict:
        return asdict(self)


def speed_of(model, s: EvalSettings) -> dict | None:
    """`measure_speed` with the settings' sizes, clamped to the model's context length. A streamed model is
    loaded whole for it when it fits; when it does not, None (and a warning saying why)."""
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    prompt = min(s.prompt_tokens, max(limit // 2, 8))
    new = min(s.new_tokens, max(limit - prompt - 1, 1))
    if not is_streamed(model):
        return measure_speed(model, prompt_len=prompt, new_tokens=new, batch_sizes=s.batch_sizes, repeats=s.repeats)
    reason = model_too_big(model)
    if reason:
        logger.warning("speed not measured: it needs the model on one device and %s", reason)
        return None
    with whole(model):
        return measure_speed(model, prompt_len=prompt, new_tokens=new, batch_sizes=s.batch_sizes, repeats=s.repeats)


def _faster(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return b if a is None else a
    out = dict(a, prefill_seconds=min(a["prefill_seconds"], b["prefill_seconds"]))
    out["decode"] = {k: max(a["decode"][k], b["decode"][k], key=lambda e: e["tokens_per_second"])
                     for k in a["decode"]}
    return out


def speed_pair(base_model, pruned_model, s: EvalSettings, rounds: int = 2) -> tuple[dict, dict]:
    """Speed of both models measured in alternation, keeping each one's best round: a busy machine slows whichever
    model runs at the wrong moment, and the ratio of the two is what gets reported."""
    best: list[dict | None] = [None, None]
    for _ in range(rounds):
        for i, model in enumerate((base_model, pruned_model)):
            best[i] = _faster(best[i], speed_of(model, s))
        if best[0] is None or best[1] is None:  # one of them does not fit: no ratio to show
            return best[0], best[1]
    return best[0], best[1]


def measure(model, tokenizer, settings: EvalSettings = EvalSettings(),
            step: Callable[[str], None] = lambda what: None) -> Measurement:
    """Measure one model; `step(what)` is called before each part (progress bars, logs)."""
    m = Measurement(params=count_parameters(model, spec_for_config(model.config))["total"],
                    weight_bytes=weight_bytes(model))
    if tokenizer is not None:
        step("perplexity")
        ppl = perplexity_of_file(model, tokenizer, settings.text, max_length=settings.max_length,
                                 max_tokens=settings.max_tokens)
        m.perplexity, m.eval_tokens = ppl.perplexity, ppl.tokens
    else:
        logger.warning("no tokenizer: perplexity and lm-eval are skipped")
    if settings.speed:
        step("speed")
        m.speed = speed_of(model, settings)
    if settings.tasks and tokenizer is not None:
        from .harness import run_tasks

        reason = model_too_big(model) if is_streamed(model) else None
        if reason:  # lm-eval runs whole models only
            logger.warning("lm-eval not run: it needs the model in memory and %s", reason)
            return m
        step("lm-eval")
        with whole(model) if is_streamed(model) else contextlib.nullcontext():
            m.lm_eval = run_tasks(model, tokenizer, list(settings.tasks), list(settings.task_dirs),
                                  settings.task_limit)["tasks"]
    return m


@dataclass
class Comparison:
    """Base vs pruned, measured with the same settings."""

    base: Measurement
    pruned: Measurement
    settings: EvalSettings = field(default_factory=EvalSettings)

    @property
    def ratios(self) -> dict:
        b, p = self.base, self.pruned
        out = {"params": p.params / b.params, "weight_bytes": p.weight_bytes / b.weight_bytes}
        if b.perplexity and p.perplexity:
            out["perplexity"] = p.perplexity / b.perplexity
        if b.speed and p.speed:
            out.update(speed_ratios(b.speed, p.speed))
        return out

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "pruned": self.pruned.to_dict(), "ratios": self.ratios,
                "text": self.settings.text_label, "eval_tokens": self.pruned.eval_tokens}

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(measure, base, pruned, change) rows for pages and cards."""
        b, p, r = self.base, self.pruned, self.ratios
        rows = [("parameters", f"{b.params:,}", f"{p.params:,}", f"{r['params'] - 1:+.1%}"),
                ("weights (MB)", f"{b.weight_bytes / 1e6:,.1f}", f"{p.weight_bytes / 1e6:,.1f}",
                 f"{r['weight_bytes'] - 1:+.1%}")]
        if "perplexity" in r:
            rows.append(("perplexity", f"{b.perplexity:.2f}", f"{p.perplexity:.2f}", f"x{r['perplexity']:.2f}"))
        if b.speed and p.speed:
            rows.append(("prefill latency (ms)", f"{1e3 * b.speed['prefill_seconds']:.1f}",
                         f"{1e3 * p.speed['prefill_seconds']:.1f}", f"speed x{r['prefill_speedup']:.2f}"))
            for batch, entry in b.speed["decode"].items():
                after = p.speed["decode"].get(batch)
                if after:
                    rows.append((f"decode tokens/s (batch {batch})", f"{entry['tokens_per_second']:,.0f}",
                                 f"{after['tokens_per_second']:,.0f}", f"speed x{r[f'decode_speedup_batch{batch}']:.2f}"))
        for task, metrics in (b.lm_eval or {}).items():
            for metric, value in metrics.items():
                after = (p.lm_eval or {}).get(task, {}).get(metric)
                if "stderr" not in metric and after is not None:
                    rows.append((f"{task} {metric}", f"{value:.4f}", f"{after:.4f}", f"{after - value:+.4f}"))
        return rows

    def eval_results(self) -> list[EvalResult]:
        """The pruned model's results as `model-index` entries of a model card."""
        p = self.pruned
        out = []
        if p.perplexity is not None:
            out.append(EvalResult(task_type="text-generation", task_name="Perplexity", dataset_type="text",
                                  dataset_name=f"{self.settings.text_label}, first {p.eval_tokens} tokens",
                                  metric_type="perplexity", metric_name="Perplexity",
                                  metric_value=round(p.perplexity, 4), verified=False))
        for task, metrics in (p.lm_eval or {}).items():
            for metric, value in metrics.items():
                if "stderr" not in metric:
                    out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                          metric_type=metric, metric_value=round(float(value), 4), verified=False))
        return out

    def markdown(self, heading: str = "Measured results") -> str:
        speed = self.base.speed or {}
        table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows())
        where = (f"speed on {speed.get('device', '?')} ({speed.get('dtype', '?')}), prompt of "
                 f"{speed.get('prompt_tokens', '?')} tokens, {speed.get('new_tokens', '?')} new tokens: compare the "
                 "ratios, not the absolute times" if speed else "speed not measured")
        return (f"## {heading}\n\nBase and pruned model measured the same way in one process. Perplexity on the "
                f"first {self.pruned.eval_tokens} tokens of the {self.settings.text_label}; {where}.\n\n"
                f"| measure | base | pruned | change |\n|---|---|---|---|\n{table}\n")


def compare(base_model, pruned_model, tokenizer, settings: EvalSettings = EvalSettings(), rounds: int = 2) -> Comparison:
    """Measure both models with the same settings (speed in alternating rounds, see `speed_pair`)."""
    quiet = dataclasses.replace(settings, speed=False)
    comparison = Comparison(measure(base_model, tokenizer, quiet), measure(pruned_model, tokenizer, quiet), settings)
    if settings.speed:
        comparison.base.speed, comparison.pruned.speed = speed_pair(base_model, pruned_model, settings, rounds)
    return comparison
