"""Speed and size: prefill latency, decode time (KV cache, greedy), bytes, peak memory, and an honest comparison of
two models' speed.

How it is measured: each model runs `warmup` untimed passes, then `repeats` timed ones; two models are measured in
interleaved rounds (base, pruned, pruned, base, ...), so a busy machine slows both alike and each round gives one
paired ratio. Reported are medians with their quartiles, never a single best or mean. When the spread of the ratio
covers 1 (the noise is larger than the effect) the verdict is "not measurable here" and no ratio should be shown.

Shapes (plain JSON-able dicts):

    Stats    = {"median": s, "q1": s, "q3": s, "spread": (q3 - q1) / median, "samples": [s, ...]}  # seconds

    measure_speed(model) -> {
        "device": "cpu", "dtype": "float32", "prompt_tokens": 128, "new_tokens": 32, "batch_sizes": [1],
        "repeats": 5, "warmup": 1, "interleaved": False,   # True when measured by `measure_pair`
        "prefill_seconds": median,                          # batch 1, the whole prompt
        "decode": {"1": {"seconds": median, "tokens_per_second": b * new_tokens / median}},
        "timings": {"prefill": Stats, "decode_b1": Stats},
        "peak_memory_bytes" (cuda) | "peak_rss_bytes" (cpu): int,
    }

    compare_timings(base, pruned) -> {                     # both `measure_speed` results
        "paired": True,                                     # ratios per interleaved round (else from quartiles)
        "metrics": {
            "prefill": {"label": "prefill latency (batch 1, 128 tokens)", "base": Stats, "pruned": Stats,
                        "speedup": {"median": 1.21, "low": 1.10, "high": 1.35},   # base time / pruned time
                        "verdict": "faster" | "slower" | "not measurable here",
                        "text": "1.21x faster (1.10-1.35)"},
            "decode_b1": {...},
        },
    }

`speedup` > 1 means the pruned (second) model is faster; low/high are the quartiles of the per-round ratios
(their extremes with fewer than 4 rounds), or for unpaired measurements the most pessimistic and optimistic
ratios of the two models' quartiles. With fewer than `MIN_ROUNDS` timed rounds there is no spread to judge by, and
the verdict is "not measurable here" too. Compare models measured in the same run; read absolute times only from an
accelerator.
"""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

ProgressCallback = Callable[[str, int, int], None]
NOT_MEASURABLE = "not measurable here"
STAGE = "speed"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(samples: list[float]) -> dict:
    """Median, quartiles and relative spread of timings (seconds)."""
    xs = sorted(samples)
    if len(xs) >= 4:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1, q3 = xs[0], xs[-1]
    med = statistics.median(xs)
    return {"median": med, "q1": q1, "q3": q3, "spread": (q3 - q1) / med if med else 0.0, "samples": list(samples)}


class _Bench:
    """Timed passes of one model on fixed random prompts."""

    def __init__(self, model, prompt_len: int, new_tokens: int, batch_sizes: tuple[int, ...], seed: int) -> None:
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.dtype = str(param.dtype).replace("torch.", "")
        vocab = model.get_input_embeddings().weight.shape[0]
        gen = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(0, vocab, (max(batch_sizes), prompt_len), generator=gen).to(self.device)
        self.new_tokens = new_tokens
        self.batch_sizes = batch_sizes

    @torch.no_grad()
    def prefill(self) -> float:
        """Seconds of one forward pass over a batch-1 prompt that also fills the KV cache."""
        _sync(self.device)
        start = time.perf_counter()
        self.model(self.prompt[:1], use_cache=True)
        _sync(self.device)
        return time.perf_counter() - start

    @torch.no_grad()
    def decode(self, batch: int) -> float:
        """Seconds to generate `new_tokens` greedy tokens one at a time after the prompt (prefill excluded)."""
        out = self.model(self.prompt[:batch], use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(self.new_tokens):
            out = self.model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(self.device)
        return time.perf_counter() - start

    def round(self) -> dict[str, float]:
        """One timed pass of every metric."""
        times = {"prefill": self.prefill()}
        for b in self.batch_sizes:
            times[f"decode_b{b}"] = self.decode(b)
        return times


def _clamp(model, prompt_len: int, new_tokens: int) -> tuple[int, int]:
    """Prompt and generation lengths that fit the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    prompt = max(1, min(prompt_len, max(limit // 2, 8)))
    return prompt, max(1, min(new_tokens, max(limit - prompt - 1, 1)))


def _result(bench: _Bench, samples: dict[str, list[float]], repeats: int, warmup: int, interleaved: bool) -> dict:
    timings = {k: stats(v) for k, v in samples.items()}
    out = {"device": str(bench.device), "dtype": bench.dtype, "prompt_tokens": bench.prompt.shape[1],
           "new_tokens": bench.new_tokens, "batch_sizes": list(bench.batch_sizes), "repeats": repeats,
           "warmup": warmup, "interleaved": interleaved, "prefill_seconds": timings["prefill"]["median"],
           "decode": {}, "timings": timings}
    for b in bench.batch_sizes:
        seconds = timings[f"decode_b{b}"]["median"]
        out["decode"][str(b)] = {"seconds": seconds, "tokens_per_second": b * bench.new_tokens / seconds}
    if bench.device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(bench.device)
    else:  # process-wide high-water mark (includes everything loaded so far)
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _check(repeats: int, warmup: int, batch_sizes: tuple[int, ...]) -> None:
    from .errors import RecipeError

    if repeats < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise RecipeError(f"Speed needs repeats >= 1, warmup >= 0 and batch sizes >= 1 (got repeats {repeats}, "
                          f"warmup {warmup}, batch sizes {list(batch_sizes)}).")


def measure_speed(model, prompt_len: int = 128, new_tokens: int = 32, batch_sizes: tuple[int, ...] = (1,),
                  repeats: int = 5, warmup: int = 1, seed: int = 0, progress: ProgressCallback | None = None) -> dict:
    """Prefill latency (batch 1) and decode time for each batch size of one model (shape in the module doc)."""
    _check(repeats, warmup, batch_sizes)
    prompt_len, new_tokens = _clamp(model, prompt_len, new_tokens)
    bench = _Bench(model, prompt_len, new_tokens, tuple(batch_sizes), seed)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    total = warmup + repeats
    samples: dict[str, list[float]] = {}
    for step in range(total):
        times = bench.round()
        if step >= warmup:
            for key, value in times.items():
                samples.setdefault(key, []).append(value)
        if progress is not None:
            progress(STAGE, step + 1, total)
    return _result(bench, samples, repeats, warmup, interleaved=False)


def measure_pair(base_model, pruned_model, prompt_len: int = 128, new_tokens: int = 32,
                 batch_sizes: tuple[int, ...] = (1,), repeats: int = 5, warmup: int = 1, seed: int = 0,
                 progress: ProgressCallback | None = None) -> tuple[dict, dict]:
    """Both models measured in interleaved rounds (A B, B A, A B, ...) on the same prompts; each result has the
    `measure_speed` shape with "interleaved": True, and round i of one is adjacent in time to round i of the other."""
    _check(repeats, warmup, batch_sizes)
    prompt_len, new_tokens = _clamp(base_model, prompt_len, new_tokens)
    prompt_len, new_tokens = _clamp(pruned_model, prompt_len, new_tokens)
    benches = [_Bench(m, prompt_len, new_tokens, tuple(batch_sizes), seed) for m in (base_model, pruned_model)]
    samples: list[dict[str, list[float]]] = [{}, {}]
    total = warmup + repeats
    for step in range(total):
        order = (0, 1) if step % 2 == 0 else (1, 0)  # alternate who goes first: drift hits both alike
        for i in order:
            times = benches[i].round()
            if step >= warmup:
                for key, value in times.items():
                    samples[i].setdefault(key, []).append(value)
        if progress is not None:
            progress(STAGE, step + 1, total)
    return (_result(benches[0], samples[0], repeats, warmup, interleaved=True),
            _result(benches[1], samples[1], repeats, warmup, interleaved=True))


def _label(key: str, speed: dict) -> str:
    if key == "prefill":
        return f"prefill latency (batch 1, {speed.get('prompt_tokens', '?')} tokens)"
    return f"decode time (batch {key.removeprefix('decode_b')}, {speed.get('new_tokens', '?')} tokens)"


MIN_ROUNDS = 3  # fewer timed rounds give no spread to compare the effect with


def verdict(low: float, high: float, rounds: int = MIN_ROUNDS) -> str:
    if rounds < MIN_ROUNDS:
        return NOT_MEASURABLE
    return "faster" if low > 1 else "slower" if high < 1 else NOT_MEASURABLE


def speedup_text(entry: dict) -> str:
    """'1.21x faster (1.10-1.35)' or 'not measurable here (0.91-1.30x)'."""
    s = entry["speedup"]
    if entry["verdict"] == NOT_MEASURABLE:
        return f"{NOT_MEASURABLE} ({s['low']:.2f}-{s['high']:.2f}x)"
    return f"{s['median']:.2f}x {entry['verdict']} ({s['low']:.2f}-{s['high']:.2f})"


def compare_timings(base: dict, pruned: dict) -> dict:
    """The pruned model's speed relative to the base model's, per metric (shape in the module doc)."""
    bt, pt = _timings(base), _timings(pruned)
    paired = bool(base.get("interleaved") and pruned.get("interleaved"))
    metrics = {}
    for key in bt:
        if key not in pt:
            continue
        b, p = bt[key], pt[key]
        if paired and len(b["samples"]) == len(p["samples"]) and b["samples"]:
            ratios = stats([x / y for x, y in zip(b["samples"], p["samples"])])
            speedup = {"median": ratios["median"], "low": ratios["q1"], "high": ratios["q3"]}
        else:
            speedup = {"median": b["median"] / p["median"], "low": b["q1"] / p["q3"], "high": b["q3"] / p["q1"]}
        rounds = min(len(b["samples"]), len(p["samples"]))
        entry = {"label": _label(key, pruned), "base": b, "pruned": p, "speedup": speedup,
                 "verdict": verdict(speedup["low"], speedup["high"], rounds)}
        entry["text"] = speedup_text(entry)
        metrics[key] = entry
    return {"paired": paired, "metrics": metrics}


def _timings(speed: dict) -> dict:
    """Stats per metric; results without "timings" (older ones) give single-sample stats from their medians."""
    if "timings" in speed:
        return speed["timings"]
    out = {"prefill": stats([speed["prefill_seconds"]])}
    for b, entry in speed.get("decode", {}).items():
        out[f"decode_b{b}"] = stats([entry["seconds"]] if "seconds" in entry else
                                    [int(b) * speed.get("new_tokens", 1) / entry["tokens_per_second"]])
    return out


def speed_ratios(base: dict, other: dict, measurable_only: bool = False) -> dict:
    """Median speed-ups of `other` over `base`: {"prefill_speedup": x, "decode_speedup_batch1": x, ...} (> 1:
    `other` is faster). With `measurable_only`, metrics whose verdict is "not measurable here" are left out."""
    out = {}
    for key, entry in compare_timings(base, other)["metrics"].items():
        if measurable_only and entry["verdict"] == NOT_MEASURABLE:
            continue
        name = "prefill_speedup" if key == "prefill" else f"decode_speedup_batch{key.removeprefix('decode_b')}"
        out[name] = entry["speedup"]["median"]
    return out


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def folder_bytes(path: str | Path) -> int | None:
    """Bytes of the safetensors weights in a local folder (None for a Hub id)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))

