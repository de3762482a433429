"""lm-eval integration: an in-memory (pruned) model through lm-eval's HF wrapper on the bundled offline task."""
from __future__ import annotations

import json

import pytest
import torch

import core
from core.errors import PruningError
from core.harness import BUNDLED_TASKS, prepared_task_dirs, run_tasks

LIMIT = 24


def _own_accuracy(model, tokenizer, limit: int) -> float:
    """Accuracy by argmax of the summed log-likelihood of each choice, computed without lm-eval."""
    items = [json.loads(l) for l in (BUNDLED_TASKS / "pydoc_cloze.jsonl").read_text().splitlines()[:limit]]
    correct = 0
    for item in items:
        ctx = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            cont = tokenizer(item["context"] + choice, add_special_tokens=False)["input_ids"][len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits.float().log_softmax(-1)[0, len(ctx) - 1:-1]
            scores.append(logp.gather(1, torch.tensor(cont)[:, None]).sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    return correct / len(items)


def test_lm_eval_on_a_pruned_in_memory_model_matches_our_own_scoring(tiny_dir):
    src = tiny_dir("llama")
    result = core.run_recipe(core.Recipe(model=str(src), method="attention_heads", score="magnitude",
                                         target=core.Target(ratio=0.5), layers=core.LayerSelection(protect_first=1)))
    assert not result.uniform
    out = run_tasks(result.model, result.tokenizer, ["pydoc_cloze"], limit=LIMIT, batch_size=4)
    acc = out["tasks"]["pydoc_cloze"]["acc"]
    assert 0.0 <= acc <= 1.0 and "acc_norm" in out["tasks"]["pydoc_cloze"]
    assert acc == pytest.approx(_own_accuracy(result.model, result.tokenizer, LIMIT))


def test_unknown_task_is_a_clear_error(tiny_dir):
    model, tokenizer = core.load_model(str(tiny_dir("llama")), core.LoadOptions(device="cpu"))
    with pytest.raises(PruningError, match="Unknown lm-eval task"):
        run_tasks(model, tokenizer, ["no_such_task_xyz"], limit=2)


def test_task_dir_placeholder_is_filled(tmp_path):
    (tmp_path / "t.yaml").write_text("data: ${TASK_DIR}/x.jsonl\n")
    with prepared_task_dirs([tmp_path]) as dirs:
        text = next(p for d in dirs for p in __import__("pathlib").Path(d).glob("t.yaml")).read_text()
    assert text == f"data: {tmp_path.resolve()}/x.jsonl\n"


def test_measure_runs_lm_eval_on_a_streamed_model_that_fits_and_skips_one_that_does_not(tiny_dir, tmp_path,
                                                                                        monkeypatch, caplog):
    from core.compare import EvalSettings, measure

    src = tiny_dir("llama")
    model, tokenizer = core.load_model(str(src), core.LoadOptions(device="cpu"))
    streamed, _ = core.load_model(str(src), core.LoadOptions(device="cpu", stream=True))
    assert core.streaming.is_streamed(streamed)
    text = tmp_path / "eval.txt"
    text.write_text("Return the list of names in the module namespace. " * 30)
    settings = EvalSettings(text=text, max_tokens=128, speed=False, tasks=("pydoc_cloze",), task_limit=8)
    whole = measure(model, tokenizer, settings)
    fits = measure(streamed, tokenizer, settings)  # loaded whole for lm-eval, streamed again afterwards
    assert fits.lm_eval == whole.lm_eval and fits.lm_eval["pydoc_cloze"]["acc"] is not None
    assert all(p.is_meta for layer in streamed.model.layers for p in layer.parameters())
    monkeypatch.setattr("core.memory.available_bytes", lambda device="cpu": 10 * 2**20)  # 10 MiB free
    with caplog.at_level("WARNING"):
        too_big = measure(streamed, tokenizer, settings)
    assert too_big.lm_eval is None and too_big.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    assert "lm-eval not run: lm-eval needs the model in memory" in caplog.text
    streamed.core_stream.close()
