"""The lottery ticket's pieces: reference/train.py keeps the initialisation and a rewind point (without changing
what it trains), and bench/lottery.py prunes the surviving weights by global magnitude and keeps masks fixed."""
from __future__ import annotations

import argparse
import sys

import pytest
import torch

from conftest import ROOT
from recover_fixtures import one_thread  # noqa: F401  (fixture)


@pytest.fixture
def train_module(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "reference"))
    try:
        import train
    finally:
        sys.path.remove(str(ROOT / "reference"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (ROOT / "reference" / "corpus" / "calibration.txt").read_text(encoding="utf-8")
    (corpus / "train.txt").write_text(text[:20_000], encoding="utf-8")
    (corpus / "eval.txt").write_text(text[-3_000:], encoding="utf-8")
    monkeypatch.setattr(train, "CORPUS_DIR", corpus)
    return train


def _args(tmp_path, rewind_step: int) -> argparse.Namespace:
    return argparse.Namespace(minutes=1.0, steps=3, threads=1, out=tmp_path / "model", tokenizer=ROOT / "reference" /
                              "model", work=tmp_path / "work", resume=False, layers=1, batch_size=2, lr=2e-3, warmup=2,
                              weight_decay=0.1, seed=0, checkpoint_minutes=100.0, log_every=1, rewind_step=rewind_step,
                              amp=False)


def test_train_keeps_init_and_rewind_without_changing_the_run(train_module, tmp_path):
    trainer = train_module.Trainer(_args(tmp_path / "a", rewind_step=2))
    init = torch.load(tmp_path / "a" / "work" / "init.pt", weights_only=True)
    torch.manual_seed(0)
    fresh = train_module.LlamaForCausalLM(train_module.build_config(1)).state_dict()
    assert init["step"] == 0 and all(torch.equal(init["model"][k], fresh[k]) for k in fresh)
    trainer.train()
    rewind = torch.load(tmp_path / "a" / "work" / "rewind.pt", weights_only=True)
    assert rewind["step"] == 2
    assert not torch.equal(rewind["model"]["model.layers.0.mlp.up_proj.weight"],
                           init["model"]["model.layers.0.mlp.up_proj.weight"])
    plain = train_module.Trainer(_args(tmp_path / "b", rewind_step=0))  # saving nothing trains the same model
    plain.train()
    assert not (tmp_path / "b" / "work" / "init.pt").exists()
    for (name, a), b in zip(trainer.model.state_dict().items(), plain.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_global_magnitude_masks_prune_the_survivors():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import lottery
    finally:
        sys.path.remove(str(ROOT / "bench"))
    model = lottery.build_model("small", 0)
    first = lottery.global_magnitude_masks(model, None, 0.2)
    assert lottery.sparsity(first) == pytest.approx(0.2, abs=1e-4)
    second = lottery.global_magnitude_masks(model, first, 0.2)
    assert lottery.sparsity(second) == pytest.approx(0.36, abs=1e-4)
    assert all((second[n] <= first[n]).all() for n in first)  # nested: a pruned weight never comes back
    weights = lottery.prunable(model)
    dropped = torch.cat([weights[n].detach().abs()[~first[n]] for n in first]).max()
    kept = torch.cat([weights[n].detach().abs()[first[n]] for n in first]).min()
    assert dropped <= kept  # one global threshold, not per layer
    assert set(n.rsplit(".", 2)[-2] for n in first) == set(lottery.PRUNABLE)
