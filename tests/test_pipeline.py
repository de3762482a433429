"""The layer-by-layer pipeline: block-by-block hidden states equal the model's own forward (position embeddings and
masks of every layer type included), head contributions equal a direct computation, and a pruned block's outputs
are what the next block sees."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

import core
from conftest import TOKENIZER_DIR, tiny_model
from core import CalibrationConfig, Recipe, Target
from core.architectures import spec_for_config
from core.calibration import load_calibration
from core.layer_config import head_dim, layer_shapes
from core.layers import decoder_layers
from core.pipeline import LayerwiseRunner, forward_hooks
from core.scores.mlp import MlpTensors, activation
from core.stats import HeadContributions, InputNorms, collect, linear
from core.surgery import LayerPlan, prune_layer

SEQ = 16  # longer than the tiny models' sliding window (8): local and global masks differ


def _ids(n=3, seed=0):
    return torch.randint(0, 4096, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fam", ["llama", "gemma3", "gemma2", "mistral", "qwen3", "phi3"])
@torch.no_grad()
def test_advancing_through_all_layers_reproduces_the_models_hidden_states(fam):
    model = tiny_model(fam)
    spec = spec_for_config(model.config)
    ids = _ids()
    hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, layer 0 .. n-2 outputs, final norm
    n = model.config.num_hidden_layers
    runner = LayerwiseRunner(model, spec, ids, batch_size=2)  # batches of 2 and 1
    assert [h.shape[0] for h in runner.hidden] == [2, 1]
    torch.testing.assert_close(torch.cat(runner.hidden), hidden[0], atol=1e-5, rtol=1e-5)
    for i in range(n):
        runner.advance(i)
        got = torch.cat(runner.hidden)
        expected = hidden[i + 1] if i < n - 1 else None
        if expected is None:  # the last entry is after the final norm
            got, expected = model.model.norm(got), hidden[n]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{fam} layer {i}")


@torch.no_grad()
def test_gemma3_layer_kwargs_follow_the_layer_types():
    """Each captured block gets the position embeddings and mask of its own layer type."""
    model = tiny_model("gemma3")
    runner = LayerwiseRunner(model, spec_for_config(model.config), _ids(n=1), batch_size=1)
    kwargs = runner.layer_kwargs[0]
    types = model.config.layer_types
    assert types[0] != types[1]
    masks = [kw["attention_mask"] for kw in kwargs]
    # sliding-window layers mask more than full-attention ones, and layers of one type share their mask
    assert not torch.equal(masks[0], masks[1])
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3])
    pos = [kw["position_embeddings"] for kw in kwargs]
    assert not torch.equal(pos[0][0], pos[1][0])  # local and global RoPE bases differ


def _head_contributions_direct(model, spec, layer_idx, ids, num_heads, dh):
    """||Z_h W_O^h^T||_F per head from o_proj's input captured in a plain full forward."""
    o = linear(decoder_layers(model, spec)[layer_idx], spec, "attention", "o")
    captured = []
    with forward_hooks({"o": o}, lambda name, mod, inp, out: captured.append((inp[0].detach(), out.detach()))):
        model(ids)
    z, out = captured[0]
    z = z.flatten(0, 1).view(-1, num_heads, dh)  # [N, H, dh]
    w = o.weight.view(o.weight.shape[0], num_heads, dh)  # [d, H, dh]
    per_head = torch.einsum("nhk,dhk->hnd", z, w)  # [H, N, d]
    # the per-head contributions add up to o_proj's output
    torch.testing.assert_close(per_head.sum(0), out.flatten(0, 1), atol=1e-5, rtol=1e-5)
    return per_head.pow(2).sum(dim=(1, 2)).sqrt()


@pytest.mark.parametrize("fam", ["llama", "gemma3"])
@torch.no_grad()
def test_head_contributions_match_a_direct_computation(fam):
    model = tiny_model(fam)
    spec = spec_for_config(model.config)
    ids = _ids()
    shape, dh = layer_shapes(model.config)[2], head_dim(model.config)
    runner = LayerwiseRunner(model, spec, ids, batch_size=2)
    for i in range(2):
        runner.advance(i)
    stats = HeadContributions(shape.num_attention_heads, dh)
    collect(runner, 2, {"o": (linear(decoder_layers(model, spec)[2], spec, "attention", "o"), stats)})
    expected = _head_contributions_direct(model, spec, 2, ids, shape.num_attention_heads, dh)
    torch.testing.assert_close(stats.norm(), expected, atol=1e-4, rtol=1e-5)
    assert len(set(expected.tolist())) == shape.num_attention_heads  # distinct heads: an ordering bug would show


@pytest.mark.parametrize("fam", ["llama", "gemma2", "phi3"])
@torch.no_grad()
def test_a_forward_stopped_after_o_proj_gives_the_same_statistics_without_running_the_mlp(fam):
    model = tiny_model(fam)
    spec = spec_for_config(model.config)
    shape, dh = layer_shapes(model.config)[1], head_dim(model.config)
    runner = LayerwiseRunner(model, spec, _ids(), batch_size=2)
    runner.advance(0)
    layer = decoder_layers(model, spec)[1]
    o_proj, mlp_calls = linear(layer, spec, "attention", "o"), []
    full, stopped = HeadContributions(shape.num_attention_heads, dh), HeadContributions(shape.num_attention_heads, dh)
    collect(runner, 1, {"o": (o_proj, full)})
    with forward_hooks({"mlp": layer.get_submodule(spec.mlp.module)}, lambda *args: mlp_calls.append(1)):
        assert collect(runner, 1, {"o": (o_proj, stopped)}, stop_after=o_proj) is None
    assert mlp_calls == [] and torch.equal(stopped.norm(), full.norm())
    assert not o_proj._forward_hooks  # the stopping hook is gone: the next forward runs the whole block
    assert len(runner.run_layer(1)) == 2


@pytest.mark.parametrize("fam", ["llama", "gemma3"])
@torch.no_grad()
def test_a_pruned_blocks_outputs_feed_the_next_block(fam):
    model = tiny_model(fam)
    spec = spec_for_config(model.config)
    ids = _ids()
    runner = LayerwiseRunner(model, spec, ids, batch_size=2)
    unpruned = torch.cat(runner.run_layer(0))
    m = layer_shapes(model.config)[0].intermediate_size
    prune_layer(model, spec, 0, LayerPlan(mlp=list(range(0, m, 2))))
    runner.advance(0)  # recomputed with the pruned block 0
    after = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(torch.cat(runner.hidden), after, atol=1e-5, rtol=1e-5)
    assert (after - unpruned).abs().max() > 1e-3  # pruning changed block 0's output: stale inputs would show
    # statistics of block 1 are those of the pruned model
    layer1 = decoder_layers(model, spec)[1]
    norms = InputNorms()
    collect(runner, 1, {"in": (linear(layer1, spec, "mlp", "gate"), norms)})
    captured = []
    with forward_hooks({"g": linear(layer1, spec, "mlp", "gate")},
                       lambda name, mod, inp, out: captured.append(inp[0].flatten(0, 1))):
        model(ids)
    torch.testing.assert_close(norms.norm("in"), captured[0].pow(2).sum(0).sqrt(), atol=1e-4, rtol=1e-5)


@torch.no_grad()
def test_sequential_activation_pruning_equals_a_manual_layer_by_layer_loop():
    """core.prune with the activation score = score each layer on the partially pruned model, prune, continue."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    calib = CalibrationConfig(n_samples=4, seq_len=24, seed=1)
    recipe = Recipe(method="mlp_width", score="activation", target=Target(ratio=0.5), calibration=calib,
                    batch_size=3)
    model = tiny_model("llama")
    manual = copy.deepcopy(model)
    core.prune(model, tokenizer, recipe)

    spec = spec_for_config(manual.config)
    ids = load_calibration(tokenizer, calib)
    for i, shape in enumerate(layer_shapes(manual.config)):
        layer = decoder_layers(manual, spec)[i]
        gate, up, down = (linear(layer, spec, "mlp", r) for r in ("gate", "up", "down"))
        norms = InputNorms()
        with forward_hooks({"in": gate, "down": down}, norms):
            manual(ids)
        scores = activation(MlpTensors(gate.weight, up.weight, down.weight, norms.norm("in"), norms.norm("down")))
        # the highest half by plain sorting (the library's own top-k is under test here, not part of the oracle)
        order = sorted(range(shape.intermediate_size), key=lambda j: (-float(scores[j]), j))
        prune_layer(manual, spec, i, LayerPlan(mlp=sorted(order[:shape.intermediate_size // 2])))

    got, expected = model.state_dict(), manual.state_dict()
    assert got.keys() == expected.keys()
    for key in got:
        assert torch.equal(got[key], expected[key]), key
