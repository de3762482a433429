"""Pruning methods: each turns a recipe into layer plans for the surgery module. Filled by the submodules.

The contract that lets every method run on a model larger than memory (a streamed model, see core.streaming)
with no special case:

- Get block i with `decoder_layers(ctx.model, ctx.spec)[i]` (or through the runner: `ctx.runner()`,
  `runner.run_layer(i)`, `collect(runner, i, ...)`). Indexing loads a streamed block and releases the block
  loaded before it, so visit blocks in order and finish with one before touching the next; keep no tensors of
  a block (weights, `.float()` copies) beyond the step that uses them.
- For shapes and counts use the config (`layer_shapes`), `count_parameters`, `unit_costs` or `layer_at`:
  they never load a streamed block.
- Change a block through surgery (`prune_layer`, `enable_bias`, `remove_layers`) or by in-place operations on
  its parameters under `torch.no_grad()` (`w.mul_(a)`). A change made through `.data` (`w.data.mul_(a)`) is
  invisible to the streaming store and would be lost. A changed block is written when the next one is loaded,
  and every later pass (a new `ctx.runner()`) reads it back as changed.
- Do not change a block while units are swapped out of it (`units_disabled`): that is for scoring only.
- For logits of the whole model use `pipeline.model_logits` (as `core.utility` does): it reads a streamed model
  once per call instead of once per batch. `model(ids)` also works on a streamed model, one block at a time.
- Token ids go to `input_device(ctx.model)`, not to the embedding's device (a streamed embedding stays on disk).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..architectures import ArchSpec
from ..calibration import check_source, load_calibration
from ..errors import InvalidTargetError, RecipeError
from ..options import build_options
from ..pipeline import LayerwiseRunner
from ..progress import Progress
from ..recipe import Recipe
from ..registry import Registry
from ..scores import Score


@dataclass
class PruneContext:
    """What a method works with; calibration data is loaded on first use."""

    model: nn.Module
    tokenizer: Any
    spec: ArchSpec
    recipe: Recipe
    progress: Progress
    store_device: str | None = None  # where hidden states wait between blocks (None: the compute device)
    _calibration: torch.Tensor | None = field(default=None, repr=False)
    cache: dict = field(default_factory=dict, repr=False)  # statistics a score computes once per run

    def calibration_ids(self) -> torch.Tensor:
        if self._calibration is None:
            self._calibration = load_calibration(self.tokenizer, self.recipe.calibration)
        return self._calibration

    def runner(self) -> LayerwiseRunner:
        return LayerwiseRunner(self.model, self.spec, self.calibration_ids(), self.recipe.batch_size,
                               self.store_device)

    def layer_seed(self, layer_idx: int) -> int:
        return self.recipe.seed * 100_003 + layer_idx


class Method:
    """Base class. Subclasses set `name`, `scores` (a registry or None), `default_score` and `Options`."""

    name: ClassVar[str]
    scores: ClassVar[Registry[Score] | None] = None
    default_score: ClassVar[str | None] = None

    @dataclass(frozen=True)
    class Options:
        pass

    def score_name(self, recipe: Recipe) -> str | None:
        return recipe.score or self.default_score

    def score(self, recipe: Recipe) -> Score | None:
        name = self.score_name(recipe)
        return self.scores.get(name) if self.scores is not None and name else None

    def options(self, recipe: Recipe):
        """The recipe's options as this method's typed `Options` (types, ranges and choices checked)."""
        return build_options(self.Options, recipe.options, self.name)

    def describe(self) -> str:
        """What the method removes: the class docstring, else the first sentence of its module's docstring."""
        doc = self.__class__.__doc__ if "__doc__" in vars(self.__class__) else None
        doc = doc or (sys.modules[self.__class__.__module__].__doc__ or "")
        return " ".join(doc.strip().split("\n\n")[0].split()).split(". ")[0].rstrip(".")

    def validate(self, recipe: Recipe) -> None:
        """Raise on anything wrong with the recipe for this method, before any model is touched."""
        if self.scores is None and recipe.score:
            raise RecipeError(f"Method {self.name!r} takes no score (got {recipe.score!r}).")
        self.score(recipe)
        self.options(recipe)
        if (recipe.target.expansion_rate is not None or recipe.target.width is not None) and self.name != "mlp_width":
            raise InvalidTargetError("expansion_rate and width targets apply to MLP width pruning only.")
        if recipe.layers.ratios is not None and recipe.target.ratio is None:
            raise InvalidTargetError("Explicit per-layer ratios set how much each layer loses; they cannot be "
                                     "combined with a parameter or width target. Use `ratio` (it is then ignored) "
                                     "or drop the per-layer ratios.")
        if self.needs_data(recipe):
            check_source(recipe.calibration)

    def canonical(self, recipe: Recipe) -> Recipe:
        """The recipe with its options written in their canonical form (called after `validate`)."""
        return recipe

    def needs_data(self, recipe: Recipe) -> bool:
        score = self.score(recipe)
        return bool(score and score.needs_data)

    def streams(self, recipe: Recipe) -> bool:
        """Whether this recipe can prune a streamed model block by block (else `run_recipe` loads it whole). Scores
        with `stats` read gradients or probes of the whole model (Taylor and the tutorial's scores)."""
        score = self.score(recipe)
        return score is None or getattr(score, "stats", None) is None

    def run(self, ctx: PruneContext) -> dict:
        """Prune `ctx.model` in place; returns a method-specific report (JSON-able) for the recipe output."""
        raise NotImplementedError


METHODS: Registry[Method] = Registry("pruning method")


def register_method(cls: type[Method]) -> type[Method]:
    METHODS.add(cls.name, cls())
    return cls


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (ties broken by lower index)."""
    order = torch.argsort(scores.float().cpu(), descending=True, stable=True)
    return sorted(order[:k].tolist())


from . import depth, heads, slimllm, sparsity, width  # noqa: E402,F401  (fill the registry)
