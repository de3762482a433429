"""Measuring a base model and its pruned variant the same way, and describing the difference.

One definition for every front end: the CLI, the Space and the bot all report `Comparison`s — perplexity on a
held-out text, speed measured in the same process (warm-up, repeats, interleaved rounds; see `core.speed`),
optional lm-eval scores — and put them in model cards as `model-index` results plus a before/after table.

`Comparison.to_dict()` (JSON-able):

    {"base": Measurement, "pruned": Measurement,      # params, weight_bytes, perplexity, eval_tokens, speed, lm_eval
     "ratios": {"params": p/b, "weight_bytes": p/b, "perplexity": p/b,
                "prefill_speedup": x, "decode_speedup_batch1": x},   # speed-ups only where measurable
     "speed": core.speed.compare_timings(...) or None, # per metric: medians, quartiles, speed-up, verdict, text
     "text": "held-out ...", "eval_tokens": 4096}

A speed-up whose spread includes 1 has the verdict "not measurable here": it is left out of `ratios` and of the
card's `model-index`, and the table says so instead of printing a ratio.
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
from .errors import EnvironmentFailure
from .evaluate import perplexity_of_file
from .params import count_parameters
from .memory import model_too_big
from .speed import (NOT_MEASURABLE, ProgressCallback, compare_timings, measure_pair, measure_speed, speed_ratios,
                    weight_bytes)
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
    repeats: int = 5  # timed rounds per model (interleaved when two models are compared)
    warmup: int = 1
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


def not_timeable(*models) -> str | None:
    """Why the models cannot be timed (a streamed one that does not fit whole in memory), or None."""
    for model in models:
        reason = model_too_big(model) if is_streamed(model) else None
        if reason:
            return f"speed needs the model on one device and {reason}"
    return None


@contextlib.contextmanager
def in_memory(*models):
    """Load each streamed model whole for the duration (speed and lm-eval need the weights on one device; check
    `not_timeable` first); models already in memory are left as they are."""
    with contextlib.ExitStack() as stack:
        for model in models:
            if is_streamed(model):
                stack.enter_context(whole(model))
        yield


def speed_of(model, s: EvalSettings, progress: ProgressCallback | None = None) -> dict | None:
    """`measure_speed` with the settings' sizes (clamped to the model's context length). A streamed model is
    loaded whole for it when it fits; when it does not, None (and a warning saying why)."""
    why_not = not_timeable(model)
    if why_not:
        logger.warning("speed not measured: %s", why_not)
        return None
    with in_memory(model):
        return measure_speed(model, prompt_len=s.prompt_tokens, new_tokens=s.new_tokens, batch_sizes=s.batch_sizes,
                             repeats=s.repeats, warmup=s.warmup, progress=progress)


def speed_pair(base_model, pruned_model, s: EvalSettings, rounds: int = 1,
               progress: ProgressCallback | None = None) -> tuple[dict | None, dict | None]:
    """Speed of both models measured in interleaved rounds (`s.repeats * rounds` of them, see
    `core.speed.measure_pair`): a busy machine slows both alike, and `compare_timings` pairs the rounds.
    (None, None) with a warning when one of them is a streamed model that does not fit whole in memory."""
    models = (base_model, pruned_model)
    why_not = not_timeable(*models)
    if why_not:
        logger.warning("speed not measured: %s", why_not)
        return None, None
    with in_memory(*models):
        return measure_pair(base_model, pruned_model, prompt_len=s.prompt_tokens, new_tokens=s.new_tokens,
                            batch_sizes=s.batch_sizes, repeats=s.repeats * max(rounds, 1), warmup=s.warmup,
                            progress=progress)


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

        step("lm-eval")
        try:  # run_tasks loads a streamed model whole, or refuses one that does not fit
            m.lm_eval = run_tasks(model, tokenizer, list(settings.tasks), list(settings.task_dirs),
                                  settings.task_limit)["tasks"]
        except EnvironmentFailure as err:
            logger.warning("lm-eval not run: %s", err)
    return m


@dataclass
class Comparison:
    """Base vs pruned, measured with the same settings."""

    base: Measurement
    pruned: Measurement
    settings: EvalSettings = field(default_factory=EvalSettings)

    @property
    def speed(self) -> dict | None:
        """`core.speed.compare_timings` of the two models (None when speed was not measured): per metric the
        medians and quartiles of both, the speed-up with its spread and a verdict."""
        if not (self.base.speed and self.pruned.speed):
            return None
        return compare_timings(self.base.speed, self.pruned.speed)

    @property
    def ratios(self) -> dict:
        """pruned / base for size and perplexity; median speed-ups (> 1: the pruned model is faster) only for the
        metrics whose spread is smaller than the effect (the others are "not measurable here", see `speed`)."""
        b, p = self.base, self.pruned
        out = {"params": p.params / b.params, "weight_bytes": p.weight_bytes / b.weight_bytes}
        if b.perplexity and p.perplexity:
            out["perplexity"] = p.perplexity / b.perplexity
        if b.speed and p.speed:
            out.update(speed_ratios(b.speed, p.speed, measurable_only=True))
        return out

    def to_dict(self) -> dict:
        return {"base": self.base.to_dict(), "pruned": self.pruned.to_dict(), "ratios": self.ratios,
                "speed": self.speed, "text": self.settings.text_label, "eval_tokens": self.pruned.eval_tokens}

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(measure, base, pruned, change) rows for pages and cards."""
        b, p, r = self.base, self.pruned, self.ratios
        rows = [("parameters", f"{b.params:,}", f"{p.params:,}", f"{r['params'] - 1:+.1%}"),
                ("weights (MB)", f"{b.weight_bytes / 1e6:,.1f}", f"{p.weight_bytes / 1e6:,.1f}",
                 f"{r['weight_bytes'] - 1:+.1%}")]
        if "perplexity" in r:
            rows.append(("perplexity", f"{b.perplexity:.2f}", f"{p.perplexity:.2f}", f"x{r['perplexity']:.2f}"))
        tokens = (self.pruned.speed or {}).get("new_tokens", 1)
        for key, entry in (self.speed or {"metrics": {}})["metrics"].items():
            if key == "prefill":
                rows.append(("prefill latency (ms)", timing_text(entry["base"]), timing_text(entry["pruned"]),
                             entry["text"]))
            else:
                batch = int(key.removeprefix("decode_b"))
                rows.append((f"decode tokens/s (batch {batch})", rate_text(entry["base"], batch * tokens),
                             rate_text(entry["pruned"], batch * tokens), entry["text"]))
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
        table = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows())
        where = speed_note(self.base.speed, self.speed)
        return (f"## {heading}\n\nBase and pruned model measured the same way in one process. Perplexity on the "
                f"first {self.pruned.eval_tokens} tokens of the {self.settings.text_label}; {where}.\n\n"
                f"| measure | base | pruned | change |\n|---|---|---|---|\n{table}\n")


def compare(base_model, pruned_model, tokenizer, settings: EvalSettings = EvalSettings(), rounds: int = 1,
            progress: ProgressCallback | None = None) -> Comparison:
    """Measure both models with the same settings (speed in interleaved rounds, see `speed_pair`)."""
    quiet = dataclasses.replace(settings, speed=False)
    comparison = Comparison(measure(base_model, tokenizer, quiet), measure(pruned_model, tokenizer, quiet), settings)
    if settings.speed:
        comparison.base.speed, comparison.pruned.speed = speed_pair(base_model, pruned_model, settings, rounds,
                                                                    progress)
    return comparison


def timing_text(s: dict) -> str:
    """'12.3 ± 0.4' (median ± half the interquartile range, milliseconds)."""
    return f"{1e3 * s['median']:,.1f} ± {1e3 * (s['q3'] - s['q1']) / 2:,.1f}"


def rate_text(s: dict, tokens: int) -> str:
    """'78 ± 3' tokens per second from timings of `tokens` tokens (median ± half the interquartile range)."""
    return f"{tokens / s['median']:,.0f} ± {(tokens / s['q1'] - tokens / s['q3']) / 2:,.0f}"


def speed_note(speed: dict | None, comparison: dict | None) -> str:
    """Where and how speed was measured, for the text under a results table."""
    if not speed:
        return "speed not measured"
    how = ("both models measured in interleaved rounds" if comparison and comparison["paired"]
           else "the models measured separately")
    return (f"speed on {speed.get('device', '?')} ({speed.get('dtype', '?')}), {speed.get('repeats', '?')} timed "
            f"rounds after {speed.get('warmup', '?')} warm-up, {how}; times are medians ± half the interquartile "
            f"range, speed-ups the median of the per-round ratios with their quartiles, and \"{NOT_MEASURABLE}\" "
            "where that spread includes no change. Compare the ratios, not the absolute times")
