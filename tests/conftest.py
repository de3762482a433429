"""Tiny random models of every supported family, built from config (no downloads), saved with the reference
tokenizer so that data-driven scores and the CLI can run on them."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per test worker: two workers on a 2-core machine, no oversubscription
    torch.set_num_threads(1)

TOKENIZER_DIR = ROOT / "reference" / "model"
VOCAB = 4096
COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
              num_hidden_layers=4, vocab_size=VOCAB, max_position_embeddings=256)


def _configs():
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    return {
        "llama": lambda: LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=True),
        "llama_mha": lambda: LlamaConfig(**dict(COMMON, num_key_value_heads=4), head_dim=16),
        "mistral": lambda: MistralConfig(**COMMON, head_dim=16, sliding_window=8),
        "qwen2": lambda: Qwen2Config(**COMMON),
        "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
        "phi3": lambda: Phi3Config(**COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gemma2": lambda: Gemma2Config(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
        "gemma3": lambda: Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
                                           layer_types=["sliding_attention", "full_attention"] * 2),
    }


FAMILIES = list(_configs())


@contextlib.contextmanager
def hub_client_online():
    """Let the in-process huggingface_hub client talk HTTP to a local Hub (this conftest sets HF_HUB_OFFLINE=1)
    and keep it off the Xet upload path, which the local Hub does not serve."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = saved


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised tiny model of `family` in eval mode, every parameter (biases and norms too) random."""
    return tiny_from_config(_configs()[family](), seed)


def tiny_from_config(config, seed: int = 0):
    """`tiny_model` of any config (e.g. a family's with one field changed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if p.mean() > 0.5 else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.05)
    return model.eval()


def save_tiny(model, folder: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)
    return folder


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_dir(tmp_path_factory):
    """Factory: a saved tiny model folder of a family (with tokenizer)."""
    def make(family: str = "llama", seed: int = 0) -> Path:
        folder = tmp_path_factory.mktemp(f"tiny-{family}")
        return save_tiny(tiny_model(family, seed), folder)

    return make


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()
