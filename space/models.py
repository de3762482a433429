"""Which model to prune: the default (reference) folder or a Hub id, validated before anything is loaded.

Hub models are read with the caller's token and downloaded into the job's own folder (safetensors only), so
gated/private access follows the signed-in user and nothing is left in a shared cache.
"""
from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core.architectures import spec_for_config
from core.layer_config import head_dim, layer_shapes
from core.model_io import REFERENCE_MODEL, build_empty, load_config
from core.params import count_parameters

from .errors import SpaceError
from .settings import Settings

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "README.md"]


@dataclass(frozen=True)
class ModelInfo:
    """A validated model: where it is, what it is, how big."""

    label: str  # shown in the page
    recipe_model: str | None  # what the recipe records: the name the user chose (None: the reference model)
    repo_id: str | None  # Hub id, None for local folders
    path: Path | None  # local folder (None for Hub models until downloaded)
    revision: str | None
    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    params: int
    weight_bytes: int | None

    @property
    def base_name(self) -> str:
        """The base model as recorded in results and cards: the Hub id or the name the user chose, never a path
        on the server."""
        return self.repo_id or self.recipe_model or self.label

    @property
    def short_name(self) -> str:
        if self.repo_id:
            return self.repo_id.split("/")[-1]
        return "reference" if self.path == REFERENCE_MODEL else (self.path.name if self.path else "model")

    def markdown(self) -> str:
        size = f" · {self.weight_bytes / 1e6:,.1f} MB of safetensors" if self.weight_bytes else ""
        return (f"**{self.label}** — {self.family} (`{self.model_type}`), {self.num_layers} layers, hidden "
                f"{self.hidden_size}, {self.heads} query / {self.kv_heads} KV heads of {self.head_dim}, MLP "
                f"{self.mlp} · **{fmt_params(self.params)} parameters**{size} · needs about "
                f"{self.params * 4 / 1e9:,.2f} GB of memory on a CPU (float32)")


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def _describe(config_dir: str, **fields) -> ModelInfo:
    config = load_config(config_dir)
    spec = spec_for_config(config)
    counts = count_parameters(build_empty(config), spec)
    s0 = layer_shapes(config)[0]
    return ModelInfo(family=spec.family, model_type=config.model_type, num_layers=config.num_hidden_layers,
                     hidden_size=config.hidden_size, heads=s0.num_attention_heads, kv_heads=s0.num_key_value_heads,
                     head_dim=head_dim(config), mlp=s0.intermediate_size, params=counts["total"], **fields)


def resolve(text: str | None, settings: Settings, token: str | bool | None = None) -> ModelInfo:
    """Validate the model box: empty = the default model; a Hub id; or (locally only) a folder."""
    text = (text or "").strip()
    if not text:
        path = settings.default_model
        return _local(path, settings, label=settings.default_model_label,
                      recipe_model=None if path == REFERENCE_MODEL else path.name)
    if text.startswith(("/", "./", "../", "~")) or Path(text).is_dir():
        if not settings.allow_local_paths:
            raise SpaceError("Local folders are not accepted here: give a Hub model id such as `org/name`.")
        return _local(Path(text).expanduser().resolve(), settings, label=text, recipe_model=text)
    return _hub(text, settings, token)


def _local(path: Path, settings: Settings, label: str, recipe_model: str | None) -> ModelInfo:
    if not (path / "config.json").is_file():
        hint = (" Set SPACE_DEFAULT_MODEL to a model folder or type a Hub id." if path == settings.default_model
                else "")
        raise SpaceError(f"No model at {label} (config.json missing).{hint}")
    files = list(path.glob("*.safetensors"))
    if not files:
        raise SpaceError(f"{label} has no *.safetensors weights; the Space loads safetensors only.")
    return _describe(str(path), label=label, recipe_model=recipe_model, repo_id=None, path=path, revision=None,
                     weight_bytes=sum(f.stat().st_size for f in files))


def _hub(repo_id: str, settings: Settings, token: str | bool | None) -> ModelInfo:
    from huggingface_hub import HfApi, hf_hub_download

    if not REPO_ID.match(repo_id):
        raise SpaceError(f"{repo_id!r} is not a Hub model id; write it as `org/name`, e.g. "
                         "`HuggingFaceTB/SmolLM2-135M`.")
    api = HfApi(endpoint=settings.endpoint, token=token)
    info = api.model_info(repo_id, files_metadata=True)
    files = {s.rfilename: s.size for s in info.siblings or []}
    if "config.json" not in files:
        if "adapter_config.json" in files:
            raise SpaceError(_adapter_message(repo_id, info.sha, settings, token))
        raise SpaceError(f"{repo_id} has no config.json: it is not a transformers model repository.")
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        raise SpaceError(f"{repo_id} has no safetensors weights (only pickle files such as *.bin, which can run "
                         "code when loaded). The Space loads safetensors only.")
    with tempfile.TemporaryDirectory(prefix="space-config-") as tmp:
        path = hf_hub_download(repo_id, "config.json", revision=info.sha, token=token, cache_dir=tmp,
                               endpoint=settings.endpoint)
        return _describe(str(Path(path).parent), label=repo_id, recipe_model=repo_id, repo_id=repo_id, path=None,
                         revision=info.sha, weight_bytes=sum(files[f] or 0 for f in weights) or None)


def _adapter_message(repo_id: str, revision: str, settings: Settings, token) -> str:
    from huggingface_hub import hf_hub_download

    base = None
    try:
        with tempfile.TemporaryDirectory(prefix="space-config-") as tmp:
            path = hf_hub_download(repo_id, "adapter_config.json", revision=revision, token=token, cache_dir=tmp,
                                   endpoint=settings.endpoint)
            base = json.loads(Path(path).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except Exception as err:  # the message is still useful without the base model's name
        logger.info("could not read the adapter config of %s: %s", repo_id, err)
    on = f" on top of `{base}`" if base else ""
    target = f"`{base}`" if base else "its base model"
    return (f"{repo_id} holds only an adapter (adapter_config.json){on}, not a full model. Prune {target} "
            "instead, or merge the adapter into it and upload the merged model.")


def fetch(info: ModelInfo, dest: Path, settings: Settings, token: str | bool | None = None) -> Path:
    """A local folder with the model's weights, config and tokenizer (Hub models: downloaded into `dest`)."""
    if info.path is not None:
        return info.path
    from huggingface_hub import snapshot_download

    snapshot_download(info.repo_id, revision=info.revision, token=token, local_dir=dest,
                      allow_patterns=DOWNLOAD_PATTERNS, endpoint=settings.endpoint)
    return dest
