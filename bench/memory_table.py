"""The memory a prune needs, by model size, from `core.memory.estimate_memory` (configs only, no weights).

    python bench/memory_table.py > bench/results/memory_estimates.md
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from make_checkpoint import SHAPES  # noqa: E402

GIB = 2**30


def main() -> None:
    import torch
    from transformers import LlamaConfig

    from core import CalibrationConfig, Recipe, Target
    from core.memory import estimate_memory

    recipes = {
        "maw (weights only)": Recipe(method="maw", target=Target(param_ratio=0.2)),
        "activation": Recipe(method="activation", target=Target(param_ratio=0.2)),
        "slimllm": Recipe(method="slimllm", target=Target(param_ratio=0.2)),
        "depth, ppl_drop": Recipe(method="depth", score="ppl_drop", target=Target(ratio=0.25)),
        "sparsity, wanda 2:4": Recipe(method="sparsity", score="wanda", target=Target(ratio=0.5),
                                      options={"pattern": "2:4"}),
        "sparsity, sparsegpt 2:4": Recipe(method="sparsity", score="sparsegpt", target=Target(ratio=0.5),
                                          options={"pattern": "2:4"}),
    }
    print("| model (Llama-3 shapes) | parameters | method | CPU streamed (fp32) | CPU loaded whole (fp32) | "
          "GPU streamed (bf16) | GPU loaded whole (bf16) | disk (bf16) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, shape in (("Llama-3.2-1B", "1b"), ("Llama-3-8B", "8b"), ("Llama-3-70B", "70b")):
        config = LlamaConfig(**SHAPES[shape])
        config.dtype = torch.bfloat16
        for label, recipe in recipes.items():
            recipe = recipe.replace(calibration=CalibrationConfig(n_samples=32, seq_len=128))
            cpu = estimate_memory(config, recipe, "cpu")
            gpu = estimate_memory(config, recipe, "cuda")
            print(f"| {name} | {cpu.params / 1e9:.1f}B | {label} | {cpu.streamed_bytes / GIB:.1f} GiB | "
                  f"{cpu.in_memory_bytes / GIB:.1f} GiB | {gpu.streamed_bytes / GIB:.1f} GiB | "
                  f"{gpu.in_memory_bytes / GIB:.1f} GiB | {cpu.disk_bytes / GIB:.1f} GiB |")
    print("\nCalibration 32 x 128 tokens in batches of 8 (the default). Estimates, within ~20% of the measured "
          "figures in bench/results/stream_8b_cpu.md; the output needs at most the source's disk space again.")


if __name__ == "__main__":
    main()
