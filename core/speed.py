"""Speed and size: prefill latency, decode throughput (KV cache, greedy), parameters, bytes, peak memory.

Timings are medians over repeats after a warm-up; compare models measured in the same run (ratios), and read
absolute times only from an accelerator.
"""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def prefill_seconds(model, batch: torch.Tensor, repeats: int = 3, warmup: int = 1) -> float:
    """Median time of one forward pass over the prompt batch [b, T] that also fills the KV cache."""
    device = batch.device
    return _timed(lambda: model(batch, use_cache=True), device, repeats, warmup)


@torch.no_grad()
def decode_seconds(model, batch: torch.Tensor, new_tokens: int, repeats: int = 3, warmup: int = 1) -> float:
    """Median time of generating `new_tokens` greedy tokens one at a time after the prompt (prefill excluded)."""
    device = batch.device

    def run() -> None:
        out = model(batch, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        run.start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        run()
        _sync(device)
        times.append(time.perf_counter() - run.start)
    return statistics.median(times)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def folder_bytes(path: str | Path) -> int | None:
    """Bytes of the safetensors weights in a local folder (None for a Hub id)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def measure_speed(model, prompt_len: int = 256, new_tokens: int = 256, batch_sizes: tuple[int, ...] = (1, 8),
                  repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict:
    """Prefill latency (batch 1) and decode throughput for each batch size, plus peak memory."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prompt = torch.randint(0, vocab, (max(batch_sizes), prompt_len), generator=gen).to(device)
    result = {"device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
              "prompt_tokens": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
              "prefill_seconds": prefill_seconds(model, prompt[:1], repeats, warmup), "decode": {}}
    for b in batch_sizes:
        seconds = decode_seconds(model, prompt[:b], new_tokens, repeats, warmup)
        result["decode"][str(b)] = {"seconds": seconds, "tokens_per_second": b * new_tokens / seconds}
    if device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    else:  # process-wide high-water mark (includes everything loaded so far)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


def speed_ratios(base: dict, other: dict) -> dict:
    """other / base for latency (lower is better) and base-relative speed-ups for throughput."""
    out = {"prefill_speedup": base["prefill_seconds"] / other["prefill_seconds"]}
    for b, entry in other["decode"].items():
        if b in base["decode"]:
            out[f"decode_speedup_batch{b}"] = entry["tokens_per_second"] / base["decode"][b]["tokens_per_second"]
    return out
