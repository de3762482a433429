"""Task utility for depth sub-network scores: accuracy on a multiple-choice task as lm-eval defines it, routed
through the one whole-model forward function, and able to change which blocks go when the task disagrees with loss."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import core
import core.utility
from core.architectures import spec_for_config
from core.errors import PruningError
from core.harness import choice_task, run_tasks
from core.layers import units_disabled
from core.utility import TaskUtility

CALIB = core.CalibrationConfig(n_samples=4, seq_len=32)


def _depth(folder, **options):
    score = options.pop("score", "shapley")
    recipe = core.Recipe(model=str(folder), method="depth", score=score, target=core.Target(ratio=0.25),
                         options=options, calibration=CALIB, batch_size=2)
    return core.run_recipe(recipe)


@pytest.mark.slow  # lm-eval indexes its ~15k task definitions
def test_task_utility_is_lm_evals_accuracy(tiny_dir):
    model, tokenizer = core.load_model(str(tiny_dir("llama")), core.LoadOptions(device="cpu"))
    spec = spec_for_config(model.config)
    utility = TaskUtility(choice_task("pydoc_cloze", docs=slice(0, 24)), tokenizer, 256, batch_size=7)
    expected = run_tasks(model, tokenizer, ["pydoc_cloze"], limit=24, batch_size=4)["tasks"]["pydoc_cloze"]["acc"]
    assert utility(model, spec) == pytest.approx(expected)
    lls = utility.loglikelihoods(model, spec)
    assert len(lls) == 24 and all(len(choices) == 4 for choices in lls)


def _planted_task(folder, tmp_path, block: int, n: int = 16):
    """A two-choice task on which the full model is always right and the model without `block` always wrong:
    gold = the full model's next token, distractor = the next token once `block` is removed."""
    model, tokenizer = core.load_model(str(folder), core.LoadOptions(device="cpu"))
    spec = spec_for_config(model.config)
    text = (Path(__file__).resolve().parent.parent / "reference" / "corpus" / "calibration.txt").read_text()
    lines = [l.split() for l in text.splitlines() if len(l.split()) >= 6]
    items = []
    with torch.no_grad():
        for words in lines[:80]:
            context = " ".join(words[:5])
            ids = torch.tensor([tokenizer(context, add_special_tokens=False)["input_ids"]])
            full = model(ids).logits[0, -1].argmax().item()
            with units_disabled(model, spec, "block", [block]):
                without = model(ids).logits[0, -1].argmax().item()
            if full != without:
                items.append({"context": context, "choices": [tokenizer.decode([full]), tokenizer.decode([without])],
                              "answer": 0})
    folder = tmp_path / "planted_task"
    folder.mkdir()
    (folder / "items.jsonl").write_text("\n".join(json.dumps(i) for i in items) + "\n")
    (folder / "planted.yaml").write_text(
        "task: planted_block_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        "    test: ${TASK_DIR}/items.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n')
    # keep the items the task utility itself scores as planted (tokenisation may merge a choice differently)
    utility = TaskUtility(choice_task("planted_block_task", [folder]), tokenizer, 256)
    right = [lls[0] > lls[1] for lls in utility.loglikelihoods(model, spec)]
    with units_disabled(model, spec, "block", [block]):
        wrong = [lls[0] < lls[1] for lls in utility.loglikelihoods(model, spec)]
    kept = [item for item, r, w in zip(items, right, wrong) if r and w][:n]
    assert len(kept) >= 10
    (folder / "items.jsonl").write_text("\n".join(json.dumps(i) for i in kept) + "\n")
    return folder


@pytest.mark.parametrize("score", ["shapley", "ppl_drop"])
def test_a_task_utility_changes_the_blocks_chosen_when_the_task_disagrees_with_loss(tiny_dir, tmp_path, score):
    folder = tiny_dir("llama")
    by_loss = _depth(folder, score=score)
    block = by_loss.report["removed"][0]
    task_dir = _planted_task(folder, tmp_path, block)
    by_task = _depth(folder, score=score, utility="task", task="planted_block_task", task_dir=str(task_dir),
                     task_docs=0)
    assert by_task.report["removed"] != [block]
    scores = {int(k): v for k, v in by_task.report["scores"].items()}
    assert max(scores, key=scores.get) == block  # the block loss would drop first is the task's most valuable
    estimate = by_task.report["estimate"]
    assert estimate["utility"] == "task" and estimate["task"] == "planted_block_task" and estimate["task_docs"] >= 10


def test_every_whole_model_utility_evaluation_goes_through_forward_logits(tiny_dir, monkeypatch):
    folder = tiny_dir("llama")
    routed = []
    original = core.utility.forward_logits

    def counting(model, spec, batches, consume):
        routed.append(len(batches))
        return original(model, spec, batches, consume)

    monkeypatch.setattr(core.utility, "forward_logits", counting)
    model, tokenizer = core.load_model(str(folder), core.LoadOptions(device="cpu"))
    forwards = []
    model.register_forward_hook(lambda *args: forwards.append(1))
    recipe = core.Recipe(method="depth", score="shapley", target=core.Target(ratio=0.25), calibration=CALIB,
                         batch_size=2)
    for utility, extra in (("loss", 0), ("logit_distance", 1), ("task", 0)):
        routed.clear()
        options = {"utility": utility, "task_docs": 8, "unit": "attention"}
        fresh = core.load_model(str(folder), core.LoadOptions(device="cpu"))[0]
        result = core.prune(fresh, tokenizer, dataclasses.replace(recipe, options=options))
        assert len(routed) == result.report["estimate"]["subnetworks_evaluated"] + extra
    # on the hooked instance: every whole-model forward of the scoring came through forward_logits
    routed.clear()
    core.prune(model, tokenizer, dataclasses.replace(recipe, options={"utility": "loss"}))
    assert sum(routed) == len(forwards) > 0


def test_an_unknown_utility_is_a_clear_error(tiny_dir):
    with pytest.raises(core.errors.RecipeError, match="utility must be one of"):
        _depth(tiny_dir("llama"), utility="accuracy")


@pytest.mark.slow  # an unknown name makes lm-eval index its ~15k task definitions
def test_an_unknown_task_is_a_clear_error(tiny_dir):
    with pytest.raises(PruningError, match="Unknown lm-eval task 'no_such_task'"):
        _depth(tiny_dir("llama"), utility="task", task="no_such_task")
