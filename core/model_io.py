"""Loading models safely: Hub id or local folder, safetensors only unless asked, never remote code unless asked,
and per-layer (non-uniform) pruned checkpoints through the same `from_pretrained` machinery."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .architectures import spec_for_config
from .errors import ModelLoadError, PruningError
from .layers import decoder_layer_class, per_layer_construction

logger = logging.getLogger(__name__)

REFERENCE_MODEL = Path(__file__).resolve().parent.parent / "reference" / "model"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. `dtype='auto'` means float32 on CPU and the checkpoint's dtype on accelerators."""

    revision: str | None = None
    subfolder: str | None = None  # a model stored in a folder of the repo (e.g. a bot's PR: pruned/<recipe>)
    token: str | None = field(default=None, repr=False)  # Hub token for private/gated repos (never logged)
    dtype: str = "auto"
    device: str | None = None  # 'cpu', 'cuda', 'cuda:1', ...; default: cuda when available
    device_map: str | None = None  # e.g. 'auto' for models larger than one device
    allow_pickle: bool = False
    trust_remote_code: bool = False
    local_files_only: bool | None = None  # default: the HF_HUB_OFFLINE setting


def resolve_model_name(name: str | None) -> str:
    """`None` means the reference model shipped with the repository."""
    if name:
        return name
    if not (REFERENCE_MODEL / "config.json").exists():
        raise ModelLoadError(f"No model given and the reference model is missing at {REFERENCE_MODEL}. Pass a "
                             "model id or folder, or restore the reference model (see reference/README.md).")
    return str(REFERENCE_MODEL)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(name: str, device: str, config) -> torch.dtype:
    if name == "checkpoint":  # what plain `from_pretrained` gives: the dtype the weights are stored in
        stored = getattr(config, "dtype", None)
        return stored if isinstance(stored, torch.dtype) else _DTYPES.get(str(stored), torch.float32)
    if name == "auto":
        if device.startswith("cpu"):
            return torch.float32
        stored = getattr(config, "dtype", None)
        return stored if isinstance(stored, torch.dtype) else torch.bfloat16
    try:
        return _DTYPES[name]
    except KeyError:
        raise PruningError(f"Unknown dtype {name!r}; use one of auto, checkpoint, {', '.join(_DTYPES)}.") from None


def _hub_kwargs(opts: LoadOptions) -> dict:
    kwargs = {"revision": opts.revision, "trust_remote_code": opts.trust_remote_code}
    if opts.subfolder:
        kwargs["subfolder"] = opts.subfolder
    if opts.token:
        kwargs["token"] = opts.token
    if opts.local_files_only is not None:
        kwargs["local_files_only"] = opts.local_files_only
    return kwargs


@contextlib.contextmanager
def layer_construction(config, spec) -> Iterator[None]:
    """Make model constructors build per-layer sizes when `config` has `per_layer_config`."""
    if not getattr(config, "is_heterogeneous", False):
        yield
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    with per_layer_construction(decoder_layer_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]), spec):
        yield


def load_config(name: str, opts: LoadOptions = LoadOptions()):
    """The model's config, with a clear error when it cannot be found (e.g. offline and not cached)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, **_hub_kwargs(opts))
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{name} needs custom code from its repository. It is not run unless you pass "
                                 "--trust-remote-code (only for repositories you trust).") from err
        raise ModelLoadError(f"Could not read the config of {name}: {err}") from err
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or opts.local_files_only
        where = "it is not in the local cache and the Hub is offline" if offline else str(err).splitlines()[0]
        raise ModelLoadError(f"Could not load {name!r}: {where}. Pass a local folder that contains config.json "
                             f"and *.safetensors, or download it first (e.g. `hf download {name}`).") from err


def _check_weights_format(name: str, allow_pickle: bool, subfolder: str | None = None) -> None:
    path = Path(name) / (subfolder or "")
    if not path.is_dir() or allow_pickle:
        return
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise ModelLoadError(f"{name} has only pickle weights (*.bin/*.pt), which can run arbitrary code when "
                                 "loaded. Convert them to safetensors, or pass --allow-pickle if you trust the source.")
        raise ModelLoadError(f"{name} has no *.safetensors weights.")


def load_model(name: str | None = None, opts: LoadOptions = LoadOptions()):
    """Load a supported causal LM and its tokenizer (None when the repo has none).

    Works for plain checkpoints and for our per-layer (non-uniform) pruned ones alike.
    """
    from transformers import AutoModelForCausalLM

    name = resolve_model_name(name)
    config = load_config(name, opts)
    spec = spec_for_config(config)
    _check_weights_format(name, opts.allow_pickle, opts.subfolder)
    device = opts.device or default_device()
    kwargs = dict(_hub_kwargs(opts), config=config, dtype=_torch_dtype(opts.dtype, device, config),
                  use_safetensors=None if opts.allow_pickle else True)
    if opts.device_map:
        kwargs["device_map"] = opts.device_map
    try:
        with layer_construction(config, spec):
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as err:
        hint = " Pass --allow-pickle to accept pickle weights from a source you trust." if "safetensors" in str(
            err) and not opts.allow_pickle else ""
        raise ModelLoadError(f"Could not load the weights of {name!r}: {str(err).splitlines()[0]}{hint}") from err
    if not opts.device_map:
        model.to(device)
    # the checkpoint's own dtype: exports are written in it, whatever dtype the model was computed in
    stored = getattr(config, "dtype", None)
    model.source_dtype = stored if isinstance(stored, torch.dtype) else _DTYPES.get(str(stored), None)
    model.eval()
    model.config.use_cache = True
    return model, load_tokenizer(name, opts)


def build_empty(config):
    """The model's module tree on the meta device (no weights, no memory): for counting and inspecting."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), layer_construction(config, spec_for_config(config)):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(name: str, opts: LoadOptions = LoadOptions()):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, **_hub_kwargs(opts))
    except (OSError, ValueError, TypeError) as err:
        logger.warning("no usable tokenizer in %s (%s); data-driven scores will need one", name, err)
        return None


def load_pruned(path_or_repo_id: str, **options):
    """Load a checkpoint written by this tool, uniform or per-layer, with one call. Returns the model.

    Keyword options are those of `LoadOptions` (revision, dtype, device, device_map, ...). The default dtype is the
    checkpoint's own, as with `AutoModelForCausalLM.from_pretrained`.
    """
    options.setdefault("dtype", "checkpoint")
    model, _ = load_model(path_or_repo_id, LoadOptions(**options))
    return model
