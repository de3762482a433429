"""Wall time and peak memory of pruning a Llama-shaped random model with each score.

The model is a randomly initialised `LlamaForCausalLM` with the shapes of Llama-3.2-1B (`--shape 1b`, default) or a
small preset (`--shape small`, for quick runs). It is built once and saved (bf16 safetensors, like the released
checkpoint) with the reference tokenizer under `bench/.cache/`. Each case (method + score) then runs in a fresh
subprocess so that its memory numbers are its own:

    load_model(path, LoadOptions(device, dtype))   # not timed; RSS measured after it
    reset the peak-RSS counter (Linux /proc/self/clear_refs)
    prune(model, tokenizer, recipe)                # timed; peak RSS (and CUDA peak) measured over it

Recorded per case: prune wall and CPU seconds, RSS after loading, peak RSS during pruning (so the pruning overhead
is peak - loaded), the process-lifetime peak (ru_maxrss read before the reset; it includes loading), RSS sampled at
every layer (growth across layers would mean something accumulates), weights bytes, one layer's weights bytes,
parameters before and after, and the estimated size of one layer's calibration activations (n*T*hidden and
n*T*intermediate elements).

Results go to bench/results/prune_<shape>_<device>.json and .md (machine and command on top).

    python bench/prune_bench.py --shape small                 # quick check (1-2 minutes)
    python bench/prune_bench.py                               # Llama-3.2-1B shapes, CPU, 1 thread
    python bench/prune_bench.py --cases maw,activation_mlp    # a subset
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import logging
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
TOKENIZER_DIR = ROOT / "reference" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

logger = logging.getLogger("prune_bench")

# Llama-3.2-1B: hidden 2048, 16 layers, 32 heads / 8 KV heads of dim 64, MLP 8192, vocab 128256, tied embeddings.
SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
               rope_theta=500000.0, rms_norm_eps=1e-5),
    # the 1b shapes with 2 decoder layers: the per-layer work of the 1b model at an eighth of its cost (for the slow
    # per-layer scores, e.g. SparseGPT against Wanda on a busy machine)
    "1b_2l": dict(hidden_size=2048, num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                  intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
                  rope_theta=500000.0, rms_norm_eps=1e-5),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                  intermediate_size=2048, vocab_size=32768, tie_word_embeddings=True, max_position_embeddings=4096,
                  rope_theta=500000.0, rms_norm_eps=1e-5),
}

# name -> (method, score, options[, ratio overriding --ratio])
CASES = {
    "maw": ("mlp_width", "maw", {}),
    "maw_range": ("mlp_width", "maw_range", {}),
    "vow": ("mlp_width", "vow", {}),
    "pon": ("mlp_width", "pon", {}),
    "l2": ("mlp_width", "l2", {}),
    "random": ("mlp_width", "random", {}),
    "activation_mlp": ("mlp_width", "activation", {}),
    "magnitude_heads": ("attention_heads", "magnitude", {"mode": "kv_group"}),
    "activation_heads": ("attention_heads", "activation", {"mode": "kv_group"}),
    "cosine_depth": ("depth", "cosine", {"unit": "block"}),
    # SlimLLM at fixed ratios of the prunable parameters (heads + MLP), next to the magnitude scores
    "slimllm_20": ("slimllm", None, {}, 0.2),
    "slimllm_50": ("slimllm", None, {}, 0.5),
    # unstructured / 2:4 sparsity of every decoder linear (SparseGPT's Hessian inverse against Wanda's norms)
    "sparsity_magnitude_24": ("sparsity", "magnitude", {"pattern": "2:4"}, 0.5),
    "sparsity_wanda_24": ("sparsity", "wanda", {"pattern": "2:4"}, 0.5),
    "sparsity_sparsegpt_24": ("sparsity", "sparsegpt", {"pattern": "2:4"}, 0.5),
    "sparsity_wanda_50": ("sparsity", "wanda", {}, 0.5),
    "sparsity_sparsegpt_50": ("sparsity", "sparsegpt", {}, 0.5),
}

MIB = 1024 ** 2


# ----------------------------------------------------------------------------------------------- memory probes
def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (empty off Linux)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def release_free_memory() -> None:
    """Return freed heap to the OS so the post-load RSS baseline holds no garbage (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int, device: str) -> dict:
    import psutil
    import torch
    import transformers

    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 1024 ** 3, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": threads,
        "device": device,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def git_state() -> dict:
    """The commit benchmarked and any uncommitted changes under core/ (the numbers belong to that code)."""
    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip("\n")
        except (OSError, subprocess.CalledProcessError):
            return ""

    changed = [line[3:] for line in git("status", "--porcelain", "--", "core").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "core_uncommitted": changed}


# ----------------------------------------------------------------------------------------------- model cache
def model_dir(shape: str) -> Path:
    return CACHE / f"llama-{shape}-random"


def ensure_model(shape: str, seed: int = 0) -> Path:
    """Build and save the random model of `shape` once (reused while its shape is unchanged)."""
    folder = model_dir(shape)
    marker = folder / "bench_shape.json"
    wanted = {"shape": shape, "config": SHAPES[shape], "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        logger.info("using cached model %s", folder)
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    logger.info("building random Llama model (%s shapes) in %s", shape, folder)
    start = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape])
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    n = sum(p.numel() for p in model.parameters())
    logger.info("built %.3fB parameters in %.1f s; saving", n / 1e9, time.perf_counter() - start)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    del model
    gc.collect()
    for name in TOKENIZER_FILES:
        shutil.copy2(TOKENIZER_DIR / name, folder / name)
    marker.write_text(json.dumps(wanted, indent=1))
    logger.info("saved in %.1f s total", time.perf_counter() - start)
    return folder


# ----------------------------------------------------------------------------------------------- worker
def build_recipe(case: str, ratio: float, samples: int, seq_len: int, batch_size: int):
    import core

    method, score, options, *fixed = CASES[case]
    ratio = fixed[0] if fixed else ratio
    return core.Recipe(method=method, score=score, options=dict(options), target=core.Target(ratio=ratio),
                       calibration=core.CalibrationConfig(source="builtin", n_samples=samples, seq_len=seq_len),
                       batch_size=batch_size)


def activation_bytes(config, samples: int, seq_len: int, elem: int) -> dict:
    """Size of one layer's calibration activations: the residual stream and the MLP's intermediate, n*T*width."""
    tokens = samples * seq_len
    return {"hidden": tokens * config.hidden_size * elem, "intermediate": tokens * config.intermediate_size * elem}


def run_worker(args: argparse.Namespace) -> dict:
    """One case in this (fresh) process: load, reset peak counters, prune, measure."""
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import transformers

    import core

    transformers.utils.logging.disable_progress_bar()

    device = args.device
    dtype = "float32" if device == "cpu" else "bfloat16"
    rss_start = proc_status().get("VmRSS")
    t0 = time.perf_counter()
    model, tokenizer = core.load_model(str(args.model_dir), core.LoadOptions(device=device, dtype=dtype))
    load_seconds = time.perf_counter() - t0
    release_free_memory()
    peak_load = proc_status().get("VmHWM")
    loaded = proc_status()
    config = model.config
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    layer0 = model.model.layers[0]
    layer_weight_bytes = sum(p.numel() * p.element_size() for p in layer0.parameters())
    elem = params[0].element_size()
    acts = activation_bytes(config, args.calib_samples, args.calib_seq_len, elem)
    del params, layer0

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        cuda_loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    samples: list[dict] = []

    def progress(stage: str, done: int, total: int) -> None:
        samples.append({"stage": stage, "layer": done, "rss": proc_status().get("VmRSS"),
                        "t": round(time.perf_counter() - t1, 3)})

    recipe = build_recipe(args.worker, args.ratio, args.calib_samples, args.calib_seq_len, args.batch_size)
    # ru_maxrss must be read before the reset: the kernel derives it from the same counter
    peak_load = max(peak_load or 0, ru_maxrss_bytes())
    load_avg = os.getloadavg()
    hwm_reset = reset_peak_rss()
    t1, c1 = time.perf_counter(), time.process_time()
    result = core.prune(model, tokenizer, recipe, progress=progress)
    if cuda:
        torch.cuda.synchronize()
    prune_seconds, prune_cpu = time.perf_counter() - t1, time.process_time() - c1
    after = proc_status()
    # without the reset (non-Linux) the peak includes loading, so the overhead is an upper bound
    peak_prune = after.get("VmHWM") if hwm_reset else ru_maxrss_bytes()
    record = {
        "case": args.worker,
        "method": result.recipe.method, "score": result.recipe.score, "options": dict(result.recipe.options),
        "needs_data": result.calibration is not None,
        "device": device, "dtype": dtype,
        "load_seconds": round(load_seconds, 3),
        "prune_seconds": round(prune_seconds, 3),
        "prune_cpu_seconds": round(prune_cpu, 3),
        "load_average_before_prune": [round(x, 2) for x in load_avg],
        "peak_reset_supported": hwm_reset,
        "rss_start_bytes": rss_start,
        "rss_loaded_bytes": loaded.get("VmRSS"),
        "rss_loaded_anon_bytes": loaded.get("RssAnon"),
        "rss_loaded_file_bytes": loaded.get("RssFile"),
        "peak_rss_load_bytes": peak_load,
        "peak_rss_prune_bytes": peak_prune,
        "prune_overhead_bytes": (peak_prune - loaded["VmRSS"]) if peak_prune and loaded.get("VmRSS") else None,
        "process_peak_rss_bytes": max(peak_load, peak_prune or 0),
        "rss_after_prune_bytes": after.get("VmRSS"),
        "weights_bytes": weight_bytes,
        "layer_weights_bytes": layer_weight_bytes,
        "activation_hidden_bytes": acts["hidden"],
        "activation_intermediate_bytes": acts["intermediate"],
        "params_before": result.params_before["total"],
        "params_after": result.params_after["total"],
        "layers_after": result.model.config.num_hidden_layers,
        "rss_per_layer": samples,
    }
    if cuda:
        record["cuda_allocated_loaded_bytes"] = cuda_loaded
        record["cuda_peak_prune_bytes"] = torch.cuda.max_memory_allocated()
        record["cuda_prune_overhead_bytes"] = record["cuda_peak_prune_bytes"] - cuda_loaded
    return record


# ----------------------------------------------------------------------------------------------- driver
def run_case(case: str, args: argparse.Namespace, folder: Path) -> dict:
    """Run one case in a fresh Python process and return its record."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = Path(tmp.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, "--model-dir", str(folder),
           "--out-json", str(out), "--device", args.device, "--threads", str(args.threads), "--ratio", str(args.ratio),
           "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
           "--batch-size", str(args.batch_size), "--log-level", args.log_level]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"case {case} failed with exit code {proc.returncode}")
        record = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    record["case_wall_seconds"] = round(time.perf_counter() - start, 3)
    return record


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.0f}"


def markdown(report: dict) -> str:
    m, s, recs = report["machine"], report["settings"], report["cases"]
    first = recs[0] if recs else {}
    cuda = any("cuda_peak_prune_bytes" in r for r in recs)
    lines = [
        f"# Pruning benchmark: random Llama ({s['shape']} shapes), {m['device']}",
        "",
        f"- Date: {report['date']}",
        f"- Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['ram_gib']} GiB RAM"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; {m['os']}",
        f"- Software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}; "
        f"torch threads: {m['torch_threads'] or 'default'}; load average at start: {m['load_average_at_start']}",
        f"- Command: `{report['command']}`",
        f"- Code: commit {(report['code']['commit'] or 'unknown')[:10]}"
        + (f" with uncommitted changes in {', '.join(report['code']['core_uncommitted'])}"
           if report["code"]["core_uncommitted"] else ""),
        f"- Model: `LlamaConfig` {s['model_config']}, random weights (saved bf16, loaded {first.get('dtype', '?')} "
        f"on {m['device']}); weights {mib(first.get('weights_bytes'))} MiB, one decoder layer "
        f"{mib(first.get('layer_weights_bytes'))} MiB",
        f"- Pruning: ratio {s['ratio']}; calibration: builtin text, {s['calib_samples']} x {s['calib_seq_len']} "
        f"tokens, batch size {s['batch_size']}",
        f"- One layer's calibration activations ({s['calib_samples']}x{s['calib_seq_len']} tokens, "
        f"{first.get('dtype', '?')}): residual stream (n*T*hidden) {mib(first.get('activation_hidden_bytes'))} MiB, "
        f"MLP intermediate (n*T*intermediate) {mib(first.get('activation_intermediate_bytes'))} MiB",
        f"- Total benchmark wall time: {report['total_seconds']:.0f} s",
    ]
    lines[-1] += f"; load average at the end: {report['load_average_at_end']}"
    if report.get("code_changed_during_run"):
        lines.append("- Warning: the code under core/ changed while the benchmark ran")
    lines += [f"- Note: {note}" for note in report.get("notes", [])]
    lines += [
        "",
        "Memory in MiB. *loaded*: RSS after `load_model` (before pruning); *peak prune*: peak RSS while `prune` ran "
        "(kernel peak counter reset after loading); *overhead* = peak prune - loaded; *process peak*: peak RSS of "
        "the whole child process, loading included (`ru_maxrss` before the reset, or the pruning peak if higher); "
        "*RSS growth*: RSS at the last layer minus RSS at the first (per-layer progress samples); *prune CPU s*: CPU "
        "time of the child during `prune` (less sensitive than wall time to other load on the machine).",
        "",
    ]
    head = ["case", "method", "score", "data", "prune s", "prune CPU s", "loaded", "peak prune", "overhead", "process peak",
            "RSS growth", "params before", "params after"]
    if cuda:
        head += ["CUDA loaded", "CUDA peak", "CUDA overhead"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        rss = [x["rss"] for x in r["rss_per_layer"] if x.get("rss")]
        growth = mib(rss[-1] - rss[0]) if len(rss) > 1 else "n/a"
        row = [r["case"], r["method"], r["score"] or "-", "yes" if r["needs_data"] else "no", f"{r['prune_seconds']:.1f}",
               f"{r['prune_cpu_seconds']:.1f}",
               mib(r["rss_loaded_bytes"]), mib(r["peak_rss_prune_bytes"]), mib(r["prune_overhead_bytes"]),
               mib(r["process_peak_rss_bytes"]), growth, f"{r['params_before']:,}", f"{r['params_after']:,}"]
        if cuda:
            row += [mib(r.get("cuda_allocated_loaded_bytes")), mib(r.get("cuda_peak_prune_bytes")),
                    mib(r.get("cuda_prune_overhead_bytes"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def parse_cases(text: str) -> list[str]:
    cases = list(CASES) if text == "all" else [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    return cases


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_all(args: argparse.Namespace) -> dict:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cases = parse_cases(args.cases)
    args.device = resolve_device(args.device)
    machine, code = machine_info(args.threads, args.device), git_state()
    start = time.perf_counter()
    folder = ensure_model(args.shape)
    records = []
    for i, case in enumerate(cases, 1):
        logger.info("[%d/%d] %s", i, len(cases), case)
        rec = run_case(case, args, folder)
        logger.info("%s: prune %.1f s, loaded %s MiB, peak %s MiB, overhead %s MiB", case, rec["prune_seconds"],
                    mib(rec["rss_loaded_bytes"]), mib(rec["peak_rss_prune_bytes"]), mib(rec["prune_overhead_bytes"]))
        records.append(rec)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
    return {
        "benchmark": "prune", "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command, "machine": machine, "code": code,
        "settings": {"shape": args.shape, "model_config": SHAPES[args.shape], "ratio": args.ratio,
                     "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
                     "batch_size": args.batch_size, "saved_dtype": "bfloat16"},
        "notes": args.note or [],
        "total_seconds": round(time.perf_counter() - start, 1),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "code_changed_during_run": git_state() != code,
        "cases": records,
    }


def write_results(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"prune_{report['settings']['shape']}_{report['machine']['device'].replace(':', '')}"
    js, md = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    js.write_text(json.dumps(report, indent=1) + "\n")
    md.write_text(markdown(report))
    return js, md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="model shapes")
    p.add_argument("--cases", default="all", help=f"comma-separated subset of: {', '.join(CASES)}")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each case (0: torch default)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of each component removed")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=4, help="calibration batch size")
    p.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON and markdown go")
    p.add_argument("--note", action="append", help="a note for the results (repeatable)")
    p.add_argument("--log-level", default="INFO")
    # internal: run one case in this process
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out-json", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.worker:
        record = run_worker(args)
        args.out_json.write_text(json.dumps(record))
        return
    report = run_all(args)
    js, md = write_results(report, args.out_dir)
    print(md.read_text())
    logger.info("wrote %s and %s", js, md)


if __name__ == "__main__":
    main()
