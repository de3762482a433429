"""The evidence shown next to a pruned model, measured through `core.compare` (the same definition as the CLI and
the bot): parameters and size, perplexity, optional lm-eval scores; plus what only the Space shows: greedy sample
generations for the user's prompt, and speed measured with both models in memory, in alternation."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from core.compare import Comparison, EvalSettings, Measurement, measure, speed_pair

from .errors import SpaceError
from .settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["Comparison", "Evidence", "Measurement", "compare_speed", "eval_settings", "generate", "measure",
           "speed_markdown"]


def eval_settings(settings: Settings, tasks: list[str] | None = None, limit: int | None = None) -> EvalSettings:
    """Perplexity and lm-eval settings for `core.compare.measure`; speed is measured apart (`compare_speed`)."""
    return EvalSettings(text=settings.eval_text, max_tokens=settings.eval_tokens, max_length=settings.eval_length,
                        speed=False, prompt_tokens=settings.speed_prompt_tokens,
                        new_tokens=settings.speed_new_tokens, batch_sizes=settings.speed_batch_sizes,
                        repeats=settings.speed_repeats, tasks=tuple(tasks or ()), task_limit=limit)


@dataclass
class Evidence:
    """Base vs pruned as the page and the card show it."""

    comparison: Comparison
    prompt: str = ""
    generations: tuple[str, str] | None = None  # base, pruned
    disk_bytes: tuple[int | None, int | None] = (None, None)  # safetensors checkpoints, base and pruned

    @property
    def removed_fraction(self) -> float:
        return 1 - self.comparison.ratios["params"]

    @property
    def perplexity_ratio(self) -> float | None:
        return self.comparison.ratios.get("perplexity")

    def damage(self, threshold: float) -> str | None:
        """A warning when the pruned model's perplexity grew more than `threshold` times (None: no warning)."""
        ratio = self.perplexity_ratio
        if ratio is None or ratio <= threshold:
            return None
        b, p = self.comparison.base.perplexity, self.comparison.pruned.perplexity
        return (f"The pruned model is badly damaged: its perplexity grew ×{ratio:,.1f} ({b:,.2f} → {p:,.2f}; "
                f"warning above ×{threshold:g}). It will write much worse text than the base model. Remove less, "
                "try another score or method, or plan for recovery training before using it.")

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(measure, base, pruned, change) rows without the speed (see `speed_markdown`)."""
        rows = [("weights in memory (MB)", *rest) if name == "weights (MB)" else (name, *rest)
                for name, *rest in _without_speed(self.comparison).rows()]
        base, pruned = self.disk_bytes
        if base and pruned:
            rows.insert(1, ("checkpoint (MB)", f"{base / 1e6:,.1f}", f"{pruned / 1e6:,.1f}", f"{pruned / base - 1:+.1%}"))
        return rows


def _without_speed(comparison: Comparison) -> Comparison:
    return dataclasses.replace(comparison, base=dataclasses.replace(comparison.base, speed=None),
                               pruned=dataclasses.replace(comparison.pruned, speed=None))


def compare_speed(base_model, pruned_model, settings: Settings) -> tuple[dict, dict]:
    """Speed of both models, measured by the core (its rules: alternation, repeats; see core.compare)."""
    return speed_pair(base_model, pruned_model, eval_settings(settings), settings.speed_rounds)


def speed_markdown(comparison: Comparison) -> str:
    """The speed part of the results page: whatever the core measured and how the core words it (its rows of the
    comparison that are about speed). The one place where the Space renders speed."""
    speed = comparison.base.speed
    if not speed or not comparison.pruned.speed:
        return ("Speed not measured. Turn on “Measure speed” (4 · Evaluation) to compare both models; on a CPU "
                "it takes longer than the pruning itself.")
    plain = set(_without_speed(comparison).rows())
    rows = "\n".join(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in comparison.rows() if (a, b, c, d) not in plain)
    return (f"| speed | base | pruned | change |\n|---|--:|--:|--:|\n{rows}\n\n"
            f"<small>On {speed.get('device', '?')} ({speed.get('dtype', '?')}), "
            f"{speed.get('prompt_tokens', '?')}-token prompt, {speed.get('new_tokens', '?')} new tokens, both models "
            "measured in the same run: compare the ratios, not the absolute times.</small>")


@torch.no_grad()
def generate(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy continuation of `prompt` (deterministic, so base and pruned are comparable)."""
    if tokenizer is None:
        raise SpaceError("The model has no tokenizer, so it cannot generate text.")
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
