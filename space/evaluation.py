"""The evidence shown next to a pruned model, measured through `core.compare` (the same definition as the CLI and
the bot): parameters and size, perplexity, optional lm-eval scores; plus what only the Space shows: greedy sample
generations for the user's prompt, and speed measured with both models in memory, in alternation."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from core.compare import Comparison, EvalSettings, Measurement, measure, speed_pair

from .errors import SpaceError
from .settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["Comparison", "Evidence", "Measurement", "compare_speed", "eval_settings", "generate", "measure"]


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

    def rows(self) -> list[tuple[str, str, str, str]]:
        rows = [("weights in memory (MB)", *rest) if name == "weights (MB)" else (name, *rest)
                for name, *rest in self.comparison.rows()]
        base, pruned = self.disk_bytes
        if base and pruned:
            rows.insert(1, ("checkpoint (MB)", f"{base / 1e6:,.1f}", f"{pruned / 1e6:,.1f}", f"{pruned / base - 1:+.1%}"))
        return rows


def compare_speed(base_model, pruned_model, settings: Settings) -> tuple[dict, dict]:
    """Speed of both models, measured in alternation by the core (best of `speed_rounds` rounds each)."""
    return speed_pair(base_model, pruned_model, eval_settings(settings), settings.speed_rounds)


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
