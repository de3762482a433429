"""2:4 sparsity on a GPU: does it make an 8B-shaped Llama faster? (Run it when a GPU is lent; CPU: --dry-run.)

Two measurements, dense and sparse interleaved (dense, sparse, dense, sparse, ...) so that clock and thermal drift
hit both alike; medians with their range:

1. matmuls: each Linear shape of Llama-3.1-8B (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096,
   down 4096x14336) with a 2:4 weight, `F.linear` on the dense weight vs on its
   `torch.sparse.to_sparse_semi_structured` twin, for 1 to 4096 input tokens;
2. the model: a randomly initialised Llama with 8B shapes (bf16, 32 layers) made 2:4 by
   `python -m core`'s sparsity method (magnitude, no data needed), then `core.semi_structured.sparse_kernel_speed`
   (the code behind `python -m core eval --speed`): prefill latency and decode throughput (batch 1 and 8), dense
   weights vs sparse kernels, with the largest logit difference between the two.

    python bench/gpu_sparse.py                 # GPU, 8B shapes (needs ~20 GB of GPU memory, a few minutes)
    python bench/gpu_sparse.py --dry-run       # CPU, tiny shapes: checks the script end to end

Writes bench/results/gpu_sparse_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core  # noqa: E402
from core.scores.sparsity import nm_mask  # noqa: E402
from core.semi_structured import CPU_NOTE, sparse_kernel_speed  # noqa: E402
from core.speed import measure_speed  # noqa: E402

SHAPES_8B = {"q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
             "down_proj": (4096, 14336)}
SHAPES_TINY = {"q_proj": (128, 128), "down_proj": (128, 256)}
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=False)
LLAMA_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=512)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, iters: int) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def matmul_rows(shapes: dict, tokens: list[int], device: torch.device, dtype: torch.dtype, rounds: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, (out_f, in_f) in shapes.items():
        w = torch.randn(out_f, in_f, generator=gen).to(device, dtype)
        w = w * nm_mask(w.abs().float(), 2, 4).to(w.dtype)
        sparse_w = None
        if device.type == "cuda":
            from torch.sparse import to_sparse_semi_structured

            sparse_w = to_sparse_semi_structured(w)
        for n in tokens:
            x = torch.randn(n, in_f, generator=gen).to(device, dtype)
            iters = max(3, min(200, int(2e10 / (2 * n * out_f * in_f))))
            for _ in range(3):  # warm-up
                F.linear(x, w)
                if sparse_w is not None:
                    F.linear(x, sparse_w)
            dense_t, sparse_t = [], []
            for _ in range(rounds):
                dense_t.append(_time(lambda: F.linear(x, w), device, iters))
                if sparse_w is not None:
                    sparse_t.append(_time(lambda: F.linear(x, sparse_w), device, iters))
            row = {"linear": name, "shape": [out_f, in_f], "tokens": n, "dense_seconds": statistics.median(dense_t)}
            if sparse_t:
                ratios = [d / s for d, s in zip(dense_t, sparse_t)]
                err = (F.linear(x, w).float() - F.linear(x, sparse_w).float()).abs().max().item()
                row.update(sparse_seconds=statistics.median(sparse_t), speedup=statistics.median(ratios),
                           speedup_range=[min(ratios), max(ratios)], max_abs_difference=err)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def model_run(config_kwargs: dict, device: torch.device, dtype: torch.dtype, prompt: int, new: int,
              rounds: int) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**config_kwargs)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    built = time.perf_counter() - start
    recipe = core.Recipe(method="sparsity", score="magnitude", target=core.Target(ratio=0.5),
                         options={"pattern": "2:4"})
    result = core.prune(model, None, recipe)
    report = sparse_kernel_speed(model, lambda m: measure_speed(m, prompt, new, repeats=3), rounds=rounds)
    return {"config": config_kwargs, "build_seconds": built, "prune_seconds": result.seconds,
            "parameters": result.params_after["total"], "sparsity": result.extra["sparsity"]["sparsity"],
            "prompt_tokens": prompt, "new_tokens": new, **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (checks the script)")
    parser.add_argument("--tokens", default="1,16,128,512,2048,4096")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--skip-model", action="store_true", help="matmuls only")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = [1, 16] if args.dry_run else [int(t) for t in args.tokens.split(",")]
    shapes, llama = (SHAPES_TINY, LLAMA_TINY) if args.dry_run else (SHAPES_8B, LLAMA_8B)
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "capability": list(torch.cuda.get_device_capability()) if device.type == "cuda" else None,
           "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
           "note": None if device.type == "cuda" else CPU_NOTE}
    doc["matmuls"] = matmul_rows(shapes, tokens, device, dtype, 2 if args.dry_run else args.rounds)
    if not args.skip_model:
        doc["model"] = model_run(llama, device, dtype, 16 if args.dry_run else args.prompt_tokens,
                                 4 if args.dry_run else args.new_tokens, 1 if args.dry_run else 3)
    out = ROOT / "bench" / "results" / f"gpu_sparse_{'dryrun' if args.dry_run else device.type}"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# 2:4 sparse kernels vs dense ({doc['device']}, {doc['dtype']})", "",
             f"{doc['date']}, torch {doc['torch']}, command `{doc['command']}`", ""]
    if doc["note"]:
        lines += [f"Note: {doc['note']}", ""]
    lines += ["| linear | shape | tokens | dense ms | sparse ms | speed-up (range) |", "|---|---|---|---|---|---|"]
    for r in doc["matmuls"]:
        sp = (f"{1e3 * r['sparse_seconds']:.3f} | {r['speedup']:.2f} ({r['speedup_range'][0]:.2f}-"
              f"{r['speedup_range'][1]:.2f})") if "speedup" in r else "- | -"
        lines.append(f"| {r['linear']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | "
                     f"{1e3 * r['dense_seconds']:.3f} | {sp} |")
    if "model" in doc:
        m = doc["model"]
        lines += ["", f"Model ({m['parameters']:,} parameters, {m['sparsity']:.1%} of the linear weights zero): "
                  + (f"{m['converted']}/{m['linears']} linears on sparse kernels, speed-up (median over "
                     f"{m['rounds']} interleaved rounds): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                       m["speedup_median"].items())
                     + f"; largest logit difference {m['max_logit_difference']:.4f}" if m["converted"] else m["note"])]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
