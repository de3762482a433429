"""Write a random Llama checkpoint of any size shard by shard, never holding the model in memory.

The tensor names and shapes come from the model's module tree built without weights (accelerate's empty-weights
context), so the checkpoint loads with `from_pretrained` like a released one. Values: one pool of N(0, 0.02) numbers
is drawn once (generating 8-70B fresh random numbers would take longer than the benchmarks themselves); each tensor
is a slice of the pool at its own random offset, norms are 1 + small noise. Shards of `shard_gb` are cut wherever
they fill up, so a block's tensors can be split across two shards, as in released checkpoints.

    python bench/make_checkpoint.py OUT --shape 8b           # Llama-3-8B shapes, bf16, ~16 GB
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

logger = logging.getLogger("make_checkpoint")

_LLAMA3 = dict(num_attention_heads=None, num_key_value_heads=8, head_dim=128, vocab_size=128256,
               max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
# released shapes: Llama-3-8B and Llama-3-70B (the layer count can be cut with --layers to fit a disk)
SHAPES = {
    "8b": dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=14336),
    "70b": dict(_LLAMA3, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, intermediate_size=28672),
    "1b": dict(_LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64,
               intermediate_size=8192, tie_word_embeddings=True),
    "small": dict(_LLAMA3, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                  head_dim=64, intermediate_size=2048, vocab_size=32768, tie_word_embeddings=True),
}
POOL = 2**28  # values in the random pool (512 MiB in bf16)


def build_checkpoint(folder: Path, shape: str, layers: int | None = None, shard_gb: float = 2.0,
                     seed: int = 0, dtype_name: str = "bfloat16") -> dict:
    """Write the checkpoint (config, shards, index, the reference tokenizer) to `folder`; returns its summary."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = getattr(torch, dtype_name)
    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    config = LlamaConfig(**fields)
    config.dtype = dtype
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()
    tied = set(getattr(skeleton, "all_tied_weights_keys", None) or {})
    names = [(n, tuple(p.shape)) for n, p in skeleton.state_dict().items() if n not in tied]
    del skeleton

    start = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=False)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.empty(POOL, dtype=dtype).normal_(0.0, 0.02, generator=gen)
    limit = int(shard_gb * 2**30)
    shard: dict[str, torch.Tensor] = {}
    size, files, weight_map, total = 0, [], {}, 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(folder / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            logger.info("wrote %s (%.2f GiB, %d tensors)", name, size / 2**30, len(shard))
        shard, size = {}, 0
        gc.collect()

    for name, shp in names:
        n = int(torch.Size(shp).numel())
        if "norm" in name:
            t = 1.0 + 0.1 * pool[:n].clone()
        else:
            parts, left = [], n
            while left:
                offset = int(torch.randint(0, POOL - min(left, POOL) + 1, (1,), generator=gen))
                take = min(left, POOL)
                parts.append(pool[offset:offset + take])
                left -= take
            t = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        t = t.view(shp)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > limit:
            flush()
        shard[name] = t
        size += nbytes
        total += nbytes
    flush()
    # final names as released checkpoints have them: model-0000k-of-0000N
    final = {}
    for k, name in enumerate(files, 1):
        new = f"model-{k:05d}-of-{len(files):05d}.safetensors"
        (folder / name).rename(folder / new)
        final[name] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "reference" / "model" / f, folder / f)
    params = sum(int(torch.Size(s).numel()) for _, s in names)
    summary = {"shape": shape, "config": fields, "dtype": dtype_name, "params": params, "bytes": total,
               "shards": len(files), "seconds": round(time.perf_counter() - start, 1)}
    (folder / "bench_checkpoint.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, help="cut the number of decoder layers (e.g. 70b shapes on a small disk)")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(build_checkpoint(args.out, args.shape, args.layers, args.shard_gb, dtype_name=args.dtype),
                     indent=2))


if __name__ == "__main__":
    main()
