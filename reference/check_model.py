"""Check a saved reference model: load it with the Auto classes, evaluate it, sample from it.

    python reference/check_model.py                      # reference/model
    python reference/check_model.py --model reference/work/smoke
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import CORPUS_DIR, MODEL_DIR, encode_file, perplexities, setup, unigram_log_probs

log = logging.getLogger("check_model")

PROMPTS = (
    "Python Library Documentation: module",
    "FUNCTIONS\n    copy(x)\n        ",
    "Return a new",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    args = parser.parse_args()
    setup(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    params = sum(p.numel() for p in model.parameters())
    size = (args.model / "model.safetensors").stat().st_size
    log.info("%s: %s, %d parameters, dtype %s, model.safetensors %.1f MB; tokenizer %s (fast=%s)",
             args.model, type(model).__name__, params, model.dtype, size / 1e6,
             type(tokenizer).__name__, tokenizer.is_fast)
    if not args.no_eval:
        train_ids = encode_file(args.model, CORPUS_DIR / "train.txt")
        eval_ids = encode_file(args.model, CORPUS_DIR / "eval.txt")
        metrics = perplexities(model, eval_ids, unigram_log_probs(train_ids))
        log.info("eval.txt: perplexity %.2f, unigram perplexity %.2f (%d tokens)",
                 metrics["perplexity"], metrics["unigram_perplexity"], metrics["eval_tokens"])
    torch.manual_seed(0)
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        for sample in (False, True):
            options = {"do_sample": True, "top_k": 40, "temperature": 0.8} if sample else {}
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **options)
            log.info("%s:\n%s", "sampled" if sample else "greedy", tokenizer.decode(out[0]))


if __name__ == "__main__":
    main()
