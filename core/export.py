"""Writing a pruned model to a folder: weights (safetensors, sharded), config, tokenizer, generation config,
pruning_recipe.yaml and a model card. Everything is written to a temporary folder next to the target and moved
into place at the end, so a failure never leaves a half-written output."""
from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import yaml

from .card import base_license, model_card
from .errors import OutputExistsError
from .prune import PruneResult

logger = logging.getLogger(__name__)

RECIPE_FILE = "pruning_recipe.yaml"


def load_snippet(result: PruneResult, repo: str) -> str:
    if result.uniform:
        return ("from transformers import AutoModelForCausalLM\n"
                f"model = AutoModelForCausalLM.from_pretrained({repo!r})")
    return ("# per-layer sizes: load with the pruning tool (plain transformers does not build per-layer layers yet)\n"
            "import core\n"
            f"model = core.load_pruned({repo!r})")


def recipe_document(result: PruneResult) -> dict:
    """The content of pruning_recipe.yaml: the recipe that was run plus its measured result."""
    doc = result.recipe.to_dict()
    doc["result"] = result.summary()
    return doc


def check_output(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The resolved output folder; raises when it exists and overwriting was not asked for (check before pruning)."""
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists. Choose another --out folder or pass --overwrite.")
    return out


def temp_folder(out: Path) -> Path:
    """The temporary folder an output is written in, next to it (renamed to `out` at the end). Not created here:
    the caller's mkdir honours the umask (tempfile.mkdtemp's 0700 mode would stay on the final folder)."""
    return out.parent / f".{out.name}.{uuid.uuid4().hex[:12]}.tmp"


def _is_temp_of(folder: Path | None, out: Path) -> bool:
    return folder is not None and folder.parent == out.parent and folder.name.startswith(f".{out.name}.") \
        and folder.name.endswith(".tmp")


def save_pruned(result: PruneResult, out_dir: str | os.PathLike, overwrite: bool = False,
                max_shard_size: str = "2GB", repo_name: str | None = None, extra_files: dict | None = None) -> Path:
    """Write the pruned model to `out_dir` atomically. Returns the final path.

    A streamed result (see core.streaming) already wrote its changed blocks, into the temporary folder of this
    output when `run_recipe` was given it: that folder is completed and moved into place, and the result's
    model then streams from the output."""
    out = check_output(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stream = getattr(result.model, "core_stream", None)
    if stream is not None and _is_temp_of(stream.work, out):
        tmp = stream.work
    else:
        tmp = temp_folder(out)
        tmp.mkdir()
    try:
        _write(result, tmp, max_shard_size, repo_name or out.name, extra_files or {})
        if out.exists():
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if stream is not None and stream.work == tmp:  # the run's blocks were in the deleted folder
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


def _write(result: PruneResult, folder: Path, max_shard_size: str, repo_name: str, extra_files: dict) -> None:
    model = result.model
    _save_weights(model, folder, max_shard_size)
    if result.tokenizer is not None:
        result.tokenizer.save_pretrained(folder)
    doc = recipe_document(result)
    recipe_yaml = yaml.safe_dump(doc, sort_keys=False)
    (folder / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    summary = dict(doc["result"], method=result.recipe.method, score=result.recipe.score,
                   license=base_license(result.base_model, result.base_revision))
    card = model_card(summary, yaml.safe_dump(result.recipe.to_dict(), sort_keys=False), repo_name,
                      load_snippet(result, repo_name))
    card.save(folder / "README.md")
    for name, content in extra_files.items():
        (folder / name).write_text(content, encoding="utf-8")
