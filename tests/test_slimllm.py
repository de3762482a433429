"""SlimLLM: the maths against explicit definitions, the search and regression guarantees, targets, round trips."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

import core
from conftest import logits, tiny_model
from core.architectures import spec_for_config
from core.layers import decoder_layers
from core.methods import METHODS, PruneContext
from core.pipeline import LayerwiseRunner
from core.progress import Progress
from core.scores.slimllm import (contribution_moments, eq11_ratios, feature_space_importance,
                                 feature_space_importance_from_outputs, greedy_search,
                                 leave_one_out, pearson_similarity, regression_fit, subset_similarity)
from core.stats import forward_hooks


def _contributions(seed: int, units: int = 8, n: int = 300, d: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, d, generator=g)
    scale = torch.rand(units, 1, 1, generator=g) * 2
    return scale * (0.5 * shared + torch.randn(units, n, d, generator=g)) + torch.randn(units, 1, d, generator=g)


def test_moment_similarity_equals_explicit_pearson():
    c = _contributions(0)
    cov = contribution_moments(c).covariance()
    y = c.sum(0)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.float64)
    explicit = pearson_similarity((c * keep[:, None, None]).sum(0), y)
    assert subset_similarity(cov, keep).item() == pytest.approx(explicit.item(), rel=1e-9)
    loo = leave_one_out(cov)
    for u in range(c.shape[0]):
        assert loo[u].item() == pytest.approx(pearson_similarity(y - c[u], y).item(), rel=1e-9)


def test_moments_of_batches_add_up():
    c = _contributions(1)
    whole = contribution_moments(c)
    a, b = contribution_moments(c[:, :100]), contribution_moments(c[:, 100:])
    torch.testing.assert_close(whole.covariance(), type(whole)(a.m1 + b.m1, a.m2 + b.m2, a.n + b.n).covariance())


def _similarity(c: torch.Tensor, units) -> float:
    c = c.double()
    y = c.sum(0)
    x = c[list(units)].sum(0) if units else torch.zeros_like(y)
    return pearson_similarity(x, y).item()


def _covariance(c: torch.Tensor) -> torch.Tensor:
    """Cov_k[u, v] over tokens for every column k, straight from the definition (population): [d, U, U]."""
    x = c.double() - c.double().mean(dim=1, keepdim=True)
    return x.permute(2, 0, 1) @ x.permute(2, 1, 0) / c.shape[1]


def naive_algorithm1(c: torch.Tensor, k: int, groups: list[int] | None = None) -> tuple[list[int], float]:
    """SlimLLM's Algorithm 1 (spec section 2) written out on explicit contributions c [U, N, d], no shortcuts:
    leave-one-out similarities, the k most redundant as candidates (per group when grouped), then for each
    candidate in order the best improving swap with a kept unit (of its group), evaluated from scratch."""
    c = c.double()
    n_units = c.shape[0]
    y = c.sum(0)
    loo = [pearson_similarity(y - c[u], y).item() for u in range(n_units)]
    order = sorted(range(n_units), key=lambda u: (-loo[u], u))
    if groups is None:
        candidates, kept = order[:k], order[k:]
    else:
        per_group = k // (max(groups) + 1)
        candidates, kept = [], []
        for g in sorted(set(groups)):
            members = [u for u in order if groups[u] == g]
            candidates += members[:per_group]
            kept += members[per_group:]
    best = _similarity(c, kept)
    for p in candidates:
        trials = []
        for pos, j in enumerate(kept):
            if groups is not None and groups[j] != groups[p]:
                continue
            trial = kept[:pos] + [p] + kept[pos + 1:]
            trials.append((_similarity(c, trial), pos))
        if not trials:
            continue
        value, pos = max(trials, key=lambda t: (t[0], -t[1]))  # the first of equal maxima
        if value > best:
            best, kept = value, kept[:pos] + [p] + kept[pos + 1:]
    return sorted(kept), best


def _copies(n=2000, d=8, seed=0, scale=1.0) -> torch.Tensor:
    """Units 0 and 1 are copies of one signal (1% noise); units 2, 3, 4 are independent, all of one scale.
    Either copy alone looks the most redundant (the other still carries its signal), yet removing both loses it."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    twins = torch.stack([a, a + 0.01 * torch.randn(n, d, generator=g)])
    return scale * torch.cat([twins, torch.randn(3, n, d, generator=g)])


def test_greedy_search_fixes_the_plain_ranking_on_a_planted_copy():
    c = _copies()
    cov = contribution_moments(c).covariance()
    scores = leave_one_out(cov)
    # premise: the two copies are the two most redundant-looking units, so the plain ranking prunes both
    assert sorted(range(5), key=lambda u: -float(scores[u]))[:2] in ([0, 1], [1, 0])
    plain, start, _ = greedy_search(cov, scores, 2, greedy=False)
    assert plain == [2, 3, 4]
    kept, start, best = greedy_search(cov, scores, 2)
    # the search swaps one copy back in: exactly one copy survives, and the similarity rises clearly
    assert len({0, 1} & set(kept)) == 1 and len(kept) == 3
    assert best > start + 0.5
    assert best == pytest.approx(_similarity(c, kept), rel=1e-9)
    assert start == pytest.approx(_similarity(c, plain), rel=1e-9)
    # it is the best single swap from the plain ranking (no pair of units beats it by one exchange)
    swaps = [_similarity(c, [p if u == j else u for u in plain]) for p in (0, 1) for j in plain]
    assert best == pytest.approx(max(swaps), rel=1e-9)
    want_kept, want_best = naive_algorithm1(c, 2)
    assert kept == want_kept and best == pytest.approx(want_best, rel=1e-9)


def test_single_swap_search_cannot_undo_a_pair_that_cancels():
    """Units 0 and 1 cancel, so pruning both is optimal, but pruning either alone is the worst move: the ranking
    keeps both, and Algorithm 1 accepts only improving single swaps, so no swap helps. A limit of the paper's
    search, not a bug of ours (the result equals Algorithm 1 written out); a test that expects the search to find
    the pair would wait forever."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(4, 400, 6, generator=g)
    twin = torch.randn(400, 6, generator=g) * 3
    c = torch.cat([torch.stack([twin, -twin + 0.01 * torch.randn(400, 6, generator=g)]), base])
    cov = contribution_moments(c).covariance()
    kept, start, best = greedy_search(cov, leave_one_out(cov), 2)
    assert {0, 1} <= set(kept)
    optimum = max(itertools.combinations(range(6), 4), key=lambda K: _similarity(c, K))
    assert set(optimum) == {2, 3, 4, 5} and _similarity(c, optimum) > best + 1.0
    want_kept, want_best = naive_algorithm1(c, 2)
    assert kept == want_kept and best == pytest.approx(want_best, rel=1e-9)


def _mixed_units(seed: int, units: int = 8, n: int = 400, d: int = 6) -> torch.Tensor:
    """Random contributions with planted redundancy: pairs of near-copies and units of very different scales, so
    that the plain ranking is often wrong and several swaps in sequence interact."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(units, n, d, generator=g) * (0.3 + 2 * torch.rand(units, 1, 1, generator=g))
    for a, b in ((0, 1), (2, 5), (4, 7)):
        if torch.rand(1, generator=g).item() < 0.7:
            base[b] = base[a] * (0.5 + torch.rand(1, generator=g).item()) + 0.05 * torch.randn(n, d, generator=g)
    return base + torch.randn(units, 1, d, generator=g)


@pytest.mark.parametrize("grouped", [False, True])
def test_greedy_search_equals_algorithm_1_written_out(grouped):
    """Over 16 planted cases, the incremental search returns what the from-scratch algorithm returns (same kept
    set, same objective); the cases include several that swap, and some with more than one swap."""
    swaps = multi = 0
    for seed in range(16):
        c = _mixed_units(seed)
        cov = _covariance(c)
        groups = [u // 4 for u in range(8)] if grouped else None
        k = 4 if grouped else 3
        kept, start, best = greedy_search(cov, leave_one_out(cov), k,
                                          torch.tensor(groups) if grouped else None)
        want_kept, want_best = naive_algorithm1(c, k, groups)
        assert kept == want_kept, f"seed {seed}"
        assert best == pytest.approx(want_best, rel=1e-9), f"seed {seed}"
        assert best >= start - 1e-12  # never worse than the plain ranking
        plain, _, _ = greedy_search(cov, leave_one_out(cov), k, torch.tensor(groups) if grouped else None,
                                    greedy=False)
        changed = len(set(kept) - set(plain))
        swaps += changed > 0
        multi += changed > 1
        if grouped:
            assert sorted(groups[u] for u in kept) == [0, 0, 1, 1]
    assert swaps >= 5 and multi >= 1  # the cases exercise the search


@pytest.mark.parametrize("grouped", [False, True])
def test_dead_units_tie_and_the_lowest_indices_are_pruned_first(grouped):
    """Units that contribute nothing all have the highest leave-one-out similarity, exactly tied: the candidates
    are the lowest-indexed of them (a stable order, whatever the sort does with ties for 100 units), and no swap
    between two dead units counts as an improvement."""
    g = torch.Generator().manual_seed(14)
    c = torch.randn(100, 60, 4, generator=g, dtype=torch.float64)
    dead = [90, 3, 57, 12, 71, 44, 28, 99, 65, 8]
    c[dead] = 0.0
    cov = _covariance(c)
    groups = torch.arange(100) // 50 if grouped else None
    kept, start, best = greedy_search(cov, leave_one_out(cov), 4, groups)
    pruned = sorted(set(range(100)) - set(kept))
    expected = [3, 8, 57, 65] if grouped else [3, 8, 12, 28]  # two per group of 50 when grouped
    assert pruned == expected and best == start


def test_feature_space_importance_closed_form():
    g = torch.Generator().manual_seed(2)
    d, m, n = 10, 7, 200
    w = torch.randn(d, m, generator=g)
    act = torch.randn(n, m, generator=g)
    f = act @ w.T
    fc = f - f.mean(0)
    cov = (fc.T @ fc).double()
    lam, vecs = torch.linalg.eigh(cov)
    s = torch.sigmoid(lam / lam.mean())
    proj = (w.double().T @ vecs).abs() * s  # D_jk
    explicit = act.double().norm(dim=0) * proj.norm(dim=1)
    got = feature_space_importance(w, act.norm(dim=0), cov)
    torch.testing.assert_close(got.double(), explicit, rtol=1e-5, atol=1e-6)
    plain = feature_space_importance(w, act.norm(dim=0), cov, smooth=False)
    torch.testing.assert_close(plain.double(), act.double().norm(dim=0) * w.double().norm(dim=0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("n", [1, 2, 6, 10])
def test_feature_space_importance_from_fewer_outputs_than_features_equals_the_covariance_form(n):
    """With N <= d tokens the N x N eigenproblem gives the d x d one's Id_j (null space weighted by sigmoid(0))."""
    g = torch.Generator().manual_seed(5)
    d, m = 10, 7
    w = torch.randn(d, m, generator=g)
    act = torch.randn(n, m, generator=g) * torch.tensor([5.0, 1, 1, 0.01, 1, 1, 3])  # uneven channels
    f = act @ w.T
    fc = f.double() - f.double().mean(0)
    cov = fc.T @ fc
    lam, vecs = torch.linalg.eigh(cov)
    s = torch.sigmoid(lam.clamp_min(0) / lam.clamp_min(0).mean().clamp_min(1e-12))
    explicit = act.double().norm(dim=0) * ((w.double().T @ vecs).abs() * s).norm(dim=1)  # eqs. 5-7 as written
    got = feature_space_importance_from_outputs(w, act.norm(dim=0), f)
    torch.testing.assert_close(got.double(), explicit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, feature_space_importance(w, act.norm(dim=0), cov), rtol=1e-5, atol=1e-6)
    if n > 1:  # the weighting matters: plain norms rank the channels differently
        assert not torch.allclose(got, feature_space_importance(w, act.norm(dim=0), None, smooth=False), rtol=1e-3)


def test_feature_space_importance_from_outputs_with_a_nearly_silent_direction():
    """An output direction with almost no variance (lambda / mean = 5e-5, where the small-eigenvalue form of g is
    used) and small output weights (w^T M w < 1): both forms still agree to float32 precision."""
    g = torch.Generator().manual_seed(6)
    n, d, m = 6, 10, 7
    basis_t = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    basis_d = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    lam = torch.tensor([40.0, 9.0, 4.0, 1.0, 0.0])
    mu = lam.sum() / d
    lam[4] = 5e-5 * mu  # the nearly silent direction, still far above rounding
    left = centre @ basis_t[:, :5]
    left = torch.linalg.qr(left)[0]  # orthonormal, centred columns
    f = (left * lam.double().sqrt()) @ basis_d[:, :5].T + 3.0  # a constant offset: the centring removes it
    w = 0.05 * torch.randn(d, m, generator=g)
    act = torch.rand(m, generator=g) + 0.5
    fc = f - f.mean(0)
    cov = fc.T @ fc
    got = feature_space_importance_from_outputs(w, act, f.float())
    expected = feature_space_importance(w, act, cov)
    assert (got / act).pow(2).max() < 0.05  # w^T M w well below 1
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)


def test_feature_space_importance_from_outputs_refuses_more_tokens_than_features():
    with pytest.raises(ValueError, match="tokens > hidden size"):
        feature_space_importance_from_outputs(torch.randn(4, 3), torch.ones(3), torch.randn(5, 4))


def test_regression_is_exact_on_a_linear_relation():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 5, generator=g, dtype=torch.float64)
    a_true, b_true = torch.tensor([2.5, -1.0, 0.3, 1.0, 4.0]), torch.tensor([0.7, 0.0, -2.0, 1.0, 0.1])
    y = a_true * x + b_true
    x[:, 3] = 1.0  # a constant column: Var = 0 -> a = 1, b = 0
    a, b = regression_fit(x.sum(0), y.sum(0), (x * x).sum(0), (x * y).sum(0), 500)
    for k in (0, 1, 2, 4):
        assert a[k].item() == pytest.approx(a_true[k].item(), abs=1e-9)
        assert b[k].item() == pytest.approx(b_true[k].item(), abs=1e-9)
    assert (a[3].item(), b[3].item()) == (1.0, 0.0)


def test_eq11_ratios_average_to_r0_and_respect_the_clip():
    sims = torch.tensor([0.5, 0.9, 0.95, 0.97, 0.99, 0.96, 0.8, 0.6])
    r = eq11_ratios(sims, 0.4, 6, 10.0)
    chosen = r > 0
    assert int(chosen.sum()) == 6 and r[0] == 0 and r[7] == 0  # least similar layers are not pruned
    assert r[chosen].mean().item() == pytest.approx(0.4)
    assert r[4] > r[3] > r[2] > r[1]  # more similar -> pruned harder
    clipped = eq11_ratios(sims, 0.8, 6, 40.0, clip=0.9)
    assert clipped.max().item() <= 0.9 + 1e-12
    assert clipped[clipped > 0].mean().item() == pytest.approx(0.8)


def _sublayer_output(model, spec, runner, branch):
    """Output of layer 0's o_proj ('attention') or down_proj ('mlp') on the runner's calibration batches: [N, d]."""
    path = f"{spec.attention.module}.{spec.attention.o}" if branch == "attention" else f"{spec.mlp.module}.{spec.mlp.down}"
    captured = []
    with forward_hooks({"t": decoder_layers(model, spec)[0].get_submodule(path)},
                       lambda name, mod, inp, out: captured.append(out.detach())):
        runner.run_layer(0)
    return torch.cat([x.flatten(0, -2) for x in captured])


@pytest.mark.parametrize("branch", ["attention", "mlp"])
def test_regression_lowers_the_pruned_sublayer_error(branch, tiny_dir):
    src = tiny_dir("llama")
    model, tokenizer = core.load_model(str(src), core.LoadOptions(device="cpu"))
    spec = spec_for_config(model.config)
    method = METHODS.get("slimllm")
    errors = {}
    for regression in (False, True):
        m = copy.deepcopy(model)
        recipe = core.Recipe(method="slimllm", target=core.Target(ratio=0.3), options={"regression": regression},
                             calibration=core.CalibrationConfig(n_samples=8, seq_len=64))
        ctx = PruneContext(m, tokenizer, spec, recipe, Progress())
        opts = method.options(recipe)
        if regression:
            from core.surgery import enable_bias
            enable_bias(m, spec, branch)
        runner = LayerwiseRunner(m, spec, ctx.calibration_ids(), 4)
        reference = _sublayer_output(m, spec, runner, branch)
        if branch == "attention":
            method.prune_heads(ctx, opts, runner, 0, 1, fold_bias=regression)
        else:
            method.prune_mlp(ctx, opts, runner, 0, 48, fold_bias=regression)
        pruned = _sublayer_output(m, spec, runner, branch)
        errors[regression] = (pruned - reference).pow(2).mean().item()
    assert errors[True] < errors[False]


SWITCHES = [{}, {"greedy": False}, {"feature_space": False}, {"nonuniform": False}, {"regression": False},
            {"keep_lowest": False}, {"head_mode": "query"},
            {"nonuniform": False, "regression": False, "protect_ends": False}]


@pytest.mark.parametrize("options", SWITCHES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "all")
def test_every_option_round_trips(tiny_dir, tmp_path, options, tokens):
    src = tiny_dir("llama")
    recipe = core.Recipe(model=str(src), method="slimllm", target=core.Target(ratio=0.3), options=options,
                         calibration=core.CalibrationConfig(n_samples=8, seq_len=64))
    result = core.run_recipe(recipe)
    out = core.save_pruned(result, tmp_path / "out")
    if result.uniform:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    else:
        reloaded = core.load_pruned(str(out), device="cpu")
    torch.testing.assert_close(logits(reloaded, tokens), logits(result.model, tokens), atol=1e-5, rtol=0)
    recorded = core.Recipe.from_file(out / "pruning_recipe.yaml")
    assert recorded.options == options
    if options.get("nonuniform") is False and options.get("protect_ends") is False:
        assert result.uniform, "uniform ratios on every layer give a plain-transformers checkpoint"


def test_slimllm_handles_families_without_bias_support(tiny_dir, tmp_path, tokens):
    src = tiny_dir("qwen2")
    result = core.run_recipe(core.Recipe(model=str(src), method="slimllm", target=core.Target(ratio=0.3),
                                         calibration=core.CalibrationConfig(n_samples=8, seq_len=64)))
    assert result.report["regression_fold"] == {"attention": "scale", "mlp": "scale"}
    out = core.save_pruned(result, tmp_path / "out")
    reloaded = core.load_pruned(str(out), device="cpu")
    torch.testing.assert_close(logits(reloaded, tokens), logits(result.model, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options,message", [
    ({"head_mode": "heads"}, r"head_mode must be one of kv_group, query"),
    ({"clip": 1.0}, r"clip must be number in \(0, 1\)"),
    ({"clip": 0.0}, r"clip must be number in \(0, 1\)"),
    ({"prune_heads": False, "prune_mlp": False}, "removes nothing"),
    ({"greedy_search": True}, "has no option 'greedy_search'"),
])
def test_slimllm_options_are_validated_before_any_model_is_loaded(options, message):
    from core.errors import RecipeError
    from core.prune import normalize

    with pytest.raises(RecipeError, match=message):
        normalize(core.Recipe(method="slimllm", target=core.Target(ratio=0.2), options=options,
                              model="/nonexistent/model"))


@pytest.mark.parametrize("family,recipe,message", [
    ("llama_mha", dict(target=core.Target(ratio=0.3), options={"head_mode": "query"}), "no GQA groups"),
    ("llama", dict(target=core.Target(ratio=0.5), options={"nonuniform": False, "clip": 0.3, "protect_ends": False}),
     "above the clip"),
    ("llama", dict(target=core.Target(ratio=0.5), options={"pruned_layers": 1, "clip": 0.5, "protect_ends": False},
                   layers=core.LayerSelection(protect_first=3)), "above the clip"),
])
def test_slimllm_targets_it_cannot_meet_are_refused(tiny_dir, family, recipe, message):
    from core.errors import InvalidTargetError

    with pytest.raises(InvalidTargetError, match=message):
        core.run_recipe(core.Recipe(model=str(tiny_dir(family)), method="slimllm",
                                    calibration=core.CalibrationConfig(n_samples=2, seq_len=16), **recipe))
