"""Writing a pruned model to a folder: weights (safetensors, sharded), config, tokenizer, generation config,
pruning_recipe.yaml and a model card. Everything is written to a temporary folder next to the target and moved
into place at the end, so a failure never leaves a half-written output."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from .card import base_license, is_local_name, model_card, public_model_name, sparsity_section, stage_names
from .errors import RecipeError
from .prune import PruneResult
from .staging import check_target, is_staging_of, staged_output

logger = logging.getLogger(__name__)

RECIPE_FILE = "pruning_recipe.yaml"


def load_snippet(result: PruneResult, repo: str, sparse_format: str = "dense") -> str:
    if sparse_format == "compressed":
        return ("# compressed sparse weights: transformers 5 no longer decompresses this compressed-tensors format\n"
                "import core\n"
                f"model = core.load_pruned({repo!r})")
    if result.uniform:
        return ("from transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained({repo!r})")
    return ("# per-layer sizes: load with the pruning tool (plain transformers does not build per-layer layers yet)\n"
            "import core\n"
            f"model = core.load_pruned({repo!r})")


def recipe_document(result: PruneResult, folder: str | os.PathLike | None = None) -> dict:
    """The content of pruning_recipe.yaml: the recipe that was run plus its measured result."""
    doc = public_recipe(result.recipe, folder)
    doc["result"] = result.summary()
    return doc


def public_recipe(recipe, folder: str | os.PathLike | None = None) -> dict:
    """The recipe as written into `folder`: a local model or calibration file given as an absolute path is written
    relative to `folder` (`Recipe.from_file` resolves it back), so no absolute path of this machine is recorded."""
    doc = recipe.to_dict()
    doc["model"] = _portable(doc.get("model"), folder)
    if "calibration" in doc:
        doc["calibration"]["source"] = _portable(doc["calibration"]["source"], folder)
    return doc


def _portable(name: str | None, folder) -> str | None:
    if not name or not is_local_name(name) or not Path(name).expanduser().is_absolute():
        return name  # a Hub id, 'builtin', or a relative path exactly as the user gave it
    if folder is None:
        return public_model_name(name)
    rel = Path(os.path.relpath(Path(name).expanduser(), Path(folder).resolve())).as_posix()
    return rel if rel.startswith(".") else f"./{rel}"


def check_output(out_dir: str | os.PathLike, overwrite: bool = False, protect: tuple = ()) -> Path:
    """The resolved output folder; raises when it exists and overwriting was not asked for, when overwriting would
    delete a `protect`ed path (the input model) and when it cannot be written (check before pruning)."""
    return check_target(out_dir, overwrite, protect)


def save_pruned(result: PruneResult, out_dir: str | os.PathLike, overwrite: bool = False,
                max_shard_size: str = "2GB", repo_name: str | None = None, extra_files: dict | None = None,
                sparse_format: str = "dense") -> Path:
    """Write the pruned model to `out_dir` atomically (see `core.staging`). Returns the final path.

    A streamed result (see core.streaming) already wrote its changed blocks, into the staging folder of this
    output when `run_recipe` was given it: that folder is completed and moved into place, and the result's
    model then streams from the output.

    sparse_format: 'dense' (zeros stored as such) or 'compressed' (compressed-tensors bitmask formats for the
    linears that hold zeros; see core.sparse_format)."""
    check_sparse_format(result.recipe, sparse_format)
    out = check_output(out_dir, overwrite)
    stream = getattr(result.model, "core_stream", None)
    adopt = stream.work if stream is not None and is_staging_of(stream.work, out) else None
    try:
        with staged_output(out, overwrite, adopt=adopt) as tmp:
            _write(result, tmp, max_shard_size, repo_name or out.name, extra_files or {}, out, sparse_format)
    except BaseException:
        if adopt is not None:  # the run's written blocks were in the removed folder
            stream.close()
        raise
    if stream is not None:  # the written blocks are in the output now: stream from there
        stream.reopen(out)
    logger.info("wrote %s", out)
    return out


def _save_weights(model, folder: Path, max_shard_size: str) -> None:
    """save_pretrained (always safetensors in transformers 5) in the source checkpoint's dtype when it is known:
    a bf16 model pruned in float32 on a CPU is written back in bf16. The in-memory model keeps its own tensors."""
    if getattr(model, "core_stream", None) is not None:
        _save_streamed(model, folder, max_shard_size)
        return
    target = getattr(model, "source_dtype", None)
    params = [p for p in model.parameters() if p.is_floating_point()]  # tied weights appear once
    if target is None or not params or all(p.dtype == target for p in params):
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        return
    originals = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.to(target)
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    finally:
        for p, data in zip(params, originals):
            p.data = data
        model.config.dtype = originals[0].dtype


def _save_streamed(model, folder: Path, max_shard_size: str) -> None:
    """A streamed model's shards (one per decoder block, see BlockStore.write_weights), config and generation
    config, as save_pretrained would write them."""
    from transformers.utils.hub import convert_file_size_to_int

    if model.source_dtype is not None:  # the dtype to publish in (e.g. the bot's publish_dtype)
        model.core_stream.source_dtype = model.source_dtype
    model.core_stream.write_weights(folder, convert_file_size_to_int(max_shard_size))
    config = model.config
    saved = config.dtype, config.architectures
    config.architectures = [type(model).__name__]
    if model.source_dtype is not None:
        config.dtype = model.source_dtype
    try:
        config.save_pretrained(folder)
    finally:
        config.dtype, config.architectures = saved
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)


def check_sparse_format(recipe, sparse_format: str) -> None:
    """Raise unless `sparse_format` is known and, when compressed, the recipe has a sparsity stage."""
    from .sparse_format import COMPRESSED, FORMATS

    if sparse_format not in FORMATS:
        raise RecipeError(f"Unknown sparse format {sparse_format!r}; use one of {', '.join(FORMATS)}.")
    if sparse_format == COMPRESSED and not any(s.method == "sparsity" for s in recipe.stages()):
        raise RecipeError("Only a recipe with a sparsity stage leaves zeros to compress; drop --compressed.")


def _write(result: PruneResult, folder: Path, max_shard_size: str, repo_name: str, extra_files: dict,
           final_folder: Path, sparse_format: str = "dense") -> None:
    model = result.model
    _save_weights(model, folder, max_shard_size)
    if sparse_format == "compressed":
        from torch import nn

        from .sparse_format import write_compressed

        write_compressed(folder, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    if result.tokenizer is not None:
        result.tokenizer.save_pretrained(folder)
    doc = recipe_document(result, final_folder)
    if "sparsity" in doc["result"]:
        from .methods.sparsity import recipe_structure
        from .sparse_format import describe_sparsity

        describe_sparsity(folder, doc["result"]["sparsity"], recipe_structure(result.recipe), sparse_format)
    recipe_yaml = yaml.safe_dump(doc, sort_keys=False)
    (folder / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    summary = dict(doc["result"], method=result.recipe.method, score=result.recipe.score,
                   license=base_license(result.base_model, result.base_revision), stages=stage_names(result.recipe),
                   sparse_format=sparse_format)
    card = model_card(summary, yaml.safe_dump(public_recipe(result.recipe, final_folder), sort_keys=False), repo_name,
                      load_snippet(result, repo_name, sparse_format))
    if "sparsity" in doc["result"]:
        from .sparse_format import folder_report

        card.text = card.text.rstrip() + "\n\n" + sparsity_section(doc["result"]["sparsity"], result.recipe,
                                                                   folder_report(folder, count_dense_zeros=False),
                                                                   sparse_format)
    card.save(folder / "README.md")
    for name, content in extra_files.items():
        (folder / name).write_text(content, encoding="utf-8")
