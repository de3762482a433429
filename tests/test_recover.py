"""Recovery training: the loss goes down, exports reload by name with the recovered weights, sparsity masks stay
exact (all weights and LoRA), an interrupted run resumes to the same weights, nothing is written on interrupts or
errors, and the memory check refuses runs that cannot fit."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import core
from conftest import logits, save_tiny, tiny_model
from recover_fixtures import one_thread, tokenizer  # noqa: F401  (fixtures)
from core import Recipe, Target
from core.cli import main
from core.errors import InsufficientMemoryError, RecipeError
from core.export import RECIPE_FILE
from core.recover import Recovery, recover
from core.recover_cli import checkpoint_dir
from core.recover_config import RecoverConfig
from core.recover_loss import hidden_loss, kd_loss, layer_pairs, proportional_origin
from core.recover_run import surviving_layers

# a short, fast budget: tiny models learn the token statistics of real text within a few dozen steps
FAST = dict(batch_size=4, seq_len=32, eval_every=5, data_tokens=20_000, lr=3e-3, warmup=2, kd=1.0, lm=1.0)




def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_kd_loss_is_zero_for_equal_logits_and_scales_with_temperature():
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    assert kd_loss(a, a, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(a, b, 1.0).item() > 0
    # T^2 keeps gradient scales comparable across temperatures; at large T the loss tends to the MSE of centred
    # logits / (2 V), independent of T
    big = kd_loss(a, b, 100.0).item()
    centred = (a - a.mean(-1, keepdim=True)) - (b - b.mean(-1, keepdim=True))
    assert big == pytest.approx(centred.pow(2).sum(-1).mean().item() / (2 * 11), rel=0.02)


def test_hidden_loss_pairs_layers_by_origin():
    h = tuple(torch.full((1, 2, 3), float(i)) for i in range(6))  # teacher: embeddings + 5 layers
    student = (h[0], h[1], h[3], h[5])  # student kept teacher layers 0, 2, 4
    pairs = layer_pairs([0, 2, 4], n_teacher=5)
    assert pairs == [(0, 0), (1, 2), (2, 4)]
    assert hidden_loss(student, h, pairs).item() == 0.0
    # the student's last layer (after the final norm) is never paired with a teacher layer before the final norm
    assert layer_pairs([0, 1, 3], n_teacher=5) == [(0, 0), (1, 1)]
    assert proportional_origin(3, 6) == [1, 3, 5] and proportional_origin(4, 4) == [0, 1, 2, 3]


def test_surviving_layers_follow_the_depth_report():
    report = {"removed": [1, 3], "recovery": {"kept_as_constant_layer": [3]}}
    assert surviving_layers([0, 1, 2, 3, 4], report, 5, 4) == [0, 2, 3, 4]
    assert surviving_layers([0, 2, 3, 4], {"removed": [0]}, 4, 3) == [2, 3, 4]
    assert surviving_layers([0, 1, 2], {}, 3, 3) == [0, 1, 2]


def test_config_validation():
    with pytest.raises(RecipeError, match="not all zero"):
        RecoverConfig(kd=0, lm=0, hidden=0)
    with pytest.raises(RecipeError, match="trainable"):
        RecoverConfig(trainable="some")
    with pytest.raises(RecipeError, match="holdout"):
        RecoverConfig(holdout=1.0)
    recipe = Recipe.from_yaml("method: maw\ntarget: {ratio: 0.5}\nrecover: {steps: 7, trainable: lora}\n")
    assert recipe.recover == RecoverConfig(steps=7, trainable="lora")
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    with pytest.raises(RecipeError, match="Did you mean 'steps'"):
        Recipe.from_yaml("method: maw\ntarget: {ratio: 0.5}\nrecover: {step: 7}\n")


def test_prune_and_recover_lowers_the_loss_and_reloads(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    events = []
    recipe = Recipe(method="maw", target=Target(ratio=0.5), model=str(src), recover=RecoverConfig(steps=20, **FAST))
    result = core.run_recipe(recipe, on_event=events.append)
    rec = result.extra["recovery"]
    assert rec["heldout_loss"][1] < rec["heldout_loss"][0] - 0.5, rec["loss_curve"]
    assert [e["step"] for e in events] == [0, 5, 10, 15, 20]
    assert rec["steps"] == 20 and rec["tokens"] == 20 * 4 * 32 and rec["trainable"] == "all weights"
    out = core.save_pruned(result, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(reloaded, ids), logits(result.model, ids))
    doc = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert doc["recover"]["steps"] == 20 and doc["result"]["recovery"]["heldout_loss"] == rec["heldout_loss"]
    assert len(doc["result"]["recovery"]["loss_curve"]) == 5
    card = (out / "README.md").read_text()
    assert "## Recovery training" in card and "No fine-tuning" not in card
    assert Recipe.from_file(out / RECIPE_FILE).recover == recipe.recover  # the recipe reproduces the recovery


def _planted_sparse(seed: int = 0):
    """A tiny model with half the entries of every q_proj zero, and a mask recorded for one down_proj."""
    model = tiny_model("llama", seed)
    gen = torch.Generator().manual_seed(seed)
    recorded = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("q_proj.weight"):
                p.mul_(torch.rand(p.shape, generator=gen) > 0.5)
        name = "model.layers.1.mlp.down_proj.weight"
        keep = torch.rand(model.get_parameter(name).shape, generator=gen) > 0.25
        recorded[name] = keep
    return model, recorded


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_masks_stay_exact(trainable, tokenizer):
    student, recorded = _planted_sparse()
    teacher = tiny_model("llama", 1)
    zeros = {n: p == 0 for n, p in student.named_parameters() if n.endswith("q_proj.weight")}
    before = weights(student)
    model, report = recover(student, teacher, tokenizer, RecoverConfig(steps=4, trainable=trainable, **FAST),
                            masks=recorded)
    after = weights(model)
    assert set(after) == set(before)  # LoRA merged: a plain model again
    for name, zero in zeros.items():
        assert (after[name][zero] == 0).all(), name
        assert not torch.equal(after[name][~zero], before[name][~zero]), "the kept weights were trained"
    down = "model.layers.1.mlp.down_proj.weight"
    assert (after[down][~recorded[down]] == 0).all() and (after[down][recorded[down]] != 0).all()
    assert report["fixed_masks"]["weights"] == 5  # 4 q_proj + the recorded down_proj
    assert report["trainable_parameters"] < 50_000 if trainable == "lora" else report["trainable_parameters"] > 1e5


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_two_four_pattern_survives_recovery(trainable, tokenizer):
    """What a 2:4 sparsity method leaves (two zeros in every 4 consecutive input weights of every decoder
    linear) is still exactly 2:4 after recovery, with the same zeros."""
    student = tiny_model("llama", 2)
    gen = torch.Generator().manual_seed(2)
    linears = {}
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.startswith("model.layers.") and p.dim() == 2:
                groups = p.view(p.shape[0], -1, 4)
                drop = torch.rand(groups.shape, generator=gen).argsort(-1)[..., :2]  # 2 random slots of 4
                groups.scatter_(-1, drop, 0.0)
                linears[name] = p == 0
    model, report = recover(student, tiny_model("llama", 1), tokenizer,
                            RecoverConfig(steps=3, trainable=trainable, **FAST))
    after = weights(model)
    for name, zero in linears.items():
        assert torch.equal(after[name] == 0, zero), name  # the same zeros, no more, no fewer
        assert ((after[name].view(zero.shape[0], -1, 4) == 0).sum(-1) == 2).all(), name
    assert report["fixed_masks"]["weights"] == len(linears)


def test_lora_is_merged_into_a_plain_model(tokenizer):
    teacher = tiny_model("qwen2")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.2)
    model, report = recover(student, teacher, tokenizer, RecoverConfig(steps=3, trainable="lora", **FAST))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert report["trainable"].startswith("LoRA rank 8")


def _interrupt_at(step: int):
    def callback(stage, done, total):
        if done == step:
            raise KeyboardInterrupt

    return callback


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tokenizer):
    cfg = RecoverConfig(steps=8, checkpoint_every=3, **FAST)
    teacher = tiny_model("llama", 1)
    plain, _ = recover(tiny_model("llama"), teacher, tokenizer, cfg)
    folder = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        recover(tiny_model("llama"), teacher, tokenizer, cfg, checkpoint_dir=folder, progress=_interrupt_at(5))
    assert torch.load(folder / "recover_state.pt", weights_only=True)["step"] == 5
    resumed, report = recover(tiny_model("llama"), teacher, tokenizer, cfg, checkpoint_dir=folder, resume=True)
    for (name, a), b in zip(plain.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert report["steps"] == 8
    with pytest.raises(RecipeError, match="different run"):  # other settings: refuse the checkpoint
        recover(tiny_model("llama"), teacher, tokenizer, RecoverConfig(steps=8, **dict(FAST, lr=1e-2)),
                checkpoint_dir=folder, resume=True)


def test_early_stopping_keeps_the_best_state(tokenizer):
    teacher = tiny_model("llama", 1)
    # a learning rate far too high makes the held-out loss worse than at the start: the start is kept
    cfg = RecoverConfig(steps=10, patience=1, **dict(FAST, lr=0.5, warmup=0, eval_every=2))
    student = tiny_model("llama")
    start = weights(student)
    model, report = recover(student, teacher, tokenizer, cfg)
    assert report["stopped"] == "early stopping" and report["steps"] < 10
    best = min(report["loss_curve"], key=lambda h: h["heldout_loss"])
    assert report["kept_step"] == best["step"]
    if best["step"] == 0:
        assert all(torch.equal(start[n], p) for n, p in model.named_parameters())


def test_gradient_checkpointing_and_bf16_seams(tokenizer):
    """The GPU settings (checkpointing, bfloat16) run on CPU; checkpointing leaves the result unchanged."""
    teacher = tiny_model("llama", 1)
    plain, _ = recover(tiny_model("llama"), teacher, tokenizer, RecoverConfig(steps=2, **FAST))
    ckpt, report = recover(tiny_model("llama"), teacher, tokenizer,
                           RecoverConfig(steps=2, gradient_checkpointing=True, **FAST))
    assert report["gradient_checkpointing"] is True
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    half, report = recover(tiny_model("llama"), copy.deepcopy(teacher), tokenizer,
                           RecoverConfig(steps=2, dtype="bfloat16", **FAST))
    assert report["dtype"] == "bfloat16" and next(half.parameters()).dtype == torch.bfloat16
    assert math.isfinite(report["heldout_loss"][1])


def test_memory_check_names_what_is_needed(monkeypatch, tokenizer):
    monkeypatch.setattr("core.recover_memory.available_bytes", lambda device: 1000)
    with pytest.raises(InsufficientMemoryError, match=r"needs about [0-9.]+ GiB .*weights.*optimizer.*activations"):
        recover(tiny_model("llama"), tiny_model("llama", 1), tokenizer, RecoverConfig(steps=2, **FAST))


@pytest.fixture(scope="module")
def pruned_per_layer(tmp_path_factory):
    """A per-layer checkpoint (attention sub-layers removed) written by the tool, and its base."""
    root = tmp_path_factory.mktemp("recover-cli")
    src = save_tiny(tiny_model("llama"), root / "src")
    result = core.run_recipe(Recipe(method="depth", target=Target(ratio=0.5), model=str(src),
                                    options={"unit": "attention", "layers": [1, 2]}))
    return src, core.save_pruned(result, root / "pruned")


def _cli_args(pruned, out, *extra):
    return ["recover", str(pruned), "--out", str(out), "--steps", "6", "--batch-size", "4",
            "--seq-len", "32", "--lr", "3e-3", "--lm", "1", "--eval-every", "3", "-q", *extra]


def test_cli_recovers_a_per_layer_checkpoint(pruned_per_layer, tmp_path, capsys):
    src, pruned = pruned_per_layer
    out = tmp_path / "recovered"
    assert main(_cli_args(pruned, out, "--json")) == 0
    payload = yaml.safe_load(capsys.readouterr().out)
    rec = payload["result"]["recovery"]
    assert rec["teacher"] if "teacher" in rec else payload["recipe"]["recover"]["teacher"] == str(src)
    assert rec["heldout_loss"][1] < rec["heldout_loss"][0]
    model = core.load_pruned(str(out))
    assert [s.skip for s in core.layer_config.layer_shapes(model.config)] == [[], ["attention"], ["attention"], []]
    doc = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert doc["method"] == "depth" and doc["recover"]["steps"] == 6
    assert not checkpoint_dir(str(out)).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["recovered"]


def test_cli_interrupt_writes_nothing_and_resume_finishes(pruned_per_layer, tmp_path, monkeypatch, capsys):
    _, pruned = pruned_per_layer
    out = tmp_path / "recovered"
    original = Recovery._step

    def interrupted(self, model, params, optimizer, step):
        if step == 4:
            raise KeyboardInterrupt
        return original(self, model, params, optimizer, step)

    monkeypatch.setattr(Recovery, "_step", interrupted)
    assert main(_cli_args(pruned, out, "--checkpoint-every", "2")) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "interrupted (SIGINT)" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [checkpoint_dir(str(out)).name]
    monkeypatch.setattr(Recovery, "_step", original)
    assert main(_cli_args(pruned, out, "--resume")) == 0
    assert core.load_pruned(str(out)) is not None and not checkpoint_dir(str(out)).exists()


def test_cli_errors_leave_nothing(pruned_per_layer, tmp_path, monkeypatch, capsys):
    _, pruned = pruned_per_layer
    out = tmp_path / "recovered"
    monkeypatch.setattr("core.recover_memory.available_bytes", lambda device: 1000)
    assert main(_cli_args(pruned, out)) == 2
    err = capsys.readouterr().err
    assert "error: Recovery training needs about" in err and "GiB" in err
    assert main(["recover", str(tmp_path / "nowhere"), "--out", str(out), "--steps", "0"]) == 2
    assert "error: recover --steps 0 trains nothing" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_free_memory_is_known_without_psutil(monkeypatch):
    """The command line's own requirements (requirements/core.txt) have no psutil: the memory check still works."""
    import sys

    import psutil

    from core.recover_memory import available_bytes

    expected = psutil.virtual_memory().available
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert available_bytes("cpu") == pytest.approx(expected, rel=0.2)
