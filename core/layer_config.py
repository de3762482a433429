"""Per-layer sizes in transformers configs: read them, and write them back as a uniform config when every layer
agrees (plain `from_pretrained` reloads it) or as transformers' `per_layer_config` overrides otherwise."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

SIZE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


@dataclass
class LayerShape:
    """The prunable sizes of one decoder layer."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    skip: list[str] = field(default_factory=list)
    skip_bias: list[str] = field(default_factory=list)
    skip_rank: int = 0  # rank of the learned low-rank map of the skip_bias branches (0: constant only)

    def overrides(self) -> dict:
        out = {k: getattr(self, k) for k in SIZE_KEYS}
        if self.skip:
            out["skip"] = sorted(self.skip)
        if self.skip_bias:
            out["skip_bias"] = sorted(self.skip_bias)
        if self.skip_rank:
            out["skip_rank"] = self.skip_rank
        return out


def _global(config, key, default=None):
    getter = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return getter(key, default) if getter else getattr(config, key, default)


def head_dim(config) -> int:
    return _global(config, "head_dim") or config.hidden_size // _global(config, "num_attention_heads")


def layer_shape(config, layer_idx: int) -> LayerShape:
    cfg = config.per_layer_config[layer_idx] if getattr(config, "is_heterogeneous", False) else config
    heads = cfg.num_attention_heads
    return LayerShape(
        num_attention_heads=heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        intermediate_size=cfg.intermediate_size,
        skip=list(getattr(cfg, "skip", None) or []),
        skip_bias=list(getattr(cfg, "skip_bias", None) or []),
        skip_rank=int(getattr(cfg, "skip_rank", 0) or 0),
    )


def layer_shapes(config) -> list[LayerShape]:
    return [layer_shape(config, i) for i in range(config.num_hidden_layers)]


def layer_config(config, shape: LayerShape):
    """A stand-alone config for one layer with `shape` applied (what the layer's constructor reads)."""
    dim = head_dim(config)
    cfg = copy.copy(config)
    cfg.head_dim = dim  # several families derive it from hidden_size / heads, which pruning changes
    cfg.__dict__.pop("_heterogeneity_spec", None)
    cfg.__dict__.pop("allow_global_per_layer_attribute_access", None)
    for key, value in shape.overrides().items():
        setattr(cfg, key, value)
    if not shape.skip:
        cfg.skip = []
    return cfg


def _validates(config) -> bool:
    validate = getattr(config, "validate", None)
    if validate is None:
        return True
    try:
        validate()
    except Exception as err:  # the family's own config checks (e.g. hidden_size % heads) refused it
        logger.debug("config validation refused uniform sizes: %s", err)
        return False
    return True


def write_layer_shapes(config, shapes: list[LayerShape]) -> bool:
    """Store `shapes` in `config` (in place). Returns True when the result is uniform (no per_layer_config).

    `head_dim` is always written explicitly, because several families derive it from hidden_size / heads.
    A size shared by every layer becomes the global value when the family's config validation accepts it;
    anything else goes to `per_layer_config`, and the global values stay the original, valid ones.
    """
    assert len(shapes) == config.num_hidden_layers, "one shape per layer"
    config.head_dim = head_dim(config)
    originals = {k: _global(config, k) for k in SIZE_KEYS}
    config.per_layer_config = None
    config.__dict__.pop("allow_global_per_layer_attribute_access", None)

    per_layer_keys = set()
    for key in SIZE_KEYS:
        values = {getattr(s, key) for s in shapes}
        if len(values) == 1:
            setattr(config, key, values.pop())
        else:
            per_layer_keys.add(key)
    if not _validates(config):
        for key in SIZE_KEYS:
            setattr(config, key, originals[key])
            per_layer_keys.add(key)
        per_layer_keys = {k for k in per_layer_keys if len({getattr(s, k) for s in shapes}) > 1
                          or getattr(shapes[0], k) != originals[k]}

    has_skips = any(s.skip for s in shapes)
    if any(s.skip_bias for s in shapes):
        config.skip_bias = []  # transformers wants a global default for every per-layer attribute
    if any(s.skip_rank for s in shapes):
        config.skip_rank = 0
    if not per_layer_keys and not has_skips:
        return True
    overrides = {}
    for i, shape in enumerate(shapes):
        entry = {k: getattr(shape, k) for k in sorted(per_layer_keys)}
        entry.update({k: v for k, v in shape.overrides().items() if k in ("skip", "skip_bias", "skip_rank")})
        overrides[i] = entry
    # per-layer attributes are read from layer configs; the flag lets transformers' own config validation read
    # the (valid) global values instead of refusing the config
    config.allow_global_per_layer_attribute_access = True
    config.per_layer_config = overrides
    return False
