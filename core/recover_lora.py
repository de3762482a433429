"""LoRA adapters (through `peft`) on every attention and MLP projection, merged back into the weights before
export so that the result is a plain checkpoint of the pruned shape."""
from __future__ import annotations

import logging

from torch import nn

from .architectures import ArchSpec
from .errors import PruningError

logger = logging.getLogger(__name__)


def lora_targets(spec: ArchSpec) -> list[str]:
    """Module names of the projections adapters go on (separate or fused, as the family's spec names them)."""
    a, m = spec.attention, spec.mlp
    names = [a.qkv] if a.fused else [a.q, a.k, a.v]
    names += [a.o, m.down] + ([m.gate_up] if m.fused else [m.gate, m.up])
    return names


def wrap(model: nn.Module, spec: ArchSpec, rank: int, alpha: float) -> nn.Module:
    """The model with rank-`rank` adapters on every projection; only the adapters are trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise PruningError("LoRA recovery needs the `peft` package (pip install -r requirements.txt).") from err
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=lora_targets(spec))
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA rank %d on %s: %s trainable parameters", rank, ", ".join(config.target_modules), f"{trainable:,}")
    return peft_model


def merge(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights (W += B A * alpha / r) and return the plain model."""
    return peft_model.merge_and_unload()

