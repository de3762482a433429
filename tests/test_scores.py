"""Importance scores against hand-computed values on small explicit tensors, and the calibration statistics the
data-driven scores consume against the same quantities computed without the pipeline."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from core.architectures import spec_for_config
from core.layers import decoder_layers
from core.pipeline import LayerwiseRunner
from core.scores import DEPTH_SCORES, HEAD_SCORES, MLP_SCORES
from core.scores.heads import AttentionTensors, group_scores
from core.scores.mlp import MlpTensors
from core.stats import InputNorms, collect, linear

# two neurons (m = 2) over a hidden size of three (d = 3)
GATE = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.5, -0.5]])
UP = torch.tensor([[-1.0, 2.0, 0.0], [4.0, -1.0, 1.0]])
DOWN = torch.tensor([[1.0, 0.0], [-2.0, 1.0], [2.0, 2.0]])  # [d, m]: column j belongs to neuron j


def mlp_score(name: str, **stats) -> torch.Tensor:
    return MLP_SCORES.get(name).fn(MlpTensors(GATE, UP, DOWN, **stats))


@pytest.mark.parametrize("name,expected", [
    # max |gate row| + max |up row|
    ("maw", [3 + 2, 0.5 + 4]),
    # (max + |min|) of the gate row + the same for the up row
    ("maw_range", [(2 + 3) + (2 + 1), (0.5 + 0.5) + (4 + 1)]),
    # population variances: gate [1,-3,2] -> 14/3, up [-1,2,0] -> 14/9; gate [.5,.5,-.5] -> 2/9, up [4,-1,1] -> 38/9
    ("vow", [14 / 3 + 14 / 9, 2 / 9 + 38 / 9]),
    # L1(gate row) * L1(up row)
    ("pon", [6 * 3, 1.5 * 6]),
    # L2 of gate row + L2 of up row + L2 of down column
    ("l2", [math.sqrt(14) + math.sqrt(5) + 3, math.sqrt(0.75) + math.sqrt(18) + math.sqrt(5)]),
])
def test_mlp_weight_scores_by_hand(name, expected):
    torch.testing.assert_close(mlp_score(name), torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert not MLP_SCORES.get(name).needs_data


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["maw", "maw_range", "vow", "pon", "l2"])
def test_mlp_weight_scores_of_half_weights_equal_float32_bit_for_bit(name, dtype):
    """A model streamed in its bf16/fp16 dtype scores exactly as the float32 model: maw/maw_range take row extremes
    in the stored dtype (no float32 copy at all), the others cast the matrices they read."""
    gen = torch.Generator().manual_seed(0)
    gate, up, down = ((torch.randn(*shape, generator=gen) * 0.02).to(dtype) for shape in ((64, 48), (64, 48), (48, 64)))
    gate[5, 7] = -0.5  # a row whose largest |w| is negative: max |w| is -min, not max
    half = MlpTensors(gate, up, down)
    got = MLP_SCORES.get(name).fn(half)
    expected = MLP_SCORES.get(name).fn(MlpTensors(gate.float(), up.float(), down.float()))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    copies = set(half._float)
    assert copies == ({"gate", "up", "down"} if name == "l2" else set() if name.startswith("maw") else {"gate", "up"})


def test_mlp_activation_score_by_hand():
    input_norm = torch.tensor([1.0, 2.0, 3.0])  # per input feature of gate/up
    act_norm = torch.tensor([2.0, 0.5])  # per neuron (input of down)
    # neuron 0: (|g|+|u|) = [2,5,2] . [1,2,3] = 18, plus |down col 0| sum 5 * 2 = 10
    # neuron 1: (|g|+|u|) = [4.5,1.5,1.5] . [1,2,3] = 12, plus |down col 1| sum 3 * 0.5 = 1.5
    got = mlp_score("activation", input_norm=input_norm, act_norm=act_norm)
    torch.testing.assert_close(got, torch.tensor([28.0, 13.5]))
    assert MLP_SCORES.get("activation").needs_data


def test_mlp_random_score_is_seeded():
    fn = MLP_SCORES.get("random").fn
    gate, up, down = torch.zeros(50, 4), torch.zeros(50, 4), torch.zeros(4, 50)
    a = fn(MlpTensors(gate, up, down, seed=3))
    assert a.shape == (50,) and bool(((a >= 0) & (a < 1)).all())
    assert torch.equal(a, fn(MlpTensors(gate, up, down, seed=3)))
    assert not torch.equal(a, fn(MlpTensors(gate, up, down, seed=4)))


def _attention(num_heads=4, num_kv=2, dh=2, d=3, **kw) -> AttentionTensors:
    return AttentionTensors(q=torch.zeros(num_heads * dh, d), k=torch.zeros(num_kv * dh, d),
                            v=torch.zeros(num_kv * dh, d), o=torch.zeros(d, num_heads * dh),
                            num_heads=num_heads, num_kv_heads=num_kv, head_dim=dh, **kw)


def test_head_magnitude_on_a_constructed_case():
    t = _attention()  # 4 query heads in 2 KV groups of 2, head_dim 2, hidden 3
    t.q[4:6] = 1.0  # head 2's query rows: norm sqrt(6)
    t.o[:, 2:4] = 2.0  # head 1's output columns: norm sqrt(24)
    t.k[2:4] = 3.0  # KV head 1 (heads 2 and 3): norm 3 sqrt(6), shared by its two query heads
    s6 = math.sqrt(6)
    expected = torch.tensor([0.0, math.sqrt(24), s6 + 3 * s6 / 2, 3 * s6 / 2])
    torch.testing.assert_close(HEAD_SCORES.get("magnitude").fn(t), expected)


def test_head_magnitude_matches_per_head_slices():
    gen = torch.Generator().manual_seed(0)
    h, kv, dh, d = 6, 2, 4, 8
    t = AttentionTensors(torch.randn(h * dh, d, generator=gen), torch.randn(kv * dh, d, generator=gen),
                         torch.randn(kv * dh, d, generator=gen), torch.randn(d, h * dh, generator=gen), h, kv, dh)
    rep = h // kv
    expected = []
    for i in range(h):
        g = i // rep
        rows, kv_rows = slice(i * dh, (i + 1) * dh), slice(g * dh, (g + 1) * dh)
        expected.append(t.q[rows].norm() + t.o[:, rows].norm() + (t.k[kv_rows].norm() + t.v[kv_rows].norm()) / rep)
    torch.testing.assert_close(HEAD_SCORES.get("magnitude").fn(t), torch.stack(expected))


def test_group_scores_sum_contiguous_query_heads():
    torch.testing.assert_close(group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2), torch.tensor([3.0, 7.0]))
    torch.testing.assert_close(group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), 3),
                               torch.tensor([3.0, 7.0, 11.0]))


def test_head_activation_passes_contribution_norms_through():
    norms = torch.tensor([0.5, 2.0, 1.0, 3.0])
    assert torch.equal(HEAD_SCORES.get("activation").fn(_attention(contribution_norm=norms)), norms)
    assert HEAD_SCORES.get("activation").needs_data


def test_head_random_is_seeded():
    fn = HEAD_SCORES.get("random").fn
    a = fn(_attention(seed=1))
    assert a.shape == (4,)
    assert torch.equal(a, fn(_attention(seed=1)))
    assert not torch.equal(a, fn(_attention(seed=2)))


def test_depth_scores_by_hand():
    cosine, angular = DEPTH_SCORES.get("cosine").fn, DEPTH_SCORES.get("angular").fn
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(cosine(x, x), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(cosine(x, 2.5 * x), torch.zeros(2), atol=1e-6, rtol=0)  # scale-free
    orthogonal = torch.tensor([[3.0, 0.0, -1.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(angular(x, orthogonal), torch.full((2,), 0.5))
    torch.testing.assert_close(cosine(x, orthogonal), torch.ones(2))
    # clamped: no NaN at cos = -1 (arccos is ill-conditioned there, so float32 gets only ~1e-4 close)
    torch.testing.assert_close(angular(x, -x), torch.ones(2), atol=1e-3, rtol=0)
    torch.testing.assert_close(cosine(x, -x), torch.full((2,), 2.0))


def _causal_mask(t: int) -> torch.Tensor:
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)
    return mask[None, None]


@torch.no_grad()
def test_activation_statistics_from_the_pipeline_match_direct_math():
    """InputNorms collected by the real pipeline on layer 0 = norms of the MLP inputs computed by hand from the
    embeddings, the layer's own attention and its post-attention norm (checked against the model's own output)."""
    model = tiny_model("llama")
    spec = spec_for_config(model.config)
    ids = torch.randint(0, 4096, (3, 16), generator=torch.Generator().manual_seed(5))

    runner = LayerwiseRunner(model, spec, ids, batch_size=2)  # two batches: the sums must accumulate
    layer = decoder_layers(model, spec)[0]
    norms = InputNorms()
    collect(runner, 0, {"in": (linear(layer, spec, "mlp", "gate"), norms),
                        "down": (linear(layer, spec, "mlp", "down"), norms)})

    h0 = model.get_input_embeddings()(ids)
    cos_sin = model.model.rotary_emb(h0, torch.arange(ids.shape[1])[None])
    attn, _ = layer.self_attn(layer.input_layernorm(h0), position_embeddings=cos_sin,
                              attention_mask=_causal_mask(ids.shape[1]))
    mid = h0 + attn
    x = layer.post_attention_layernorm(mid)  # the MLP input
    act = layer.mlp.act_fn(x @ layer.mlp.gate_proj.weight.T) * (x @ layer.mlp.up_proj.weight.T)
    hidden = model(ids, output_hidden_states=True).hidden_states
    # the hand computation is the layer: its MLP output on x completes the model's own layer-0 output
    torch.testing.assert_close(mid + act @ layer.mlp.down_proj.weight.T, hidden[1], atol=1e-5, rtol=1e-5)

    input_norm = x.flatten(0, 1).pow(2).sum(0).sqrt()
    act_norm = act.flatten(0, 1).pow(2).sum(0).sqrt()
    torch.testing.assert_close(norms.norm("in"), input_norm, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(norms.norm("down"), act_norm, atol=1e-4, rtol=1e-5)
    assert runner.num_tokens == ids.numel()

    score = MLP_SCORES.get("activation").fn
    w = [layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight]
    from_pipeline = score(MlpTensors(*w, input_norm=norms.norm("in"), act_norm=norms.norm("down")))
    direct = (w[0].abs() + w[1].abs()) @ input_norm + w[2].abs().sum(0) * act_norm
    torch.testing.assert_close(from_pipeline, direct, atol=1e-4, rtol=1e-5)
