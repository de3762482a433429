"""Selection oracles for the pure scoring functions: planted structure (units with tiny or dead weights, a copy of a
unit, an identity block, a direction carrying all the variance) and expected values computed here with plain Python
loops. Nothing here ranks with the library's own helpers: orders come from `sorted` on Python floats, so a bug that
inverts or shifts a ranking in the library cannot hide in the oracle as well."""
from __future__ import annotations

import math

import pytest
import torch

from core.methods import top_k
from core.scores import DEPTH_SCORES, HEAD_SCORES, MLP_SCORES
from core.scores.depth import (drop_when_removed, leave_one_out_masks, present_minus_absent, random_masks)
from core.scores.heads import AttentionTensors, group_scores
from core.scores.mlp import MlpTensors
from core.scores.slimllm import (channels_to_prune, contribution_moments, eq11_ratios, feature_space_importance,
                                 input_terms, leave_one_out, pearson_similarity, regression_fit)


def lowest(values, k: int) -> set[int]:
    """Indices of the k lowest values (ties: lower index first), by plain sorting."""
    return set(sorted(range(len(values)), key=lambda i: (float(values[i]), i))[:k])


def rows(t: torch.Tensor) -> list[list[float]]:
    return [[float(x) for x in r] for r in t]


# ------------------------------------------------------------------------------------------------- MLP scores

# Rows chosen so that every formula is exercised where its variants differ:
#   row 0: the largest |w| of gate AND up is negative (max|w| != max w; a missing abs() shows);
#   row 1: every weight positive (max + |min| != max - min);  row 2: every weight negative;
#   row 3: mixed signs, |min| > max;  row 4: a zero row next to a non-zero one.
GATE = torch.tensor([[0.5, -4.0, 1.0], [1.0, 2.0, 3.0], [-1.0, -2.0, -0.5], [2.0, -7.0, 1.0], [0.0, 0.0, 0.0]])
UP = torch.tensor([[1.0, -6.0, 0.5], [0.5, 1.5, 0.25], [-3.0, -1.0, -2.0], [-0.5, 1.0, -3.0], [1.0, -2.0, 0.5]])
DOWN = torch.tensor([[1.0, 0.0, -2.0, 0.5, 1.0], [2.0, 1.0, 0.0, -1.0, 0.0], [-1.0, 3.0, 1.0, 2.0, -2.0]])


def _maw(g, u):
    return max(abs(x) for x in g) + max(abs(x) for x in u)


def _maw_range(g, u):
    return (max(g) + abs(min(g))) + (max(u) + abs(min(u)))


def _var(w):
    mean = sum(w) / len(w)
    return sum((x - mean) ** 2 for x in w) / len(w)


def _l1(w):
    return sum(abs(x) for x in w)


def _l2(w):
    return math.sqrt(sum(x * x for x in w))


PLAIN = {
    "maw": lambda g, u, d: _maw(g, u),
    "maw_range": lambda g, u, d: _maw_range(g, u),
    "vow": lambda g, u, d: _var(g) + _var(u),
    "pon": lambda g, u, d: _l1(g) * _l1(u),
    "l2": lambda g, u, d: _l2(g) + _l2(u) + _l2(d),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_mlp_weight_scores_equal_their_definition_on_rows_where_variants_differ(name):
    gate, up, down = rows(GATE), rows(UP), rows(DOWN.T)
    expected = [PLAIN[name](g, u, d) for g, u, d in zip(gate, up, down)]
    got = MLP_SCORES.get(name).fn(MlpTensors(GATE, UP, DOWN))
    assert got.shape == (5,)
    assert [float(x) for x in got] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_the_planted_rows_separate_the_variants():
    """The oracle data is strong enough: abs() dropped from up, or max+|min| written max-min, changes values."""
    gate, up = rows(GATE), rows(UP)
    assert _maw(gate[0], up[0]) != max(abs(x) for x in gate[0]) + max(up[0])
    assert _maw_range(gate[1], up[1]) != (max(gate[1]) - min(gate[1])) + (max(up[1]) - min(up[1]))


def _planted_mlp(m=40, d=16, planted=(3, 11, 17, 29, 38), seed=0):
    """Random gated-MLP weights where the `planted` neurons have weights 1000x smaller in all three matrices."""
    g = torch.Generator().manual_seed(seed)
    gate, up, down = torch.randn(m, d, generator=g), torch.randn(m, d, generator=g), torch.randn(d, m, generator=g)
    for j in planted:
        gate[j] *= 1e-3
        up[j] *= 1e-3
        down[:, j] *= 1e-3
    return gate, up, down, set(planted)


@pytest.mark.parametrize("name", ["maw", "maw_range", "vow", "pon", "l2", "activation"])
def test_every_mlp_score_ranks_planted_tiny_neurons_lowest(name):
    gate, up, down, planted = _planted_mlp()
    stats = {}
    if MLP_SCORES.get(name).needs_data:
        stats = dict(input_norm=torch.rand(16, generator=torch.Generator().manual_seed(1)) + 0.5,
                     act_norm=torch.ones(40))
    scores = MLP_SCORES.get(name).fn(MlpTensors(gate, up, down, **stats))
    assert lowest(scores.tolist(), len(planted)) == planted


def test_activation_score_sees_dead_inputs_that_weight_scores_cannot():
    """Neurons with large weights that only read input features whose calibration norm is zero, and never fire,
    are the lowest under `activation` but the highest under `maw`."""
    m, d = 12, 8
    g = torch.Generator().manual_seed(2)
    gate, up, down = 0.1 * torch.randn(m, d, generator=g), 0.1 * torch.randn(m, d, generator=g), \
        0.1 * torch.randn(d, m, generator=g)
    dead_features, planted = [0, 1, 2], {4, 9}
    for j in planted:
        gate[j], up[j] = 0.0, 0.0
        gate[j, dead_features] = 5.0
        up[j, dead_features] = -5.0
        down[:, j] = 5.0
    input_norm = torch.ones(d)
    input_norm[dead_features] = 0.0
    act_norm = torch.ones(m)
    act_norm[list(planted)] = 0.0
    t = MlpTensors(gate, up, down, input_norm=input_norm, act_norm=act_norm)
    assert lowest(MLP_SCORES.get("activation").fn(t).tolist(), 2) == planted
    maw = MLP_SCORES.get("maw").fn(t).tolist()
    assert lowest([-v for v in maw], 2) == planted  # the two highest by weights


def test_mlp_activation_score_equals_its_definition():
    g = torch.Generator().manual_seed(3)
    gate, up, down = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    n_in, n_act = torch.rand(4, generator=g), torch.rand(6, generator=g)
    got = MLP_SCORES.get("activation").fn(MlpTensors(gate, up, down, input_norm=n_in, act_norm=n_act)).tolist()
    for j in range(6):
        inputs = sum((abs(float(gate[j, i])) + abs(float(up[j, i]))) * float(n_in[i]) for i in range(4))
        outputs = sum(abs(float(down[k, j])) for k in range(4)) * float(n_act[j])
        assert got[j] == pytest.approx(inputs + outputs, rel=1e-5)


# ------------------------------------------------------------------------------------------ top-k selection

@pytest.mark.parametrize("seed", range(5))
def test_top_k_keeps_the_highest_scores(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(30, generator=g)
    scores[7] = scores[21] = scores[3]  # ties: the lower index wins
    for k in (1, 5, 15, 29, 30):
        expected = sorted(sorted(range(30), key=lambda i: (-float(scores[i]), i))[:k])
        assert top_k(scores, k) == expected
    assert top_k(torch.tensor([0.0, 5.0, 5.0, -1.0, 5.0]), 2) == [1, 2]


# ------------------------------------------------------------------------------------------- head scores

def _attention_planted(h=8, kv=2, dh=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return AttentionTensors(torch.randn(h * dh, d, generator=g), torch.randn(kv * dh, d, generator=g),
                            torch.randn(kv * dh, d, generator=g), torch.randn(d, h * dh, generator=g), h, kv, dh)


def test_head_magnitude_ranks_a_head_with_tiny_weights_lowest_in_its_group():
    t = _attention_planted()
    dh = t.head_dim
    for h in (1, 6):  # one head in each KV group of four
        t.q[h * dh:(h + 1) * dh] *= 1e-3
        t.o[:, h * dh:(h + 1) * dh] *= 1e-3
    scores = HEAD_SCORES.get("magnitude").fn(t).tolist()
    assert lowest(scores[:4], 1) == {1} and lowest(scores[4:], 1) == {2}
    # a whole KV group with tiny weights is the lowest group
    t = _attention_planted(seed=1)
    t.q[16:], t.o[:, 16:], t.k[4:], t.v[4:] = t.q[16:] * 1e-3, t.o[:, 16:] * 1e-3, t.k[4:] * 1e-3, t.v[4:] * 1e-3
    groups = group_scores(HEAD_SCORES.get("magnitude").fn(t), 2).tolist()
    assert groups[1] < groups[0]


def test_group_scores_equal_sums_of_contiguous_heads():
    scores = [0.3, 1.0, 0.2, 5.0, 0.1, 0.4]
    for kv in (1, 2, 3, 6):
        rep = 6 // kv
        expected = [sum(scores[g * rep:(g + 1) * rep]) for g in range(kv)]
        assert group_scores(torch.tensor(scores), kv).tolist() == pytest.approx(expected)


# ------------------------------------------------------------------------------------------ depth scores

PER_TOKEN = ["cosine", "angular", "update_norm", "relative_update_norm"]


def _cos(x, y):
    dot = sum(a * b for a, b in zip(x, y))
    return max(-1.0, min(1.0, dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))))


DEPTH_PLAIN = {
    "cosine": lambda x, y: 1 - _cos(x, y),
    "angular": lambda x, y: math.acos(_cos(x, y)) / math.pi,
    "update_norm": lambda x, y: _l2([b - a for a, b in zip(x, y)]),
    "relative_update_norm": lambda x, y: _l2([b - a for a, b in zip(x, y)]) / _l2(x),
}


@pytest.mark.parametrize("name", PER_TOKEN)
def test_per_token_depth_scores_equal_their_definition(name):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g) * torch.tensor([1.0, 1.0, 0.01, 1.0, 0.001, 1.0])[:, None]  # some short x
    y = x + torch.randn(6, 5, generator=g) * torch.tensor([0.0, 0.1, 0.5, 1.0, 3.0, 10.0])[:, None]
    got = DEPTH_SCORES.get(name).fn(x, y).tolist()
    expected = [DEPTH_PLAIN[name](a, b) for a, b in zip(rows(x), rows(y))]
    # arccos is ill-conditioned at cos = 1: float32 gets the identity row (cos = 1 - 6e-8) only ~1e-4 close
    assert got == pytest.approx(expected, rel=1e-4, abs=5e-4 if name == "angular" else 1e-5)


@pytest.mark.parametrize("name", PER_TOKEN)
def test_per_token_depth_scores_put_an_identity_block_first_and_a_rewriting_block_last(name):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 8, generator=g)
    updates = {"identity": torch.zeros_like(x), "small": 0.05 * torch.randn(50, 8, generator=g),
               "large": 3.0 * torch.randn(50, 8, generator=g)}
    mean = {k: DEPTH_SCORES.get(name).fn(x, x + u).mean().item() for k, u in updates.items()}
    assert mean["identity"] == pytest.approx(0.0, abs=1e-3)  # float32 arccos near 1: see above
    assert mean["identity"] < mean["small"] < mean["large"]


def test_cosine_of_parallel_rows_is_clamped_so_angles_stay_defined():
    """In float32 cos(x, s x) often comes out above 1 (or below -1); unclamped, arccos would give NaN."""
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(9))
    for y in (2.5 * x, -0.5 * x):
        angular = DEPTH_SCORES.get("angular").fn(x, y)
        assert not angular.isnan().any()
        assert angular.min().item() >= 0.0 and angular.max().item() <= 1.0
        cosine = DEPTH_SCORES.get("cosine").fn(x, y)
        assert cosine.min().item() >= 0.0 and cosine.max().item() <= 2.0


def test_random_masks_keep_at_least_one_and_remove_at_least_one_unit():
    gen = torch.Generator().manual_seed(3)
    for keep, kept in ((0.05, 1), (0.5, 2), (0.99, 4)):  # round(0.25) = 0 -> 1; round(2.5) = 2; round(4.95) = 5 -> 4
        masks = random_masks(5, 40, keep, gen)
        assert masks.sum(dim=1).tolist() == [kept] * 40


def test_subnetwork_values_equal_their_definition_on_random_masks():
    gen = torch.Generator().manual_seed(6)
    masks = random_masks(5, 12, 0.6, gen)
    masks[:, 4] = False
    masks[3, 4] = True  # unit 4 is present in one sub-network only
    utilities = torch.randn(12, generator=gen, dtype=torch.float64)
    got = present_minus_absent(masks, utilities).tolist()
    for u in range(5):
        present = [float(utilities[s]) for s in range(12) if masks[s, u]]
        absent = [float(utilities[s]) for s in range(12) if not masks[s, u]]
        if absent:
            assert got[u] == pytest.approx(sum(present) / max(len(present), 1) - sum(absent) / len(absent))
        else:
            assert got[u] == math.inf


def test_subnetwork_scores_rank_a_unit_whose_removal_costs_nothing_lowest():
    """Utilities of a planted model: removing unit 2 changes nothing, unit 0 costs most (loss utility = -loss)."""
    cost = [2.0, 0.5, 0.0, 1.0]
    masks = leave_one_out_masks(4)
    utilities = torch.tensor([-1.0 - sum(cost[u] for u in range(4) if not m[u]) for m in masks.tolist()],
                             dtype=torch.float64)
    for values in (drop_when_removed(masks, utilities), present_minus_absent(masks, utilities)):
        order = sorted(range(4), key=lambda u: float(values[u]))
        assert order == [2, 1, 3, 0]
    # Monte-Carlo sub-networks of an additive model recover the same order
    mc = random_masks(4, 64, 0.5, torch.Generator().manual_seed(0))
    mc_util = torch.tensor([-sum(cost[u] for u in range(4) if not m[u]) for m in mc.tolist()], dtype=torch.float64)
    order = sorted(range(4), key=lambda u: float(present_minus_absent(mc, mc_util)[u]))
    assert order == [2, 1, 3, 0]


# ------------------------------------------------------------------------------------ SlimLLM: head scores

def test_leave_one_out_ranks_a_dead_unit_most_redundant_and_the_dominant_unit_least():
    g = torch.Generator().manual_seed(7)
    c = torch.randn(5, 300, 4, generator=g)
    c[1] = 0.0  # contributes nothing: removing it leaves Y unchanged (similarity = d, the maximum)
    c[3] *= 20.0  # carries almost all of Y
    scores = leave_one_out(contribution_moments(c).covariance()).tolist()
    order = sorted(range(5), key=lambda u: -scores[u])
    assert order[0] == 1 and order[-1] == 3
    assert scores[1] == pytest.approx(4.0)


# ------------------------------------------------------------------------------- SlimLLM: channel importance

def test_channel_importance_ranks_the_high_variance_direction_first():
    """Channels whose output weight w_j points along the direction that carries all the output variance score
    higher than channels of the same norm and activation pointing elsewhere; without the PCA weighting they tie."""
    d = 8
    g = torch.Generator().manual_seed(8)
    v = torch.randn(d, generator=g)
    v /= v.norm()
    basis = torch.linalg.qr(torch.cat([v[:, None], torch.randn(d, d - 1, generator=g)], dim=1))[0]
    along, across = basis[:, 0] * (1 if basis[:, 0] @ v > 0 else -1), basis[:, 1:4]
    w = torch.cat([across[:, :2], along[:, None], across[:, 2:], -along[:, None]], dim=1)  # channels 2 and 4 along v
    act = torch.ones(5)
    cov = 100.0 * torch.outer(v, v) + 0.01 * torch.eye(d)
    scores = feature_space_importance(w, act, cov).tolist()
    order = sorted(range(5), key=lambda j: -scores[j])
    assert set(order[:2]) == {2, 4}
    plain = feature_space_importance(w, act, cov, smooth=False).tolist()
    assert plain == pytest.approx([1.0] * 5, rel=1e-5)
    # the activation norm multiplies: a silent channel is last whatever its direction
    act[2] = 0.0
    assert min(range(5), key=lambda j: feature_space_importance(w, act, cov)[j].item()) == 2


def test_input_terms_ignore_weights_on_dead_features():
    gate = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    up = torch.tensor([[3.0, 0.0], [0.0, -3.0], [-1.0, 1.0]])
    norm = torch.tensor([0.0, 2.0])  # feature 0 is dead on the calibration data
    got = input_terms(gate, up, norm).tolist()
    # ||W[j] * n||_2 for gate plus the same for up
    assert got == pytest.approx([0.0, 12.0, 4.0])


@pytest.mark.parametrize("m,count", [(300, 40), (768, 150), (96, 24), (40, 10)])
def test_channels_to_prune_follows_the_one_percent_rule(m, count):
    scores = torch.randperm(m, generator=torch.Generator().manual_seed(m)).float()
    ascending = sorted(range(m), key=lambda j: float(scores[j]))
    m0 = round(0.01 * m)  # the lowest 1% is kept (LoRAP's rule)
    assert channels_to_prune(scores, count) == sorted(ascending[m0:m0 + count])
    assert channels_to_prune(scores, count, keep_lowest=False) == sorted(ascending[:count])
    if m0:
        assert not set(ascending[:m0]) & set(channels_to_prune(scores, count))


def test_channels_to_prune_breaks_ties_by_index():
    """Dead channels score exactly 0 and tie: the lowest indices come first (kept by the 1% rule), whatever the
    sort does with ties for this size."""
    scores = torch.randperm(300, generator=torch.Generator().manual_seed(4)).float() + 1.0
    dead = [250, 10, 180, 40, 120, 7, 299, 66]
    scores[dead] = 0.0
    assert channels_to_prune(scores, 5) == sorted(dead)[3:8]  # round(0.01 * 300) = 3 kept
    assert channels_to_prune(scores, 5, keep_lowest=False) == sorted(dead)[:5]


def test_channels_to_prune_never_runs_past_the_end():
    scores = torch.arange(300.0)
    # 298 of 300 with 3 kept at the bottom cannot fit: the offset shrinks so that exactly `count` are pruned
    assert channels_to_prune(scores, 298) == list(range(2, 300))
    assert channels_to_prune(scores, 300 - 3) == list(range(3, 300))


# --------------------------------------------------------------------- SlimLLM: similarity, ratios, regression

def _pearson_plain(x: torch.Tensor, y: torch.Tensor) -> float:
    """sum over columns of |Pearson correlation| (population moments), dead columns counting 0, in plain Python."""
    total = 0.0
    for k in range(x.shape[1]):
        a, b = [float(v) for v in x[:, k]], [float(v) for v in y[:, k]]
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((p - ma) * (q - mb) for p, q in zip(a, b)) / len(a)
        va, vb = sum((p - ma) ** 2 for p in a) / len(a), sum((q - mb) ** 2 for q in b) / len(b)
        total += abs(cov) / math.sqrt(va * vb) if va * vb > 0 else 0.0
    return total


def test_pearson_similarity_counts_anti_correlation_and_small_scales():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.01, 1e-3, 1.0, 1.0])
    y = torch.randn(300, 5, generator=g, dtype=torch.float64) * 0.02 + x * torch.tensor([1.0, -1.0, 3.0, -0.5, 0.0])
    y[:, 4] = 0.5  # a dead column counts 0
    assert pearson_similarity(x, y).item() == pytest.approx(_pearson_plain(x, y), rel=1e-9)
    assert pearson_similarity(x, -x).item() == pytest.approx(5.0)  # |-1| in every column


def test_eq11_refuses_impossible_layer_counts_and_averages():
    sims = torch.tensor([0.9, 0.8, 0.95, 0.7])
    for n_pruned in (0, 5):
        with pytest.raises(ValueError, match="n_pruned"):
            eq11_ratios(sims, 0.2, n_pruned, 10.0)
    assert eq11_ratios(sims, 0.2, 1, 10.0).tolist() == pytest.approx([0.0, 0.0, 0.2, 0.0])  # one layer: the most similar
    assert int((eq11_ratios(sims, 0.2, 4, 10.0) > 0).sum()) == 4
    # an average exactly at the clip is allowed: the two most similar layers get the clip each
    assert eq11_ratios(sims, 0.9, 2, 10.0, clip=0.9).tolist() == pytest.approx([0.9, 0.0, 0.9, 0.0])
    with pytest.raises(ValueError, match="exceeds the clip"):
        eq11_ratios(sims, 0.91, 2, 10.0, clip=0.9)


def test_regression_treats_numerically_constant_columns_as_constant():
    """The variance guard is relative: a column whose variance is 1e-16 of its mean square is constant (a = 1,
    b = 0); one at 1e-8 is still fitted."""
    g = torch.Generator().manual_seed(12)
    n = 500
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = torch.stack([1000.0 + 1e-5 * noise[:, 0], 1.0 + 1e-4 * noise[:, 1]], dim=1)
    y = 3.0 * x + 0.25
    a, b = regression_fit(x.sum(0), y.sum(0), (x * x).sum(0), (x * y).sum(0), n)
    assert (a[0].item(), b[0].item()) == (1.0, 0.0)
    assert a[1].item() == pytest.approx(3.0, rel=1e-4) and b[1].item() == pytest.approx(0.25, abs=1e-3)


def test_regression_without_bias_is_the_least_squares_scale():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = x * torch.tensor([2.0, -0.5, 1.0]) + 0.1 * torch.randn(400, 3, generator=g, dtype=torch.float64)
    x[:, 2] = 0.0  # nothing to scale: a = 1
    a, b = regression_fit(x.sum(0), y.sum(0), (x * x).sum(0), (x * y).sum(0), 400, with_bias=False)
    for k in range(2):
        xs, ys = [float(v) for v in x[:, k]], [float(v) for v in y[:, k]]
        assert a[k].item() == pytest.approx(sum(p * q for p, q in zip(xs, ys)) / sum(p * p for p in xs), rel=1e-9)
    assert a[2].item() == 1.0 and b.tolist() == [0.0, 0.0, 0.0]
