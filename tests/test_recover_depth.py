"""Learned depth recovery: a low-rank stand-in h <- h + B A x + c trained with MSE against the removed unit's update,
and mean-update constants trained end to end; both stored in the checkpoint and reloaded with equal logits."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import core
from conftest import logits, save_tiny, tiny_model
from recover_fixtures import one_thread, tokenizer  # noqa: F401  (fixtures)
from core import Recipe, Target
from core.layer_config import layer_shapes
from core.recover_depth import fit_lowrank, folded_targets



def test_fit_lowrank_recovers_a_planted_low_rank_update():
    gen = torch.Generator().manual_seed(0)
    n, d, r = 2048, 32, 3
    x = torch.randn(n, d, generator=gen)
    a0, b0, c0 = torch.randn(r, d, generator=gen), torch.randn(d, r, generator=gen), torch.randn(d, generator=gen)
    y = x @ a0.T @ b0.T + c0
    a, b, c, fit = fit_lowrank(x, y, y.mean(0), rank=r, steps=1500, lr=3e-2)
    before, after = fit["relative_mse"]
    assert before == pytest.approx(1.0, abs=0.05)  # the mean update explains nothing of a zero-mean linear map
    assert after < 1e-3
    torch.testing.assert_close((x @ a.T) @ b.T + c, y, atol=0.1, rtol=0.05)
    # a rank too small cannot fit it, but is never worse than the mean it starts from
    _, _, _, small = fit_lowrank(x, y, y.mean(0), rank=1, steps=300, lr=3e-2)
    assert after < small["relative_mse"][1] <= small["relative_mse"][0]


def test_folded_targets_renumber_after_deletions():
    # blocks 1 and 3 removed and folded into 0 and 2; block 2 becomes index 1 once block 1 is deleted
    assert folded_targets([1, 3], [1, 3], []) == [0, 1]
    assert folded_targets([1, 2], [1, 2], []) == [0]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("depth-src"))


def _depth(src, unit, recovery, **options):
    return core.run_recipe(Recipe(method="depth", target=Target(ratio=0.5), model=str(src),
                                  options={"unit": unit, "layers": [1, 2], "recovery": recovery,
                                           "recovery_steps": 60, **options}))


@pytest.mark.parametrize("unit,source", [("block", "unpruned"), ("attention", "pruned")])
def test_lowrank_recovery_is_stored_and_reloads(src, tmp_path, unit, source):
    mean = _depth(src, unit, "mean_update", recovery_source=source)
    result = _depth(src, unit, "lowrank", recovery_source=source, recovery_rank=4)
    fits = result.report["recovery"]["fits"]
    assert set(fits) == {"1", "2"} and all(f["relative_mse"][1] < f["relative_mse"][0] for f in fits.values())
    shapes = layer_shapes(result.model.config)
    assert [s.skip_rank for s in shapes] == [0, 4, 4, 0]
    adapters = [p for n, p in result.model.named_parameters() if ".adapter_" in n]
    assert len(adapters) == 4 and sum(p.numel() for p in adapters) == 2 * 2 * 64 * 4  # two units, A and B, rank 4
    out = core.save_pruned(result, tmp_path / "out")
    reloaded = core.load_pruned(str(out))
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(reloaded, ids), logits(result.model, ids))
    assert not torch.allclose(logits(reloaded, ids), logits(mean.model, ids))  # the adapters do something


def test_learned_bias_trains_the_folded_constants(src, tmp_path):
    mean = _depth(src, "block", "mean_update")
    result = _depth(src, "block", "learned_bias")
    rec = result.report["recovery"]
    assert rec["folded_into_previous_mlp_bias"] == [1, 2] and rec["trained_constants"] == 1
    before, after = rec["final_state_relative_mse"]
    assert after < before
    bias = result.model.model.layers[0].mlp.down_proj.bias
    assert not torch.equal(bias, mean.model.model.layers[0].mlp.down_proj.bias)
    assert not any(p.requires_grad for p in result.model.parameters())
    out = core.save_pruned(result, tmp_path / "out")
    assert result.uniform  # folded constants keep the checkpoint uniform: plain transformers loads it
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(reloaded, ids), logits(result.model, ids))
