"""Structured pruning of Hugging Face causal LMs: width (MLP neurons), attention heads (GQA-aware) and depth; plus
unstructured and N:M sparsity, alone or stacked after a structured stage.

Public API:
    load_model(name, LoadOptions(...)) -> (model, tokenizer)
    prune(model, tokenizer, Recipe) -> PruneResult      # in place
    run_recipe(Recipe) -> PruneResult                   # load + prune, streamed block by block by default
    save_pruned(result, out_dir)                        # atomic export with recipe and card
    load_pruned(path_or_repo_id, **load_options)        # reload uniform or per-layer checkpoints
    estimate_memory(config, recipe, device)             # memory a prune needs, from the config alone
    Recipe(..., recover=RecoverConfig(steps=200))       # prune, then recovery training (core.recover)
"""
__version__ = "0.1.0"

from .allocation import LayerSelection, Target  # noqa: E402
from .calibration import CalibrationConfig  # noqa: E402
from .errors import PruningError  # noqa: E402
from .export import save_pruned  # noqa: E402
from .memory import estimate_memory  # noqa: E402
from .model_io import LoadOptions, load_model, load_pruned  # noqa: E402
from .prune import PruneResult, prune, run_recipe  # noqa: E402
from .recipe import LoadConfig, Recipe, Stage  # noqa: E402
from .recover_config import RecoverConfig  # noqa: E402

__all__ = ["CalibrationConfig", "LayerSelection", "LoadConfig", "LoadOptions", "PruneResult", "PruningError",
           "Recipe", "RecoverConfig", "Stage", "Target", "estimate_memory", "load_model", "load_pruned", "prune",
           "run_recipe", "save_pruned", "__version__"]
