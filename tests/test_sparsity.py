"""Unstructured and N:M sparsity: masks and SparseGPT against their definitions, exact patterns and ratios in the
pipeline, planted weights that must be pruned or kept, calibration order, and bad input."""
from __future__ import annotations

import copy

import pytest
import torch

import core
from conftest import FAMILIES, logits, tiny_model
from core.architectures import spec_for_config
from core.calibration import load_calibration
from core.errors import InvalidTargetError, RecipeError
from core.layer_config import layer_shapes
from core.layers import decoder_layers
from core.methods.sparsity import linear_groups, parse_pattern
from core.model_io import load_tokenizer
from core.scores.sparsity import (GlobalThreshold, LinearTensors, Pattern, hessian_factor, nm_mask, ratio_mask, sparsegpt,
                                  sparsegpt_shared, wanda)
from core.stats import InputGram, add_upper_gram_, forward_hooks

from conftest import TOKENIZER_DIR

CALIB = core.CalibrationConfig(n_samples=4, seq_len=32)


def _tokenizer():
    return load_tokenizer(str(TOKENIZER_DIR))


def _prune(model, score: str, ratio: float = 0.5, **options):
    layers = options.pop("layers", core.LayerSelection())
    recipe = core.Recipe(method="sparsity", score=score, target=core.Target(ratio=ratio), options=options,
                         calibration=CALIB, batch_size=2, layers=layers)
    return core.prune(model, _tokenizer(), recipe)


def _linears(model):
    """{name: module} of every decoder-block Linear."""
    spec = spec_for_config(model.config)
    out = {}
    for i, shape in enumerate(layer_shapes(model.config)):
        for _, group in linear_groups(decoder_layers(model, spec)[i], spec, shape, "all"):
            out.update({f"{i}.{p}": m for p, m in group.items()})
    return out


def _groups_nonzero(w: torch.Tensor, m: int) -> torch.Tensor:
    return (w != 0).reshape(w.shape[0], -1, m).sum(-1)


# -- masks and solvers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_top_n_of_every_group(n, m):
    scores = torch.randn(6, 4 * m, generator=torch.Generator().manual_seed(n * m))
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(6, -1, m).sum(-1) == n).all()
    kept_min = torch.where(mask, scores, torch.tensor(torch.inf)).reshape(6, -1, m).min(-1).values
    dropped_max = torch.where(mask, torch.tensor(-torch.inf), scores).reshape(6, -1, m).max(-1).values
    assert (kept_min >= dropped_max).all()


def test_ratio_mask_counts_per_layer_and_per_row():
    scores = torch.rand(7, 30, generator=torch.Generator().manual_seed(0))
    layer = ratio_mask(scores, 0.3)
    assert (~layer).sum() == round(0.3 * 210)
    assert scores[~layer].max() <= scores[layer].min()
    row = ratio_mask(scores, 0.3, per_row=True)
    assert ((~row).sum(1) == 9).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros", [0, 300])  # exact zeros (an already sparse model): the lowest histogram bin
def test_global_threshold_is_exact_with_ties(dtype, zeros):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(40, 50, generator=g).to(dtype) for _ in range(3)]
    tensors[1][:5, :5] = 0.25  # planted ties around the threshold
    tensors[1][5, :10] = torch.nextafter(torch.tensor(0.25), torch.tensor(1.0))  # low 16 bits 1 (0.25: 0)
    tensors[2].view(-1)[torch.randperm(2000, generator=g)[:zeros]] = 0
    tensors[0].view(-1)[:20] = 1e-40  # subnormal: high bits 1, the bin after the zeros
    flat = torch.cat([t.float().abs().flatten() for t in tensors])
    below = int((flat < 0.25).sum())
    for k in (0, 1, zeros // 2, zeros + 5, 3000, below + 7, below + 28, flat.numel() - 1):
        th = GlobalThreshold(k)
        for t in tensors:
            th.count(t)
        # bfloat16 weights have no low 16 bits: the second pass is skipped
        assert th.needs_refine == (k > 0 and dtype == torch.float32)
        if th.needs_refine:
            for t in tensors:
                th.refine(t)
        th.finish()
        masks = [th.mask(t) for t in tensors]
        pruned = torch.cat([(~mk).flatten() for mk in masks])
        assert int(pruned.sum()) == k
        if 0 < k < flat.numel():
            assert flat[pruned].max() <= flat[~pruned].min()


def test_wanda_weighs_magnitudes_by_input_norms():
    w = torch.tensor([[1.0, 0.5, -2.0, 0.1]])
    t = LinearTensors(w, input_norm=torch.tensor([0.1, 10.0, 0.0, 1.0]))
    assert torch.equal(wanda(t), torch.tensor([[0.1, 5.0, 0.0, 0.1]]))
    assert nm_mask(wanda(t), 2, 4).tolist() == [[True, True, False, False]]  # -2.0 sees no input: pruned


def _data(seed: int, tokens: int = 400, d: int = 64, out: int = 24):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g) @ (torch.eye(d) + 0.6 * torch.randn(d, d, generator=g))  # correlated
    return x, torch.randn(out, d, generator=g)


@pytest.mark.parametrize("pattern,ratio", [(Pattern(), 0.5), (Pattern(2, 4), 0.5), (Pattern(4, 8), 0.5),
                                           (Pattern(), 0.7)])
def test_sparsegpt_update_beats_masking_alone(pattern, ratio):
    x, w = _data(0)
    new = sparsegpt(w, x.T @ x, pattern, ratio, block_size=16)
    mask = new != 0
    if pattern.structured:
        assert (_groups_nonzero(new, pattern.m) == pattern.n).all()
    else:
        assert (~mask).sum() == round(ratio * w.numel())
    masked_error = (x @ (w * mask).T - x @ w.T).pow(2).sum()
    update_error = (x @ new.T - x @ w.T).pow(2).sum()
    assert update_error < 0.8 * masked_error


def test_sparsegpt_zeroes_dead_inputs_and_keeps_the_scale_free():
    x, w = _data(1)
    x[:, 5] = 0  # an input that never fires: H_55 = 0
    a = sparsegpt(w, x.T @ x, Pattern(2, 4), 0.5, block_size=16)
    assert (a[:, 5] == 0).all()
    b = sparsegpt(w, 37.0 * (x.T @ x), Pattern(2, 4), 0.5, block_size=16)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sparsegpt_reads_the_upper_gram_that_input_gram_accumulates():
    x, w = _data(2, d=96)
    stats = InputGram()
    for part in x.split(150):  # two calibration batches
        stats("in", None, (part,), None)
    torch.testing.assert_close(stats.gram["in"].triu(), (x.T @ x).triu(), rtol=1e-4, atol=1e-3)
    upper = torch.zeros(96, 96)
    for part in x.split(150):
        add_upper_gram_(upper, part, width=32)
    torch.testing.assert_close(upper.triu(), (x.T @ x).triu(), rtol=1e-4, atol=1e-3)
    assert not upper[64:, :64].any()  # below the diagonal blocks: never computed
    for pattern in (Pattern(), Pattern(2, 4)):
        torch.testing.assert_close(sparsegpt(w, upper, pattern, 0.5, block_size=32),
                                   sparsegpt(w, x.T @ x, pattern, 0.5, block_size=32), rtol=1e-4, atol=1e-4)


def test_sparsegpt_shared_equals_one_linear_at_a_time():
    """q/k/v (or gate/up) share one factor and one pass over the columns; each result is its own sparsegpt."""
    x, _ = _data(3, d=64)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(rows, 64, generator=g) for rows in (40, 8, 8)]
    factor = hessian_factor(x.T @ x)
    for pattern, ratio in ((Pattern(), 0.5), (Pattern(), 0.3), (Pattern(2, 4), 0.5)):
        shared = sparsegpt_shared(weights, factor, pattern, ratio, block_size=16)
        for w, new in zip(weights, shared):
            alone = sparsegpt(w, x.T @ x, pattern, ratio, block_size=16)
            assert torch.equal(new != 0, alone != 0)
            torch.testing.assert_close(new, alone, rtol=1e-4, atol=1e-5)
            if not pattern.structured:
                assert int((new == 0).sum()) == round(ratio * w.numel())


def _reference_sparsegpt(w, gram, pattern, ratio, block, damp=0.01):
    """SparseGPT as the paper writes it (Algorithm 1), in float64: the explicit inverse Hessian's upper Cholesky
    factor U, the mask of each column block chosen once (unstructured: the block's share of the lowest w^2 / U_jj^2;
    N:M: each group of M columns when the loop reaches it, from the updated weights) and every later column updated
    as soon as a column is done (no lazy batching, no blocked substitution)."""
    w, h = w.double().clone(), gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    rows, cols = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)  # True = pruned
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if not pattern.structured:
            k = round(ratio * rows * i2) - round(ratio * rows * i1)
            score = (w[:, i1:i2].pow(2) / u.diagonal()[i1:i2].pow(2)).flatten()
            chosen = torch.zeros(score.numel(), dtype=torch.bool)
            chosen[torch.argsort(score, stable=True)[:k]] = True
            mask[:, i1:i2] = chosen.view(rows, i2 - i1)
        for j in range(i1, i2):
            if pattern.structured and j % pattern.m == 0:
                score = w[:, j:j + pattern.m].pow(2) / u.diagonal()[j:j + pattern.m].pow(2)
                keep = torch.argsort(score, dim=1, descending=True, stable=True)[:, :pattern.n]
                mask[:, j:j + pattern.m] = True
                mask[:, j:j + pattern.m].scatter_(1, keep, False)
            err = w[:, j] * mask[:, j] / u[j, j]
            w[:, j:] -= torch.outer(err, u[j, j:])
    return (w * ~mask).float(), mask


@pytest.mark.parametrize("pattern,ratio", [(Pattern(), 0.5), (Pattern(), 0.3), (Pattern(2, 4), 0.5),
                                           (Pattern(4, 8), 0.5)])
def test_sparsegpt_equals_the_papers_algorithm(pattern, ratio):
    """The blocked, inverse-free solver chooses the same weights and gives the same values as Algorithm 1 written
    out, with a dead input, across several column blocks (104 columns in blocks of 32 or 48, the last one partial)
    and the sub-blocks of 32 columns inside `_prune_block`."""
    x, w = _data(5, d=104, out=12)  # 104 columns: the last block is a partial one
    x[:, 7] = 0
    for block in (32, 48):
        expected, pruned = _reference_sparsegpt(w, x.T @ x, pattern, ratio, block)
        got = sparsegpt(w, x.T @ x, pattern, ratio, block_size=block)
        assert torch.equal(got == 0, pruned | (w == 0) | (expected == 0)), block
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert (got[:, 7] == 0).all()


def test_hessian_factor_raises_the_dampening_until_the_factorisation_succeeds():
    """An indefinite Hessian (eigenvalues -2 and 4): lambda = 0.01 mean(diag) is retried at 10x, 100x, 1000x; the
    first that makes H + lambda I positive definite (1000x: eigenvalues 8 and 14) is what the factor holds."""
    gram = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    factor = hessian_factor(gram, damp=0.01)
    lower = factor.lower
    rebuilt = torch.flip(lower @ lower.T, (0, 1))  # R R^T = H + lambda I
    torch.testing.assert_close(rebuilt, gram + 10.0 * torch.eye(2), rtol=1e-5, atol=1e-5)
    assert not factor.dead.any()
    with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
        hessian_factor(torch.tensor([[1.0, 1e7], [1e7, 1.0]]), damp=0.01)


def test_lowest_and_group_selection_break_ties_by_the_lower_index():
    from core.scores.sparsity import _group_pruned, _lowest

    assert _lowest(torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0]), 2).tolist() == [True, True, False, False, False]
    assert _lowest(torch.tensor([2.0, 2.0, 1.0, 2.0]), 3).tolist() == [True, True, True, False]
    for m in (4, 300):  # pairwise ranks for small groups, a sort above 255 (ranks would not fit in uint8)
        scores = torch.rand(m, 3, generator=torch.Generator().manual_seed(m))
        scores[1] = scores[0]  # a tie: row 0 ranks above row 1
        expected = torch.ones(m, 3, dtype=torch.bool)
        expected.scatter_(0, torch.argsort(-scores, dim=0, stable=True)[:2], False)
        assert torch.equal(_group_pruned(scores, 2), expected), m


def test_sparsity_scores_equal_their_definitions():
    from core.scores.sparsity import magnitude, taylor

    w = torch.tensor([[1.0, -3.0, 0.5], [-0.2, 2.0, -4.0]])
    assert torch.equal(magnitude(LinearTensors(w)), w.abs())  # a large negative weight is kept
    sq = torch.tensor([[4.0, 9.0, 0.25], [1.0, 16.0, 0.0]])
    assert torch.equal(taylor(LinearTensors(w, taylor_sq=sq)), sq.sqrt())
    assert Pattern().ratio == 0.0 and not Pattern().structured and Pattern(2, 4).ratio == 0.5


# -- the method in the pipeline -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_two_four_on_every_family_exactly(family):
    model = tiny_model(family)
    embed = model.get_input_embeddings().weight.clone()
    head = model.get_output_embeddings().weight.clone()
    result = _prune(model, "magnitude", pattern="2:4")
    for name, module in _linears(model).items():
        assert (_groups_nonzero(module.weight, 4) == 2).all(), name
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert torch.equal(model.get_output_embeddings().weight, head)
    assert result.extra["sparsity"]["sparsity"] == 0.5
    assert result.params_after == result.params_before  # zeros, not removed parameters


@pytest.mark.parametrize("score", ["wanda", "sparsegpt", "taylor", "random"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_every_score_makes_exact_nm(score, pattern):
    model = tiny_model("llama")
    _prune(model, score, pattern=pattern)
    m = parse_pattern(pattern).m
    for name, module in _linears(model).items():
        assert (_groups_nonzero(module.weight, m) == m // 2).all(), name
    assert torch.isfinite(logits(model, torch.arange(10)[None])).all()


@pytest.mark.parametrize("score,scope", [("magnitude", "layer"), ("wanda", "row"), ("sparsegpt", None),
                                         ("taylor", "layer"), ("wanda", "layer")])
def test_unstructured_ratio_per_layer_and_row(score, scope):
    model = tiny_model("llama")
    _prune(model, score, 0.3, **({"scope": scope} if scope else {}))
    for name, module in _linears(model).items():
        w = module.weight
        if scope == "row":
            assert ((w == 0).sum(1) == round(0.3 * w.shape[1])).all(), name
        else:
            assert int((w == 0).sum()) == round(0.3 * w.numel()), name


def test_global_magnitude_threshold_spans_layers():
    model = tiny_model("llama")
    with torch.no_grad():  # layer 2 gets tiny weights: a global threshold must take most of its zeros there
        for p in decoder_layers(model, spec_for_config(model.config))[2].parameters():
            if p.dim() == 2:
                p.mul_(0.05)
    original = {k: m.weight.clone() for k, m in _linears(model).items()}
    result = _prune(model, "magnitude", 0.4, scope="global")
    total = sum(w.numel() for w in original.values())
    zeros = {k: int((m.weight == 0).sum()) for k, m in _linears(model).items()}
    assert sum(zeros.values()) == round(0.4 * total)
    kept = torch.cat([original[k][m.weight != 0].abs() for k, m in _linears(model).items()])
    pruned = torch.cat([original[k][m.weight == 0].abs() for k, m in _linears(model).items()])
    assert pruned.max() <= kept.min()
    layer_sparsity = [entry["sparsity"] for entry in result.extra["sparsity"]["layers"]]
    assert layer_sparsity[2] > 0.95 and min(layer_sparsity[i] for i in (0, 1, 3)) < 0.4


def test_protected_and_selected_linears_stay_dense():
    model = tiny_model("llama")
    _prune(model, "wanda", pattern="2:4", linears="mlp",
           layers=core.LayerSelection(protect_first=1, protect_last=1))
    for name, module in _linears(model).items():
        layer, path = int(name.split(".")[0]), name.split(".", 1)[1]
        dense = layer in (0, 3) or path.startswith("self_attn")
        assert bool((module.weight == 0).any()) != dense, name


def _dead_input_model():
    """Layer 1's MLP input feature 7 is always zero (its norm weight is 0) and gate/up column 7 holds the largest
    weights of the layer: magnitude keeps them, every data-aware score must prune them."""
    model = tiny_model("llama")
    layer = decoder_layers(model, spec_for_config(model.config))[1]
    with torch.no_grad():
        layer.post_attention_layernorm.weight[7] = 0.0
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[:, 7] = 1.0
    return model, layer


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt", "taylor"])
def test_planted_weights_on_a_dead_input(score):
    model, layer = _dead_input_model()
    _prune(model, score, pattern="2:4")
    column = torch.cat([layer.mlp.gate_proj.weight[:, 7], layer.mlp.up_proj.weight[:, 7]])
    if score == "magnitude":
        assert (column != 0).all()
    else:
        assert (column == 0).all()


def test_planted_large_weights_are_kept_and_small_ones_pruned():
    model = tiny_model("llama")
    q = decoder_layers(model, spec_for_config(model.config))[0].self_attn.q_proj
    with torch.no_grad():
        q.weight[3, :] = 0.001  # the smallest weights of the layer
        q.weight[5, 10] = 5.0
    _prune(model, "wanda", 0.25, scope="layer")
    assert (q.weight[3] == 0).all() and q.weight[5, 10] == 5.0


@pytest.mark.parametrize("order", ["linear", "branch"])
def test_blocks_are_calibrated_on_pruned_inputs_in_order(order):
    """Wanda masks recomputed from the final model's activations (every earlier linear already pruned) must equal
    the masks the pipeline chose: it saw exactly those inputs only if it ran in order. With order 'branch' the
    attention linears share one pass and the MLP linears another, so o_proj and down_proj saw their inputs before
    q/k/v (gate/up) were pruned: only the first linears of each branch are checked then."""
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    _prune(model, "wanda", 0.5, order=order)
    tok = _tokenizer()
    ids = load_calibration(tok, CALIB)
    sq: dict = {}

    def norms(name, module, inputs, output):
        x = inputs[0].detach().flatten(0, -2).float()
        sq[name] = sq.get(name, 0) + x.pow(2).sum(0)

    final, orig = _linears(model), _linears(original)
    with forward_hooks(final, norms), torch.no_grad():
        for start in range(0, ids.shape[0], 2):
            model(ids[start:start + 2])
    for name, module in final.items():
        if order == "branch" and name.endswith(("o_proj", "down_proj")):
            continue
        expected = ratio_mask(orig[name].weight.abs() * sq[name].sqrt()[None, :], 0.5, per_row=True)
        assert torch.equal(module.weight != 0, expected), name


# -- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options,target,error,match", [
    ({"pattern": "2:4"}, {"ratio": 0.3}, InvalidTargetError, "disagrees"),
    ({"pattern": "5:4"}, {"ratio": 0.5}, RecipeError, "N:M"),
    ({"scope": "global"}, {"ratio": 0.5}, RecipeError, "magnitude only"),
    ({}, {"param_ratio": 0.5}, InvalidTargetError, "without removing parameters"),
    ({"pattern": "2:4", "scope": "row"}, {"ratio": 0.5}, RecipeError, "scope"),
    ({"order": "backwards"}, {"ratio": 0.5}, RecipeError, "order"),
])
def test_bad_recipes_fail_before_any_work(options, target, error, match):
    recipe = core.Recipe(method="sparsity", score="wanda", target=core.Target(**target), options=options)
    with pytest.raises(error, match=match):
        core.prune(tiny_model("llama"), None, recipe)


def test_pattern_not_dividing_the_inputs():
    with pytest.raises(InvalidTargetError, match="not a multiple"):
        _prune(tiny_model("llama"), "magnitude", 1 - 3 / 7, pattern="3:7")


def test_unquoted_yaml_pattern_is_read_as_written():
    recipe = core.Recipe.from_yaml("method: sparsity\ntarget: {ratio: 0.5}\noptions: {pattern: 2:4}\n")
    assert recipe.options["pattern"] == 124  # YAML 1.1 base 60
    assert parse_pattern(recipe.options["pattern"]) == Pattern(2, 4)
    result = core.prune(tiny_model("llama"), None, recipe.replace(score="magnitude"))
    assert result.recipe.options["pattern"] == "2:4"  # written back as read
