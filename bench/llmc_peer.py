"""The peer row of bench/sparsity_curves.py: llm-compressor's own SparseGPT / Wanda on the reference model.

llm-compressor 0.14.0.1 pins transformers <= 5.17 (we pin 5.23), so it cannot sit next to our pins; it runs in its
own virtual environment that reuses the system's torch 2.13 (within its pin) and gets its own transformers 5.17:

    python -m venv --system-site-packages /work/venvs/llmc14
    /work/venvs/llmc14/bin/pip install llmcompressor==0.14.0.1

bench/sparsity_curves.py calls it as
    /work/venvs/llmc14/bin/python bench/llmc_peer.py MODEL CALIB_IDS.pt OUT --method sparsegpt --sparsity 0.5 [--nm 2:4]
with the calibration windows our own runs use (token ids saved by the caller), and evaluates the dense
checkpoint it writes with our evaluation code. Prints one JSON line: {"prune_seconds": ...}.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("calib_ids", help="a .pt file with a [n, T] LongTensor of calibration token ids")
    parser.add_argument("out")
    parser.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nm", default="0:0", help="mask structure, e.g. 2:4 (0:0 = unstructured)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dampening", type=float, default=0.01)
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.load(args.calib_ids)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # the decoder blocks hold the targets; the (tied) head stays dense, as in our runs
    common = dict(sparsity=args.sparsity, mask_structure=args.nm, targets=[r"re:model.layers.\d+$"],
                  ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(block_size=args.block_size, dampening_frac=args.dampening, **common)
    else:
        modifier = WandaPruningModifier(**common)
    start = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=[modifier], num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], pipeline="sequential")
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=False)
    tokenizer.save_pretrained(args.out)
    print(json.dumps({"prune_seconds": seconds}))


if __name__ == "__main__":
    main()
