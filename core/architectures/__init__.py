"""Architecture specs: one small YAML file per model family says where the prunable tensors live.

A spec names the decoder-layer list, the attention and MLP projections (separate or fused), the norms around
each branch and the config flags that add biases. Everything else (slicing, skipping, counting) is generic code
driven by these names. Add a family by adding a YAML file here; no Python change is needed when the family follows
the Llama layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import UnsupportedArchitectureError
from ..registry import Registry


@dataclass(frozen=True)
class AttentionSpec:
    o: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused rows: [q heads | k heads | v heads]
    module: str = "self_attn"

    @property
    def fused(self) -> bool:
        return self.qkv is not None


@dataclass(frozen=True)
class MlpSpec:
    down: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None  # fused rows: [gate | up]
    module: str = "mlp"

    @property
    def fused(self) -> bool:
        return self.gate_up is not None


@dataclass(frozen=True)
class ArchSpec:
    """Where the prunable parts of one model family live (all paths relative to a decoder layer)."""

    family: str
    model_types: tuple[str, ...]
    attention: AttentionSpec
    mlp: MlpSpec
    norms: dict[str, str] = field(default_factory=dict)
    layers: str = "model.layers"
    # config flags that give the attention / MLP projections biases (absent: the family cannot hold one)
    bias_flags: dict[str, str] = field(default_factory=dict)
    # config lists with one entry per decoder layer, kept in step when blocks are removed
    per_layer_lists: tuple[str, ...] = ("layer_types",)

    def branch_module(self, branch: str) -> str:
        """Name of the module whose output joins the residual stream for `branch` ('attention' or 'mlp')."""
        out_norm = self.norms.get(f"{branch}_out")
        if out_norm:
            return out_norm
        return self.attention.module if branch == "attention" else self.mlp.module


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")


def _load_spec(path: Path) -> ArchSpec:
    raw = yaml.safe_load(path.read_text())
    return ArchSpec(
        family=raw["family"],
        model_types=tuple(raw["model_types"]),
        attention=AttentionSpec(**raw["attention"]),
        mlp=MlpSpec(**raw["mlp"]),
        norms=dict(raw.get("norms", {})),
        layers=raw.get("layers", "model.layers"),
        bias_flags=dict(raw.get("bias_flags", {})),
        per_layer_lists=tuple(raw.get("per_layer_lists", ("layer_types",))),
    )


for _path in sorted(Path(__file__).parent.glob("*.yaml")):
    _spec = _load_spec(_path)
    ARCHITECTURES.add(_spec.family, _spec)

_BY_MODEL_TYPE = {mt: spec for _, spec in ARCHITECTURES.items() for mt in spec.model_types}

_HINTS = {
    "gemma3": "Gemma 3 multimodal checkpoints are not supported; use a text-only Gemma 3 (model_type 'gemma3_text').",
}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def spec_for_config(config) -> ArchSpec:
    """The spec for a transformers config; a clear error naming the supported model types otherwise."""
    model_type = getattr(config, "model_type", None)
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        hint = _HINTS.get(model_type)
        raise UnsupportedArchitectureError(
            f"Model type {model_type!r} is not supported.{' ' + hint if hint else ''} Supported model types: "
            f"{', '.join(supported_model_types())}. To add a family with the Llama layout, add a YAML file to "
            f"core/architectures/."
        )
    return spec
