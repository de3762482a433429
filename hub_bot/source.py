"""What the bot accepts as a source, checked before anything is downloaded (from `model_info`) and after (the
downloaded folder): safetensors weights, a supported architecture, no custom code, under the size limit, not one
of its own variants. Also the hash of a commit's model files and the dtype to publish in."""
from __future__ import annotations

import hashlib
import json
import types
from fnmatch import fnmatch
from pathlib import Path

import torch

from core.architectures import spec_for_config

from .errors import PermanentJobError

# Top-level files only (never a subfolder, e.g. variants of an earlier PR); JSON, weights, tokenizer files, card.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "README.md"]
IGNORE_PATTERNS = ["*/*"]


def _top_level(name: str) -> bool:
    return "/" not in name


def content_key(info) -> str:
    """Hash of the model files (weights, configs, tokenizer) at a commit: equal keys prune to equal variants,
    so a commit that only edits the README republishes nothing."""
    parts = []
    for s in sorted(info.siblings or [], key=lambda s: s.rfilename):
        name = s.rfilename
        if _top_level(name) and name != "README.md" and any(fnmatch(name, p) for p in ALLOW_PATTERNS):
            parts.append(f"{name}:{s.lfs.sha256 if s.lfs else s.blob_id}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def check_source(info, max_params: float) -> None:
    """Refuse, before downloading anything, what the bot must never prune (PermanentJobError)."""
    names = [s.rfilename for s in info.siblings or [] if _top_level(s.rfilename)]
    if "pruning_recipe.yaml" in names:
        raise PermanentJobError(f"{info.id} is itself a pruned variant (it has pruning_recipe.yaml); the bot does "
                                "not prune its own outputs again.")
    weights = [n for n in names if n.endswith(".safetensors")]
    if not weights:
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        raise PermanentJobError(
            f"{info.id} has no *.safetensors weights" + (f" (only pickle files: {', '.join(pickles)}, which the bot "
                                                         "never loads; convert them to safetensors)" if pickles else "")
            + ".")
    config = info.config or {}
    if config.get("auto_map"):
        raise PermanentJobError(f"{info.id} needs custom modeling code (auto_map in config.json); the bot never runs "
                                "repository code.")
    if config.get("model_type"):
        spec_for_config(types.SimpleNamespace(model_type=config["model_type"]))  # UnsupportedArchitectureError
    params = info.safetensors.total if info.safetensors else None
    if params is None:  # no parameter count from the Hub: estimate from the file sizes at 2 bytes per parameter
        params = sum((s.size or 0) for s in info.siblings if s.rfilename in weights) // 2
    if params > max_params:
        raise PermanentJobError(f"{info.id} has {params / 1e9:.2f}B parameters, more than the configured limit of "
                                f"{max_params / 1e9:.2f}B (limits.max_params).")


def check_download(folder: Path) -> dict:
    """The downloaded folder holds a usable model and no reason to run code; returns its config.json."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PermanentJobError("The source has no config.json.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("auto_map"):
        raise PermanentJobError("The source needs custom modeling code (auto_map in config.json); the bot never runs "
                                "repository code.")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise PermanentJobError("The source has no *.safetensors weights at this commit.")
    for path in weights:
        check_safetensors(path)
    return config


def check_safetensors(path: Path) -> None:
    """A file named *.safetensors that is not one (e.g. a pickle renamed) is refused for good, never loaded."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # SafetensorError, or an OS error on a truncated header
        raise PermanentJobError(f"{path.name} is not a safetensors file ({type(err).__name__}: "
                                f"{str(err).splitlines()[0][:200] if str(err) else 'unreadable header'}); the bot "
                                "only loads safetensors weights.") from None


def publish_dtype(setting: str, source_config: dict) -> torch.dtype | None:
    """The dtype to publish the weights in (None: leave them as pruned)."""
    name = (source_config.get("dtype") or source_config.get("torch_dtype")) if setting == "source" else setting
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name))
