"""Shapley values of depth units: the exact enumeration against the definition, the antithetic permutation estimate
against exact values (rank and reported error), efficiency, the contrasts under their true names."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import core
from conftest import save_tiny
from core.architectures import spec_for_config
from core.calibration import load_calibration
from core.layers import units_disabled
from core.scores.depth import drop_when_removed, leave_one_out_masks, present_minus_absent
from core.scores.shapley import exact_plan, exact_values, permutation_plan, shapley_plan

CALIB = core.CalibrationConfig(n_samples=4, seq_len=32)


def _game(weights: torch.Tensor, synergy: torch.Tensor):
    """v(S) = sum of weights in S + sum of pairwise synergies inside S + a bonus for large coalitions."""
    def v(mask: torch.Tensor) -> torch.Tensor:
        m = mask.double()
        return m @ weights + torch.einsum("si,ij,sj->s", m, synergy, m) / 2 + (m.sum(1) >= 0.7 * m.shape[1]).double()
    return v


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def _by_definition(v, units: int) -> torch.Tensor:
    """Shapley values as the mean marginal contribution over all orderings."""
    values = torch.zeros(units, dtype=torch.float64)
    orders = list(itertools.permutations(range(units)))
    for order in orders:
        mask = torch.zeros(1, units, dtype=torch.bool)
        before = v(mask)[0]
        for unit in order:
            mask[0, unit] = True
            after = v(mask)[0]
            values[unit] += after - before
            before = after
    return values / len(orders)


def test_exact_enumeration_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    units = 5
    v = _game(torch.randn(units, generator=g, dtype=torch.float64),
              torch.randn(units, units, generator=g, dtype=torch.float64))
    plan = exact_plan(units)
    assert plan.masks.shape == (32, units)
    estimate = plan.estimate(v(plan.masks))
    torch.testing.assert_close(estimate.values, _by_definition(v, units))
    full, empty = torch.ones(1, units, dtype=torch.bool), torch.zeros(1, units, dtype=torch.bool)
    assert estimate.values.sum().item() == pytest.approx((v(full) - v(empty)).item())  # efficiency


def test_permutation_plan_is_antithetic_prefix_chains():
    plan = permutation_plan(6, 5, torch.Generator().manual_seed(0))  # 5 orderings -> 3 pairs
    chains = plan.masks.reshape(6, 7, 6)
    assert (chains[:, 0] == False).all() and (chains[:, -1] == True).all()  # noqa: E712
    assert ((chains[:, 1:].long() - chains[:, :-1].long()).sum(-1) == 1).all()  # one unit added per step
    order = lambda chain: (chain[1:].long() - chain[:-1].long()).argmax(-1)  # noqa: E731
    for p in range(0, 6, 2):
        assert order(chains[p]).flip(0).tolist() == order(chains[p + 1]).tolist()
    estimate = plan.estimate(torch.randn(42, dtype=torch.float64))
    assert estimate.info == {"estimator": "permutation_antithetic", "samples": 6, "pairs": 3}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_estimate_matches_exact_values_within_its_error_above_the_exact_limit(seed):
    g = torch.Generator().manual_seed(seed)
    units = 14  # above the default exact limit (12): shapley_plan samples
    weights = torch.linspace(-1.0, 2.0, units, dtype=torch.float64)[torch.randperm(units, generator=g)]
    v = _game(weights, 0.1 * torch.randn(units, units, generator=g, dtype=torch.float64))
    exact = exact_values(v(exact_plan(units).masks), units)
    plan = shapley_plan(units, 400, torch.Generator().manual_seed(seed))
    assert plan.masks.shape[0] == 400 * (units + 1)
    estimate = plan.estimate(v(plan.masks))
    assert estimate.info["estimator"] == "permutation_antithetic" and estimate.info["samples"] == 400
    assert _spearman(estimate.values, exact) >= 0.95
    assert ((estimate.values - exact).abs() <= 4 * estimate.stderr + 1e-12).all()
    assert estimate.values.sum().item() == pytest.approx((v(torch.ones(1, units, dtype=torch.bool))
                                                          - v(torch.zeros(1, units, dtype=torch.bool))).item())


def test_the_reported_standard_error_is_calibrated():
    """Over many units and seeds, (estimate - exact) / stderr has unit spread and ~5% beyond 2."""
    units, z = 10, []
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        v = _game(torch.randn(units, generator=g, dtype=torch.float64),
                  0.3 * torch.randn(units, units, generator=g, dtype=torch.float64))
        exact = exact_values(v(exact_plan(units).masks), units)
        plan = permutation_plan(units, 100, torch.Generator().manual_seed(100 + seed))
        estimate = plan.estimate(v(plan.masks))
        z.append((estimate.values - exact) / estimate.stderr)
    z = torch.cat(z)
    assert 0.75 < z.std().item() < 1.3
    assert (z.abs() > 2).double().mean().item() < 0.12


def test_the_contrast_over_leave_one_out_subnetworks_ranks_exactly_like_the_single_removal_drop():
    """Why `shapley_loo` was renamed: on leave-one-out sub-networks E[U|present] - E[U|absent] is a decreasing
    function of U(without i), so it carries no more than the perplexity drop."""
    masks = leave_one_out_masks(7)
    for seed in range(5):
        u = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert present_minus_absent(masks, u).argsort().tolist() == drop_when_removed(masks, u).argsort().tolist()


# -- on a model: five blocks of planted importance -------------------------------------------------------------

@pytest.fixture(scope="module")
def five_blocks(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=96, num_hidden_layers=5, vocab_size=4096, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
        for i, scale in enumerate([1.0, 8.0, 0.3, 3.0, 0.05]):  # blocks of very different weight
            model.model.layers[i].self_attn.o_proj.weight.mul_(scale)
            model.model.layers[i].mlp.down_proj.weight.mul_(scale)
    return save_tiny(model.eval(), tmp_path_factory.mktemp("five"))


def _depth(folder, score="shapley", **options):
    recipe = core.Recipe(model=str(folder), method="depth", score=score, target=core.Target(ratio=0.2),
                         options=options, calibration=CALIB, batch_size=2)
    return core.run_recipe(recipe)


def _own_exact_shapley(folder) -> torch.Tensor:
    """Exact Shapley values of the 5 blocks for minus the calibration loss, computed here from scratch."""
    model, tokenizer = core.load_model(str(folder), core.LoadOptions(device="cpu"))
    spec = spec_for_config(model.config)
    ids = load_calibration(tokenizer, CALIB)

    def utility(present: tuple[int, ...]) -> float:
        with torch.no_grad(), units_disabled(model, spec, "block", [i for i in range(5) if i not in present]):
            logits = model(ids, use_cache=False).logits.float()
        return -torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:]).item()

    v = {s: utility(s) for k in range(6) for s in itertools.combinations(range(5), k)}
    values = torch.zeros(5, dtype=torch.float64)
    for i in range(5):
        for s, u in v.items():
            if i not in s:
                w = math.factorial(len(s)) * math.factorial(5 - len(s) - 1) / math.factorial(5)
                values[i] += w * (v[tuple(sorted(s + (i,)))] - u)
    return values


def test_exact_shapley_on_a_model_equals_our_own_enumeration(five_blocks):
    result = _depth(five_blocks)
    estimate = result.report["estimate"]
    assert estimate["estimator"] == "exact" and estimate["subnetworks_evaluated"] == 32
    got = torch.tensor([result.report["scores"][str(i)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(got, _own_exact_shapley(five_blocks), rtol=1e-4, atol=1e-5)
    assert result.report["removed"] == [int(got.argmin())]  # the least valuable block goes


def test_sampled_shapley_on_a_model_matches_exact_within_the_reported_error(five_blocks):
    exact = _depth(five_blocks).report["scores"]
    sampled = _depth(five_blocks, exact_max=0, samples=120).report
    estimate = sampled["estimate"]
    assert estimate["estimator"] == "permutation_antithetic" and estimate["samples"] == 120
    assert estimate["subnetworks_evaluated"] <= 32  # each distinct sub-network evaluated once
    e = torch.tensor([exact[str(i)] for i in range(5)])
    s = torch.tensor([sampled["scores"][str(i)] for i in range(5)])
    se = torch.tensor([estimate["stderr"][str(i)] for i in range(5)])
    assert _spearman(s, e) >= 0.95
    assert ((s - e).abs() <= 3 * se + 1e-6).all()


def test_former_names_still_work_with_a_deprecation_warning(five_blocks):
    with pytest.warns(DeprecationWarning, match="now called 'loo_contrast'"):
        old = _depth(five_blocks, score="shapley_loo")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = _depth(five_blocks, score="loo_contrast")
    assert old.report["score"] == new.report["score"] == "loo_contrast"
    assert old.report["scores"] == new.report["scores"] and old.report["removed"] == new.report["removed"]
    recipe = core.Recipe(method="depth", score="shapley_mc", target=core.Target(ratio=0.2))
    with pytest.warns(DeprecationWarning, match="now called 'subnet_contrast'"):
        assert core.methods.METHODS.get("depth").score_name(recipe) == "subnet_contrast"


def test_plans_describe_themselves_and_switch_at_their_limits():
    exact = exact_plan(3)
    assert exact.estimate(torch.zeros(8)).info == {"estimator": "exact", "subnetworks": 8}
    assert exact_plan(16).masks.shape == (2 ** 16, 16)  # the largest exact enumeration allowed
    with pytest.raises(ValueError, match="2\\^17"):
        exact_plan(17)
    gen = torch.Generator().manual_seed(0)
    assert shapley_plan(3, 8, gen, exact_max=3).estimate(torch.zeros(8)).info["estimator"] == "exact"
    assert shapley_plan(4, 8, gen, exact_max=3).estimate(torch.zeros(40)).info["estimator"] == "permutation_antithetic"


def test_permutation_standard_error_is_the_spread_of_pair_means():
    gen = torch.Generator().manual_seed(1)
    one = permutation_plan(4, 1, gen)  # one ordering asked: one antithetic pair, no spread to measure
    assert one.masks.shape == (2 * 5, 4)
    single = one.estimate(torch.arange(10, dtype=torch.float64))
    assert single.info["pairs"] == 1 and torch.isinf(single.stderr).all()
    plan = permutation_plan(4, 4, torch.Generator().manual_seed(2))  # two pairs
    utilities = torch.rand(plan.masks.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est = plan.estimate(utilities)
    v = utilities.reshape(4, 5)
    marginal = torch.zeros(4, 4, dtype=torch.float64)
    for p in range(4):  # the unit added at each step of ordering p is the one that turns on in the mask
        for j in range(4):
            unit = int((plan.masks[p * 5 + j + 1] & ~plan.masks[p * 5 + j]).nonzero())
            marginal[p, unit] = v[p, j + 1] - v[p, j]
    pair_means = marginal.reshape(2, 2, 4).mean(1)
    assert torch.allclose(est.values, pair_means.mean(0))
    spread = ((pair_means - pair_means.mean(0)) ** 2).sum(0) / (2 - 1)  # sample variance of the pair means
    assert torch.allclose(est.stderr, spread.sqrt() / math.sqrt(2))
