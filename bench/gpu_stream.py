"""Streamed pruning on one GPU: peak GPU memory and time ratios for Llama-3-8B and Llama-3-70B shapes.

NOT RUN YET (no GPU on the development machine); run it whenever a GPU is lent and commit the results. One short
script: for each shape it writes a random bf16 checkpoint shard by shard (`make_checkpoint.py`; the 70B shape is cut
to --layers-70b decoder layers so that it fits a 64 GiB disk: per-block memory and per-block time ratios do not
depend on the layer count), then, in this process, for each case:

    run_recipe(recipe, stream=True, out_dir=OUT) + save_pruned     # device cuda, compute dtype bf16

recording torch.cuda.max_memory_allocated over the case (goal: one block's working set + 4 GiB), the estimate of
core.memory, and the wall time; and the baselines measured alike: *io* (read every tensor once, move it to the GPU,
write as many bytes as the case's output) and *forward* (the same plus one streamed calibration forward). Each
checkpoint is deleted after its cases. Results: bench/results/gpu_stream.{json,md}.

    python bench/gpu_stream.py                                   # 8b (32 layers) and 70b (8 layers), ~10 minutes
    python bench/gpu_stream.py --shapes 70b --layers-70b 4       # a shorter run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from make_checkpoint import build_checkpoint  # noqa: E402
from prune_bench import git_state, machine_info, proc_status  # noqa: E402
from stream_bench import drop_page_cache, folder_bytes  # noqa: E402

RESULTS = BENCH / "results"
GIB = 2**30
logger = logging.getLogger("gpu_stream")

CASES = {  # name -> (method, score, baseline kind, goal ratio)
    "maw_range": ("mlp_width", "maw_range", "io", 1.3),
    "activation": ("mlp_width", "activation", "forward", 1.5),
    "slimllm": ("slimllm", None, "forward", 3.0),
}


def _sync():
    import torch

    torch.cuda.synchronize()


def run_case(ckpt: Path, work: Path, name: str, calib) -> dict:
    import torch

    import core
    from core import Recipe, Target

    method, score, _, _ = CASES[name]
    recipe = Recipe(model=str(ckpt), method=method, score=score, target=Target(param_ratio=0.2), calibration=calib,
                    batch_size=8, load=core.LoadConfig(device="cuda"))
    out = work / f"out-{name}"
    drop_page_cache(ckpt)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _sync()
    start = time.perf_counter()
    result = core.run_recipe(recipe, stream=True, out_dir=out)
    core.save_pruned(result, out)
    _sync()
    seconds = time.perf_counter() - start
    record = {"seconds": seconds, "gpu_peak_bytes": torch.cuda.max_memory_allocated(),
              "output_bytes": folder_bytes(out), "params_after": result.params_after["total"],
              "rss_peak": proc_status().get("VmHWM")}
    result.model.core_stream.close()
    del result
    shutil.rmtree(out, ignore_errors=True)
    return record


def run_baseline(ckpt: Path, work: Path, kind: str, output_bytes: int, calib) -> dict:
    import torch
    from transformers import AutoTokenizer

    from core.architectures import spec_for_config
    from core.calibration import load_calibration
    from core.pipeline import LayerwiseRunner
    from core.streaming import open_streamed
    from core.weights import Checkpoint, write_shard

    ck = Checkpoint(ckpt)
    blocks: dict[int, list[str]] = {}
    rest = []
    for n in ck.names():
        (blocks.setdefault(int(n.split(".")[2]), []) if n.startswith("model.layers.") else rest).append(n)
    fraction = max(0.0, (output_bytes - ck.nbytes(rest)) / ck.nbytes([n for b in blocks.values() for n in b]))
    out = work / "baseline"
    out.mkdir()
    drop_page_cache(ckpt)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    def write(tensors: dict, path: Path, frac: float) -> None:
        write_shard(path, {k: t.reshape(-1)[: int(frac * t.numel())] for k, t in tensors.items()})

    _sync()
    start = time.perf_counter()
    if kind == "io":
        for i in sorted(blocks):
            write(ck.read(blocks[i], device="cuda"), out / f"block-{i}.safetensors", fraction)
    else:
        model = open_streamed(ckpt, device="cuda", dtype=torch.bfloat16)
        ids = load_calibration(AutoTokenizer.from_pretrained(ckpt), calib)
        runner = LayerwiseRunner(model, spec_for_config(model.config), ids, 8)
        for i in range(len(runner.layers)):
            runner.advance(i)
            write(runner.layers[i].state_dict(), out / f"block-{i}.safetensors", fraction)
        model.core_stream.close()
    write(ck.read(rest), out / "rest.safetensors", 1.0)
    _sync()
    record = {"kind": kind, "seconds": time.perf_counter() - start, "gpu_peak_bytes": torch.cuda.max_memory_allocated()}
    shutil.rmtree(out, ignore_errors=True)
    return record


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Streamed pruning on one GPU", "", f"- Date: {doc['date']}",
             f"- Machine: {m.get('gpu', '?')} (CUDA {m.get('cuda', '?')}), {m['cpu']}, {m['logical_cores']} cores, "
             f"{m['ram_gib']} GiB RAM", f"- Software: torch {m['torch']}, transformers {m['transformers']}",
             f"- Command: `{doc['command']}`", f"- Code: commit {str(doc['git']['commit'])[:10]}",
             f"- Calibration: {doc['calibration']}; compute dtype bf16; target: 20% of all parameters removed", "",
             "GPU memory in GiB (torch.cuda.max_memory_allocated); *goal*: one block's working set (estimate) + 4 GiB.",
             "", "| shape | layers | case | prune s | baseline s | ratio | goal ratio | GPU peak | block | goal | "
                 "estimate |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, entry in doc["shapes"].items():
        for name, r in entry["cases"].items():
            b = r["baseline"]
            lines.append(f"| {shape} | {entry['layers']} | {name} | {r['seconds']:.0f} | {b['seconds']:.0f} | "
                         f"{r['seconds'] / b['seconds']:.2f} | {r['goal_ratio']} | {r['gpu_peak_bytes'] / GIB:.2f} | "
                         f"{entry['block_bytes'] / GIB:.2f} | {r['goal_bytes'] / GIB:.2f} | "
                         f"{r['estimate_bytes'] / GIB:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8b,70b")
    parser.add_argument("--layers-8b", type=int, default=32)
    parser.add_argument("--layers-70b", type=int, default=8)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--work", type=Path, default=None, help="folder for checkpoints and outputs (default: a "
                                                                "temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_stream.py needs a CUDA device.")
    from transformers import AutoConfig

    from core import CalibrationConfig, Recipe, Target
    from core.memory import estimate_memory

    calib = CalibrationConfig(n_samples=args.calib_samples, seq_len=args.calib_seq_len)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-stream-"))
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(os.cpu_count() or 1, "cuda"), "git": git_state(),
           "command": "python bench/gpu_stream.py " + " ".join(sys.argv[1:]),
           "calibration": f"builtin text, {calib.n_samples} x {calib.seq_len} tokens, batch 8", "shapes": {}}
    try:
        for shape in args.shapes.split(","):
            layers = args.layers_8b if shape == "8b" else args.layers_70b
            ckpt = work / f"llama3-{shape}"
            logger.info("writing the %s checkpoint (%d layers)", shape, layers)
            info = build_checkpoint(ckpt, shape, layers)
            config = AutoConfig.from_pretrained(ckpt)
            entry = {"layers": layers, "checkpoint": info,
                     "block_bytes": estimate_memory(config, device="cuda").block_bytes, "cases": {}}
            for name in args.cases.split(","):
                method, score, kind, goal = CASES[name]
                logger.info("%s: %s", shape, name)
                record = run_case(ckpt, work, name, calib)
                record["baseline"] = run_baseline(ckpt, work, kind, record["output_bytes"], calib)
                est = estimate_memory(config, Recipe(method=method, score=score, target=Target(param_ratio=0.2),
                                                     calibration=calib), device="cuda")
                record.update(goal_ratio=goal, estimate_bytes=est.streamed_bytes,
                              goal_bytes=est.working_bytes + 4 * GIB)
                entry["cases"][name] = record
                logger.info("%s %s: %.0f s (baseline %.0f s), GPU peak %.2f GiB", shape, name, record["seconds"],
                            record["baseline"]["seconds"], record["gpu_peak_bytes"] / GIB)
            doc["shapes"][shape] = entry
            shutil.rmtree(ckpt, ignore_errors=True)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / "gpu_stream.json").write_text(json.dumps(doc, indent=2) + "\n")
            (RESULTS / "gpu_stream.md").write_text(markdown(doc))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(doc))


if __name__ == "__main__":
    main()
