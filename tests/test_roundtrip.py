"""Export and reload for every family: uniform checkpoints reload with plain transformers, per-layer ones with
`core.load_pruned`, and the logits are equal to the pruned in-memory model."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import core
import core.errors
from conftest import logits
from core import LayerSelection, Recipe, Target
from core.export import RECIPE_FILE

EXPECTED_FILES = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", RECIPE_FILE, "README.md"}

UNIFORM = {
    "mlp": dict(method="maw_range", target=Target(ratio=0.25)),
    "heads": dict(method="attention_heads", target=Target(ratio=0.5)),
    "blocks": dict(method="depth", target=Target(ratio=0.25)),
}
PER_LAYER = {
    "mlp_protected": dict(method="mlp_width", score="activation", target=Target(param_ratio=0.03),
                          layers=LayerSelection(protect_first=1)),
    "heads_query": dict(method="attention_heads", score="activation", options={"mode": "query"},
                        target=Target(ratio=0.5), layers=LayerSelection(ratios=(0.0, 0.5, 0.5, 0.0))),
    "attention_sublayers": dict(method="depth", options={"unit": "attention"}, target=Target(ratio=0.5)),
}


def _prune_and_save(tiny_dir, tmp_path, family, kwargs):
    src = tiny_dir(family)
    recipe = Recipe(model=str(src), calibration=core.CalibrationConfig(n_samples=4, seq_len=32), **kwargs)
    result = core.run_recipe(recipe)
    out = core.save_pruned(result, tmp_path / "out")
    return result, out


@pytest.mark.parametrize("case", sorted(UNIFORM))
def test_uniform_reloads_with_plain_transformers(tiny_dir, tmp_path, family, case, tokens):
    result, out = _prune_and_save(tiny_dir, tmp_path, family, UNIFORM[case])
    assert result.uniform
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert "per_layer_config" not in config or not config["per_layer_config"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, tokens), logits(result.model, tokens), atol=1e-5, rtol=0)
    assert result.params_after["total"] < result.params_before["total"]
    doc = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert doc["result"]["params_after"] == sum(p.numel() for p in reloaded.parameters())


@pytest.mark.parametrize("case", sorted(PER_LAYER))
def test_per_layer_reloads_with_load_pruned(tiny_dir, tmp_path, family, case, tokens):
    if family == "llama_mha" and case == "heads_query":
        with pytest.raises(core.errors.InvalidTargetError, match="no GQA"):
            _prune_and_save(tiny_dir, tmp_path, family, PER_LAYER[case])
        assert not (tmp_path / "out").exists()
        return
    result, out = _prune_and_save(tiny_dir, tmp_path, family, PER_LAYER[case])
    assert not result.uniform
    config = json.loads((out / "config.json").read_text())
    assert config["per_layer_config"], "per-layer sizes must be described in transformers' format"
    reloaded = core.load_pruned(str(out), device="cpu")
    torch.testing.assert_close(logits(reloaded, tokens), logits(result.model, tokens), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == result.params_after["total"]
    # the reloaded copy describes itself the same way and survives a second round trip
    assert reloaded.config.to_dict()["per_layer_config"] == result.model.config.to_dict()["per_layer_config"]


def test_export_writes_the_source_checkpoint_dtype(tmp_path):
    """The bf16 reference model is pruned in float32 on a CPU but written back in bf16; the in-memory model keeps
    its float32 weights (test_streaming covers the same for streamed runs)."""
    result = core.run_recipe(Recipe(method="maw", target=Target(ratio=0.3)), stream=False)
    assert next(result.model.parameters()).dtype == torch.float32
    out = core.save_pruned(result, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    assert next(result.model.parameters()).dtype == torch.float32
    for (name, a), (_, b) in zip(result.model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_sharded_per_layer_checkpoint_reloads(tiny_dir, tmp_path, tokens):
    src = tiny_dir("qwen3")
    result = core.run_recipe(Recipe(model=str(src), method="mlp_width", target=Target(ratio=0.25),
                                    layers=LayerSelection(protect_last=1)))
    out = core.save_pruned(result, tmp_path / "out", max_shard_size="300KB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    reloaded = core.load_pruned(str(out), device="cpu")
    torch.testing.assert_close(logits(reloaded, tokens), logits(result.model, tokens), atol=1e-5, rtol=0)
