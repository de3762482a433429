"""Structured pruning of Hugging Face causal LMs: width (MLP neurons), attention heads (GQA-aware) and depth.

Public API:
    load_model(name, LoadOptions(...)) -> (model, tokenizer)
    prune(model, tokenizer, Recipe) -> PruneResult      # in place
    run_recipe(Recipe) -> PruneResult                   # load + prune
    save_pruned(result, out_dir)                        # atomic export with recipe and card
    load_pruned(path_or_repo_id, **load_options)        # reload uniform or per-layer checkpoints
    Recipe(..., recover=RecoverConfig(steps=200))       # prune, then recovery training (core.recover)
"""
__version__ = "0.1.0"

from .allocation import LayerSelection, Target  # noqa: E402
from .calibration import CalibrationConfig  # noqa: E402
from .errors import PruningError  # noqa: E402
from .export import save_pruned  # noqa: E402
from .model_io import LoadOptions, load_model, load_pruned  # noqa: E402
from .prune import PruneResult, prune, run_recipe  # noqa: E402
from .recipe import LoadConfig, Recipe  # noqa: E402
from .recover_config import RecoverConfig  # noqa: E402

__all__ = ["CalibrationConfig", "LayerSelection", "LoadConfig", "LoadOptions", "PruneResult", "PruningError",
           "Recipe", "RecoverConfig", "Target", "load_model", "load_pruned", "prune", "run_recipe", "save_pruned", "__version__"]
