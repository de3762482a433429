"""The gradient and tutorial scores against their definitions, computed here directly with autograd and hooks:
first-order Taylor of heads (GQA shares, fused qkv) and of blocks / sub-layers, the tutorial's residual
contribution x gradient, and the attention statistics under every mask form an attention function receives.
(`test_recover_scores.py` checks the MLP Taylor values and that planted units are the ones removed.)"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import core
from conftest import tiny_model
from recover_fixtures import one_thread, tokenizer  # noqa: F401  (fixtures)
from core import CalibrationConfig, Recipe, Target
from core.layers import decoder_layers, units_disabled
from core.methods import PruneContext
from core.progress import Progress
from core.scores.attention_probe import HeadStats

CALIB = CalibrationConfig(n_samples=6, seq_len=24)
BATCH = 4  # not a divisor of the sample count: the last batch is smaller


def _context(model, tokenizer, method: str, score: str) -> PruneContext:
    recipe = Recipe(method=method, score=score, target=Target(ratio=0.5), calibration=CALIB, batch_size=BATCH)
    return PruneContext(model, tokenizer, core.architectures.spec_for_config(model.config), recipe, Progress())


def _mean_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """The calibration loss: mean next-token NLL over every predicted token of every window."""
    total = sum(F.cross_entropy(model(ids[s:s + BATCH]).logits[:, :-1].flatten(0, 1), ids[s:s + BATCH, 1:].flatten(),
                                reduction="sum") for s in range(0, ids.shape[0], BATCH))
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def _wide_heads_llama():
    """A tiny Llama whose heads are wider than the stream (4 x 32 > 64): o_proj is not square."""
    from transformers import LlamaConfig
    from conftest import COMMON, tiny_from_config

    return tiny_from_config(LlamaConfig(**COMMON, head_dim=32))


def _attention_terms(layer, family: str, heads: int, kv: int, dh: int) -> tuple[list, list]:
    """The weights whose |w * dL/dw| make up the head scores, and how to split them into q, k, v, o."""
    a = layer.self_attn
    if family == "phi3":
        return [a.qkv_proj.weight, a.o_proj.weight], [heads * dh, kv * dh, kv * dh]
    return [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight], []


# separate q/k/v, heads wider than the stream, and a fused qkv that the gradients are split from
@pytest.mark.parametrize("family", ["llama", "llama_wide_heads", "phi3"])
def test_head_taylor_equals_autograd_per_head(tokenizer, family):
    """Head h: sum |w * dL/dw| over its q rows and o columns, plus 1/rep of its KV head's k and v rows; layers 1
    and 2 (the second read from the gradients cached by the first)."""
    from core.layer_config import layer_shapes
    from core.methods.heads import attention_tensors
    from core.scores.gradient_stats import attention_gradients
    from core.scores.taylor import head_taylor

    model = _wide_heads_llama() if family == "llama_wide_heads" else tiny_model(family)
    ctx = _context(model, tokenizer, "attention_heads", "taylor")
    heads, kv, dh = 4, 2, 32 if family == "llama_wide_heads" else 16
    rep = heads // kv
    layers = [1, 2]
    weights = {i: _attention_terms(model.model.layers[i], family, heads, kv, dh) for i in layers}
    flat = [w for i in layers for w in weights[i][0]]
    grads = iter(torch.autograd.grad(_mean_nll(model, ctx.calibration_ids()), flat))
    for i in layers:
        ws, split = weights[i]
        terms = [(w * next(grads)).abs().detach() for w in ws]
        q_t, k_t, v_t = terms[0].split(split) if split else terms[:3]
        o_t = terms[-1]
        expected = torch.stack([q_t[h * dh:(h + 1) * dh].sum() + o_t[:, h * dh:(h + 1) * dh].sum()
                                + (k_t[(h // rep) * dh:(h // rep + 1) * dh].sum()
                                   + v_t[(h // rep) * dh:(h // rep + 1) * dh].sum()) / rep for h in range(heads)])
        tensors = attention_tensors(model.model.layers[i], ctx.spec, layer_shapes(model.config)[i], dh)
        tensors.extra = attention_gradients(ctx, i)
        got = head_taylor(tensors)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)
        assert len(set(got.tolist())) == heads  # every head scored apart: a swapped head would show
    assert all(p.grad is None for p in model.parameters())


def _mlp_taylor_by_hand(model, ids, mlp, fused: bool) -> torch.Tensor:
    if fused:
        gate_up, down = mlp.gate_up_proj.weight, mlp.down_proj.weight
        g_gate_up, g_down = torch.autograd.grad(_mean_nll(model, ids), [gate_up, down])
        rows = (gate_up * g_gate_up).abs().detach()
        m = down.shape[1]
        return rows[:m].sum(1) + rows[m:].sum(1) + (down * g_down).abs().detach().sum(0)
    ws = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    gs = torch.autograd.grad(_mean_nll(model, ids), ws)
    return ((ws[0] * gs[0]).abs().sum(1) + (ws[1] * gs[1]).abs().sum(1) + (ws[2] * gs[2]).abs().sum(0)).detach()


def test_mlp_taylor_of_a_fused_gate_up_equals_autograd(tokenizer):
    """Phi-3's gate_up_proj holds the gate rows, then the up rows: each neuron gets its gate row and up row."""
    from core.layer_config import layer_shapes
    from core.methods.width import mlp_tensors
    from core.scores.gradient_stats import mlp_gradients
    from core.scores.taylor import mlp_taylor

    model = tiny_model("phi3")
    ctx = _context(model, tokenizer, "mlp_width", "taylor")
    mlp = model.model.layers[1].mlp
    expected = _mlp_taylor_by_hand(model, ctx.calibration_ids(), mlp, fused=True)
    tensors = mlp_tensors(model.model.layers[1], ctx.spec, layer_shapes(model.config)[1])
    tensors.extra = mlp_gradients(ctx, 1)
    torch.testing.assert_close(mlp_taylor(tensors), expected, rtol=1e-4, atol=1e-8)


def test_mlp_gradients_of_a_layer_whose_attention_was_removed(tokenizer):
    """A block whose attention is already gone (a stand-in without projections) still has MLP gradients."""
    from core.layer_config import layer_shapes
    from core.methods.width import mlp_tensors
    from core.scores.gradient_stats import mlp_gradients
    from core.scores.taylor import mlp_taylor

    model = tiny_model("llama")
    ctx = _context(model, tokenizer, "mlp_width", "taylor")
    with units_disabled(model, ctx.spec, "attention", [2]):
        expected = _mlp_taylor_by_hand(model, ctx.calibration_ids(), model.model.layers[2].mlp, fused=False)
        tensors = mlp_tensors(model.model.layers[2], ctx.spec, layer_shapes(model.config)[2])
        tensors.extra = mlp_gradients(ctx, 2)
    torch.testing.assert_close(mlp_taylor(tensors), expected, rtol=1e-4, atol=1e-8)


def _by_hand(model, spec, ids: torch.Tensor, unit: str, i: int) -> tuple[float, float]:
    """(Taylor: sum |w * dL/dw| over unit i's weights, contribution x gradient: mean over tokens of ||update|| x
    ||dL/d(output)||) with a hook and retained gradients, no core statistics code."""
    layer = decoder_layers(model, spec)[i]
    module = layer if unit == "block" else layer.get_submodule(spec.attention.module if unit == "attention"
                                                               else spec.mlp.module)
    target = layer if unit == "block" else layer.get_submodule(spec.branch_module(unit))
    params = [p for p in module.parameters() if p.dim() >= 1]
    outputs, updates = [], []

    def hook(mod, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        outputs.append(out)
        update = out - (args[0] if args else kwargs["hidden_states"]) if unit == "block" else out
        updates.append(update.detach().norm(dim=-1).flatten())

    handle = target.register_forward_hook(hook, with_kwargs=True)
    try:
        loss = _mean_nll(model, ids)
        grads = torch.autograd.grad(loss, params + outputs)
    finally:
        handle.remove()
    taylor = sum(float((p.detach() * g).abs().sum()) for p, g in zip(params, grads[:len(params)]))
    grad_norms = torch.cat([g.norm(dim=-1).flatten() for g in grads[len(params):]])
    return taylor, float((torch.cat(updates) * grad_norms).mean())


@pytest.mark.parametrize("family,unit", [("llama", "block"), ("llama", "attention"), ("gemma2", "mlp")])
def test_depth_gradient_scores_equal_their_definitions(tokenizer, family, unit):
    """Taylor and contribution x gradient of every candidate unit, with another unit removed while they are
    measured, against the same quantities computed by hand on the model with that unit removed."""
    from core.scores import DEPTH_SCORES
    from core.scores.gradient_stats import depth_gradients

    model = tiny_model(family)
    ctx = _context(model, tokenizer, "depth", "taylor")
    ids = ctx.calibration_ids()
    candidates, disabled = [1, 2, 3], [0]
    stats = depth_gradients(ctx, SimpleNamespace(unit=unit), candidates, disabled)
    assert all(p.grad is None for p in model.parameters())
    taylor, contribution = DEPTH_SCORES.get("taylor").fn, DEPTH_SCORES.get("contribution_gradient").fn
    with units_disabled(model, ctx.spec, unit, disabled):
        for i in candidates:
            want_taylor, want_contribution = _by_hand(model, ctx.spec, ids, unit, i)
            assert float(taylor(stats[i])) == pytest.approx(want_taylor, rel=1e-4)
            assert float(contribution(stats[i])) == pytest.approx(want_contribution, rel=1e-4)
            assert stats[i]["update_norm"].numel() == ids.numel()


def _uniform_entropy(t: int, window: int | None = None) -> float:
    """Mean entropy of uniform causal attention over query positions 1..t-1 (query i sees i + 1 keys, or at most
    `window` of them)."""
    return sum(math.log(min(n, window or n)) for n in range(2, t + 1)) / (t - 1)


def test_attention_statistics_under_every_mask_form():
    """Uniform attention (zero queries) has the entropy of the keys each query may see: causal by default or with
    a 4-D boolean or additive mask (longer than the keys: cut), fewer keys in a sliding window, a padded key
    excluded. Value norms are per KV head, shared by its query heads."""
    b, t, dh = 2, 6, 4
    q = torch.zeros(b, 4, t, dh)
    k = torch.randn(b, 2, t, dh)
    v = torch.zeros(b, 2, t, dh)
    v[:, 0, :, 0], v[:, 1, :, :] = 3.0, 1.0  # norms 3 and 2
    causal = torch.ones(t, t + 3, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t + 3)
    additive = torch.zeros(b, 1, t, t + 3).masked_fill(~causal, float("-inf"))
    for mask in (None, causal, additive):
        stats = HeadStats()
        stats.add(q, k, v, mask, scaling=0.5)
        out = stats.result()
        torch.testing.assert_close(out["attention_entropy"], torch.full((4,), _uniform_entropy(t)))
        torch.testing.assert_close(out["value_norm"], torch.tensor([3.0, 3.0, 2.0, 2.0]))

    stats = HeadStats()
    stats.add(q, k, v, None, scaling=0.5, sliding_window=2)
    torch.testing.assert_close(stats.result()["attention_entropy"], torch.full((4,), math.log(2)))

    padded = causal.clone()
    padded[:, :, :, 0] = False  # key 0 is padding
    padded[:, :, 0, 0] = True  # (query 0 must see something: it is left out of the mean anyway)
    stats = HeadStats()
    stats.add(q, k, v, padded, scaling=0.5)
    want = sum(math.log(n) for n in range(1, t)) / (t - 1)  # query i sees keys 1..i
    torch.testing.assert_close(stats.result()["attention_entropy"], torch.full((4,), want))


def test_attention_statistics_average_over_batches_of_different_sizes():
    """Sums over batches divided by the counts: one batch of 3 equals batches of 1 and 2."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 5, 8), torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    whole, parts = HeadStats(), HeadStats()
    whole.add(q, k, v, None, scaling=0.3)
    parts.add(q[:1], k[:1], v[:1], None, scaling=0.3)
    parts.add(q[1:], k[1:], v[1:], None, scaling=0.3)
    for key in ("attention_entropy", "value_norm"):
        torch.testing.assert_close(parts.result()[key], whole.result()[key])
    # and the entropy is that of softmax(q k^T * scaling) under the causal mask, head by head
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3).masked_fill(
        ~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    p = scores.softmax(-1)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)[:, :, 1:]
    torch.testing.assert_close(whole.result()["attention_entropy"], ent.mean((0, 2)))
    torch.testing.assert_close(whole.result()["value_norm"],
                               v.norm(dim=-1).mean(-1).repeat_interleave(2, dim=1).mean(0))


def test_head_statistics_of_a_layer_see_its_real_attention(tokenizer):
    """`head_statistics` on a layer of a real model: the entropies equal those of the attention probabilities the
    eager implementation returns, and the layer's output is unchanged by the probe."""
    from core.scores.attention_probe import head_statistics

    model = tiny_model("llama")
    ctx = _context(model, tokenizer, "attention_heads", "entropy")
    runner = ctx.runner()
    before = runner.run_layer(0)
    probs = []
    attn = model.model.layers[0].self_attn
    handle = attn.register_forward_hook(lambda m, a, kw, out: probs.append(out[1]), with_kwargs=True)
    try:
        got = head_statistics(ctx, 0, runner)
        runner.run_layer(0)  # eager: the module returns its attention weights
    finally:
        handle.remove()
    after = runner.run_layer(0)
    for x, y in zip(before, after):
        torch.testing.assert_close(x, y)
    p = torch.cat(probs[-len(before):])  # [b, H, T, T] from the eager run
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)[:, :, 1:]
    torch.testing.assert_close(got["attention_entropy"], ent.mean((0, 2)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t", [1, 2])
def test_attention_statistics_of_windows_of_one_and_two_tokens(t):
    """Position 0 sees only itself and is left out of the mean, unless it is the only position (entropy 0)."""
    q, k, v = torch.zeros(1, 4, t, 8), torch.randn(1, 2, t, 8), torch.ones(1, 2, t, 8)
    stats = HeadStats()
    stats.add(q, k, v, None, scaling=1.0)
    torch.testing.assert_close(stats.result()["attention_entropy"], torch.full((4,), 0.0 if t == 1 else math.log(2)))


def test_the_probe_defaults_to_the_inverse_square_root_scaling_and_returns_the_attention_output():
    """An attention function called without `scaling` uses 1/sqrt(head_dim), as SDPA does; the probe hands back
    the output of the implementation it stands in for."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from core.scores.attention_probe import PROBE, probing

    attention = tiny_model("llama").model.layers[0].self_attn
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    probed, direct = HeadStats(), HeadStats()
    with probing(attention, probed):
        out = ALL_ATTENTION_FUNCTIONS[PROBE](attention, q, k, v, None, dropout=0.0)
    direct.add(q, k, v, None, scaling=16 ** -0.5)
    for key in ("attention_entropy", "value_norm"):
        torch.testing.assert_close(probed.result()[key], direct.result()[key])
    torch.testing.assert_close(out[0], sdpa_attention_forward(attention, q, k, v, None, dropout=0.0)[0])
    assert attention.config._attn_implementation == "eager"  # restored
