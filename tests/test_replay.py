"""core.replay: a block whose MLP lost channels, recomputed from the recordings of its calibration forward, equals a
real forward of the pruned block in every family; the recordings are kept only within the block's size, and the
methods that use them choose and write what they chose without them."""
from __future__ import annotations

import copy

import pytest
import torch

import core
from conftest import FAMILIES, tiny_model
from core import CalibrationConfig, Recipe, Target
from core.architectures import spec_for_config
from core.layer_config import layer_shapes
from core.layers import decoder_layers
from core.pipeline import LayerwiseRunner
from core.replay import MlpReplay
from core.stats import collect
from core.surgery import LayerPlan, prune_layer

SEQ = 16  # longer than the tiny models' sliding window (8): local and global masks differ


def _ids(n=3, seed=0):
    return torch.randint(0, 4096, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_replayed_outputs_equal_a_forward_of_the_pruned_block(fam):
    model = tiny_model(fam)
    spec = spec_for_config(model.config)
    runner = LayerwiseRunner(model, spec, _ids(), batch_size=2)
    runner.advance(0)  # block 1: a later block's keyword arguments (layer types, masks)
    layer = decoder_layers(model, spec)[1]
    m = layer_shapes(model.config)[1].intermediate_size
    replay, wrong = (MlpReplay.start(runner, layer, spec, m) for _ in range(2))
    assert replay is not None and wrong is not None
    hooks = {**replay.hooks(layer), **{f"wrong_{k}": v for k, v in wrong.hooks(layer).items()}}
    unpruned = collect(runner, 1, hooks)
    kept = sorted(set(range(1, m, 3)) | {0, m - 1})
    prune_layer(model, spec, 1, LayerPlan(mlp=kept))
    replayed = replay.outputs(runner, 1, kept)
    shifted = wrong.outputs(runner, 1, list(range(len(kept))))  # the right width, the wrong channels
    forward = runner.run_layer(1)
    assert len(replayed) == len(forward) == 2
    for r, f, u, s in zip(replayed, forward, unpruned, shifted):
        torch.testing.assert_close(r, f, atol=1e-5, rtol=1e-5)
        assert (f - u).abs().max() > 1e-3  # pruning changed the block: replaying the unpruned one would show
        assert (s - f).abs().max() > 1e-3  # which channels are replayed matters
    # the block is whole again: its own modules, no recordings left
    layer = decoder_layers(model, spec)[1]
    assert type(layer.get_submodule(spec.mlp.module)).__name__.endswith("MLP")
    assert replay.attention == [] and replay.down_inputs == []


@torch.no_grad()
def test_recordings_larger_than_the_block_are_not_kept():
    model = tiny_model("llama")
    spec = spec_for_config(model.config)
    layer = decoder_layers(model, spec)[0]
    config = model.config
    block = sum(p.numel() for p in layer.parameters())
    per_token = config.hidden_size + config.intermediate_size
    fits = block // per_token // SEQ  # rows of SEQ tokens whose recordings fit in the block's size
    assert fits >= 2
    assert MlpReplay.start(LayerwiseRunner(model, spec, _ids(fits)), layer, spec, config.intermediate_size)
    assert MlpReplay.start(LayerwiseRunner(model, spec, _ids(fits + 1)), layer, spec,
                           config.intermediate_size) is None


@pytest.mark.parametrize("method,score,options,samples", [
    ("mlp_width", "activation", {}, 4), ("mlp_width", "taylor", {}, 4),
    ("slimllm", None, {}, 4), ("slimllm", None, {"prune_heads": False}, 4),
    ("slimllm", None, {}, 2)])  # 48 tokens < 64 features: the PCA from the recorded outputs
def test_methods_prune_the_same_with_and_without_the_replay(monkeypatch, method, score, options, samples):
    from transformers import AutoTokenizer

    from conftest import TOKENIZER_DIR

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    target = Target(ratio=0.4 if method == "mlp_width" else 0.2)
    recipe = Recipe(method=method, score=score, target=target, options=options,
                    calibration=CalibrationConfig(n_samples=samples, seq_len=24, seed=1), batch_size=3)
    model = tiny_model("llama")
    plain = copy.deepcopy(model)
    starts = []
    real_start = MlpReplay.start

    def counted(*args, **kwargs):
        made = real_start(*args, **kwargs)
        starts.append(made is not None)
        return made

    monkeypatch.setattr(MlpReplay, "start", counted)
    core.prune(model, tokenizer, recipe)
    assert starts and all(starts)  # every pruned MLP was replayed
    monkeypatch.setattr(MlpReplay, "start", lambda *args, **kwargs: None)
    core.prune(plain, tokenizer, recipe)  # the forwards the replay spares
    got, expected = model.state_dict(), plain.state_dict()
    assert got.keys() == expected.keys()
    for key in got:
        assert got[key].shape == expected[key].shape, key  # the same channels and heads were kept
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("bias,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
@torch.no_grad()
def test_kept_output_sums_from_recordings_equal_those_of_a_forward(bias, dtype):
    from core.stats import KeptOutputSums

    torch.manual_seed(0)
    down = torch.nn.Linear(12, 5, bias=bias).to(dtype)
    a = torch.randn(2, 7, 12).to(dtype)
    kept = [0, 3, 4, 8, 11]
    hooked, recorded = KeptOutputSums(kept), KeptOutputSums(kept)
    hooked("down", down, (a,), down(a))
    recorded.add_recorded(a, down(a), down)
    assert recorded.n == hooked.n == 14
    for name in ("sx", "sy", "sxx", "sxy"):
        torch.testing.assert_close(getattr(recorded, name), getattr(hooked, name), rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.allclose(hooked.sx, hooked.sy, rtol=1e-2)  # the kept part differs from the whole output
