"""Measuring a base model and its variant through `core.compare` (the same definition as the CLI and the Space),
with the bot's settings; the base model's measurement is kept while the jobs of one source commit run."""
from __future__ import annotations

from core.compare import Comparison, Measurement, measure

from .config import EvalSettings


class Evaluator:
    def __init__(self, settings: EvalSettings):
        self.settings = settings.to_core()
        self._base: dict[tuple, Measurement] = {}

    def base(self, key: tuple, model, tokenizer) -> Measurement:
        """The base model's measurement for `key` (repo, sha, dtype), measured once per source commit."""
        if key not in self._base:
            self._base = {key: measure(model, tokenizer, self.settings)}  # one source at a time
        return self._base[key]

    def compare(self, base: Measurement, pruned_model, tokenizer) -> Comparison:
        return Comparison(base, measure(pruned_model, tokenizer, self.settings), self.settings)


def summary(comparison: Comparison) -> dict:
    """The evaluation as stored in pruning_recipe.yaml and the job table (JSON-able)."""
    doc = comparison.to_dict()
    doc["ratios"] = {k: round(v, 4) for k, v in doc["ratios"].items()}
    return doc
