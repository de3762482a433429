"""Build the offline multiple-choice task `pydoc_cloze` from the held-out evaluation text.

Each item: the start of a documentation line as context, and four candidate final words (the true one and three
distinct final words of other lines). Deterministic: `python reference/tasks/build_tasks.py`.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVAL_TEXT = HERE.parent / "corpus" / "eval.txt"
WORD = re.compile(r"^[A-Za-z]{4,}$")


def build(n_items: int = 300, seed: int = 0) -> list[dict]:
    lines = [l.strip() for l in EVAL_TEXT.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    candidates = []
    for line in lines:
        words = line.split()
        if len(words) >= 8 and WORD.match(words[-1].rstrip(".")):
            candidates.append((" ".join(words[:-1]), words[-1].rstrip(".")))
    # distractors come from the same distribution as answers (other lines' final words), so word frequency or
    # length alone does not give the answer away
    vocab = [answer for _, answer in candidates]
    rng.shuffle(candidates)
    items, seen = [], set()
    for context, answer in candidates:
        if context in seen:
            continue
        seen.add(context)
        distractors = set()
        while len(distractors) < 3:
            word = rng.choice(vocab)
            if word.lower() != answer.lower():
                distractors.add(word)
        choices = sorted(distractors | {answer})
        rng.shuffle(choices)
        items.append({"context": context, "choices": [" " + c for c in choices], "answer": choices.index(answer)})
        if len(items) == n_items:
            break
    return items


def main() -> None:
    items = build()
    with (HERE / "pydoc_cloze.jsonl").open("w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    main()
