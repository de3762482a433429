"""Streamed pruning of a model larger than memory: peak RSS, per-layer RSS and time ratios against plain I/O.

A random Llama-3-8B-shaped bf16 checkpoint (16 GB; fp32 32 GB, more than this machine's memory) is written shard
by shard by `make_checkpoint.py` under bench/.cache/ (deleted at the end unless --keep-checkpoint). Each case then
runs the real CLI, `python -m core prune CKPT --method M --param-ratio 0.2 --out OUT`, in a fresh subprocess:

- RSS after the streamed model is opened (*loaded*: skeleton, final norm, no block), then the kernel's peak-RSS
  counter is reset; *peak*: the highest RSS while pruning and saving; *per-layer*: RSS at every block load (the
  growth over the first pass would show anything accumulating per layer);
- wall time of the whole command (load, prune, save).

Each case is followed by its baseline, in a fresh subprocess too: *io* (read every tensor of the checkpoint once
and write as many bytes as the case's output) for weight-only scores, *forward* (the same plus one streamed
calibration forward through every block) for data-driven ones; the ratio case / baseline is what the issue asks
for. The checkpoint's pages are dropped from the page cache (posix_fadvise, this file only) before every run, so
every run reads it from disk.

The activation case is the issue's "done when" command; its output is reloaded with `from_pretrained` (whole in
bf16 when free memory allows it, else with accelerate's disk offload) and its logits compared with the streamed
model's.

    python bench/stream_bench.py                      # 8b shapes: maw_range, activation, slimllm (hours on 2 cores)
    python bench/stream_bench.py --shape small --cases maw_range   # a quick check
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from make_checkpoint import build_checkpoint  # noqa: E402
from prune_bench import git_state, machine_info, proc_status, release_free_memory, reset_peak_rss  # noqa: E402

CACHE = BENCH / ".cache"
RESULTS = BENCH / "results"
MIB, GIB = 2**20, 2**30
logger = logging.getLogger("stream_bench")

# name -> (CLI arguments, baseline kind)
CASES = {
    "maw_range": (["--method", "maw_range", "--param-ratio", "0.2"], "io"),
    "activation": (["--method", "activation", "--param-ratio", "0.2"], "forward"),
    "slimllm": (["--method", "slimllm", "--param-ratio", "0.2"], "forward"),
}


def drop_page_cache(folder: Path) -> None:
    """Evict one folder's files from the page cache (other processes' cached files are not touched)."""
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------- workers
def worker_case(model: str, out: str, cli_args: list[str], calib: list[str]) -> dict:
    """The CLI prune in this process, with RSS probes around the streamed model."""
    import core.blocks
    import core.cli
    import core.streaming as st

    samples: list[tuple[int, int]] = []
    loaded: dict = {}
    original_open, original_init = st.open_streamed, core.blocks.BlockStore.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.after_load = lambda i: samples.append((i, proc_status().get("VmRSS", 0)))

    def open_streamed(*args, **kwargs):
        model = original_open(*args, **kwargs)
        release_free_memory()
        loaded.update(proc_status())
        loaded["peak_reset"] = reset_peak_rss()
        return model

    core.blocks.BlockStore.__init__, st.open_streamed = init, open_streamed
    start = time.perf_counter()
    code = core.cli.main(["prune", model, *cli_args, *calib, "--out", out, "-q"])
    seconds = time.perf_counter() - start
    status = proc_status()
    n_layers = 1 + max(i for i, _ in samples) if samples else 0
    first_pass = [rss for i, rss in samples[:n_layers]]
    return {"exit_code": code, "seconds": seconds, "rss_loaded": loaded.get("VmRSS"),
            "rss_peak": status.get("VmHWM"), "peak_reset": loaded.get("peak_reset"),
            "rss_per_load": samples, "rss_growth_first_pass": (first_pass[-1] - first_pass[0]) if first_pass else None,
            "rss_range_all_loads": (max(r for _, r in samples) - min(r for _, r in samples)) if samples else None,
            "block_loads": len(samples), "output_bytes": folder_bytes(Path(out))}


def _blocks(ck) -> tuple[list[list[str]], list[str]]:
    blocks: dict[int, list[str]] = {}
    rest = []
    for name in ck.names():
        parts = name.split(".")
        if name.startswith("model.layers."):
            blocks.setdefault(int(parts[2]), []).append(name)
        else:
            rest.append(name)
    return [blocks[i] for i in sorted(blocks)], rest


def _write_fraction(tensors: dict, fraction: float, path: Path) -> None:
    from core.weights import write_shard

    write_shard(path, {k: t.reshape(-1)[: int(fraction * t.numel())].clone() for k, t in tensors.items()})


def worker_baseline(model: str, out: str, kind: str, output_bytes: int, calib_args: dict) -> dict:
    """Read every tensor once (kind 'forward': and run one streamed calibration forward) and write
    `output_bytes` of them (the non-block tensors whole, each block cut to the same fraction)."""
    import torch

    from core.weights import Checkpoint

    ck = Checkpoint(model)
    blocks, rest = _blocks(ck)
    out_dir = Path(out)
    out_dir.mkdir()
    rest_bytes = ck.nbytes(rest)
    fraction = max(0.0, (output_bytes - rest_bytes) / ck.nbytes([n for b in blocks for n in b]))
    start = time.perf_counter()
    if kind == "io":
        for i, names in enumerate(blocks):
            _write_fraction(ck.read(names), fraction, out_dir / f"block-{i}.safetensors")
    else:
        from transformers import AutoTokenizer

        from core import CalibrationConfig
        from core.architectures import spec_for_config
        from core.calibration import load_calibration
        from core.pipeline import LayerwiseRunner
        from core.streaming import open_streamed

        streamed = open_streamed(model)
        spec = spec_for_config(streamed.config)
        ids = load_calibration(AutoTokenizer.from_pretrained(model),
                               CalibrationConfig(n_samples=calib_args["n"], seq_len=calib_args["t"]))
        runner = LayerwiseRunner(streamed, spec, ids, calib_args["batch"])
        for i in range(len(runner.layers)):
            runner.advance(i)  # loads block i and runs every batch through it
            state = {k: v.to(torch.bfloat16) for k, v in runner.layers[i].state_dict().items()}
            _write_fraction(state, fraction, out_dir / f"block-{i}.safetensors")
    _write_fraction(ck.read(rest), 1.0, out_dir / "rest.safetensors")
    return {"seconds": time.perf_counter() - start, "output_bytes": folder_bytes(out_dir),
            "rss_peak": proc_status().get("VmHWM")}


def worker_reload(out: str) -> dict:
    """Reload the pruned output with transformers and compare logits with the streamed model of it."""
    import torch
    from transformers import AutoModelForCausalLM

    import core
    from core.memory import available_bytes

    size = folder_bytes(Path(out))
    free = available_bytes("cpu") or 0
    kwargs = {"dtype": torch.bfloat16}
    offload = None
    if free < 1.3 * size + 2 * GIB:  # not enough free memory for the whole model: let accelerate offload to disk
        offload = tempfile.mkdtemp(prefix="offload-", dir=CACHE)
        kwargs.update(device_map="auto", max_memory={"cpu": f"{max(2, int(free / GIB / 3))}GiB"},
                      offload_folder=offload)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, **kwargs).eval()
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reloaded = model(ids).logits.float()
    del model
    streamed = core.load_pruned(out, stream=True, dtype="bfloat16", device="cpu")
    with torch.no_grad():
        expected = streamed(ids).logits.float()
    if offload:
        shutil.rmtree(offload, ignore_errors=True)
    return {"how": "device_map=auto with disk offload" if offload else "whole, bf16", "free_bytes": free,
            "seconds": time.perf_counter() - start, "max_abs_logit_diff": (reloaded - expected).abs().max().item(),
            "logits_finite": bool(torch.isfinite(reloaded).all()), "rss_peak": proc_status().get("VmHWM")}


# ----------------------------------------------------------------------------------------------- driver
def run_worker(*args: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[:2]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(doc: dict) -> str:
    m, c = doc["machine"], doc["checkpoint"]
    lines = [f"# Streamed pruning block by block: {c['shape']} shapes, {c['config']['num_hidden_layers']} decoder "
             "blocks, cpu", "",
             f"- Date: {doc['date']}",
             f"- Machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['ram_gib']} GiB RAM, shared with other "
             f"jobs while it ran (load average at start {m['load_average_at_start']}, at end "
             f"{doc['load_average_at_end']}); torch threads: {m['torch_threads']}",
             f"- Software: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}",
             f"- Command: `{doc['command']}`", f"- Code: commit {str(doc['git']['commit'])[:10]}",
             f"- Checkpoint: random Llama, {c['params']:,} parameters, {c['dtype']}, {c['bytes'] / GIB:.1f} GiB in "
             f"{c['shards']} shards (written in {c['seconds']} s), {c['config']['num_hidden_layers']} decoder blocks; "
             f"float32: {4 * c['params'] / GIB:.1f} GiB, "
             f"{'more' if 4 * c['params'] / GIB > m['ram_gib'] else 'less'} than the machine's {m['ram_gib']} GiB",
             f"- Calibration: builtin text, {doc['calibration']}; every run reads the checkpoint from disk (its pages "
             "are dropped from the page cache before each run)",
             f"- One decoder block: {doc['block_bytes_fp32'] / MIB:,.0f} MiB in float32; estimate of the streamed "
             "peak (core.memory) per case below", ""]
    if doc.get("note"):
        lines += [f"- Note: {doc['note']}", ""]
    lines += ["Memory in MiB. *loaded*: RSS once the streamed model is open (no block loaded); *peak*: highest RSS "
              "while pruning and saving; *target*: one block's float32 working set (estimate) + 2 GiB; *growth*: "
              "RSS at the last block load of the first pass minus the first. Times in seconds; *baseline*: reading "
              "every tensor once and writing the output's bytes (io), plus one streamed calibration forward "
              "(forward).", "",
              "| case | prune s | baseline | baseline s | ratio | goal | loaded | peak | target | estimate | growth | "
              "output GiB | commit |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in doc["cases"].items():
        b = r["baseline"]
        lines.append(f"| {name} | {r['seconds']:.0f} | {b['kind']} | {b['seconds']:.0f} | "
                     f"{r['seconds'] / b['seconds']:.2f} | {r['goal_ratio']} | {r['rss_loaded'] / MIB:,.0f} | "
                     f"{r['rss_peak'] / MIB:,.0f} | {r['target_bytes'] / MIB:,.0f} | "
                     f"{r['estimate_bytes'] / MIB:,.0f} | {r['rss_growth_first_pass'] / MIB:+,.0f} | "
                     f"{r['output_bytes'] / GIB:.1f} | {str(r.get('commit'))[:10]} |")
    reload = doc.get("reload")
    if reload:
        lines += ["", f"Done-when check: `{doc['done_when_command']}` completed; the output reloads with "
                      f"`AutoModelForCausalLM.from_pretrained` ({reload['how']}); its logits on 16 tokens differ "
                      f"from the streamed model's by at most {reload['max_abs_logit_diff']:.3g} (bf16), finite: "
                      f"{reload['logits_finite']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers", type=int, help="fewer decoder blocks than the shape has (same block size: the "
                        "per-block memory and the time ratios, in a fraction of the time)")
    parser.add_argument("--keep-checkpoint", action="store_true")
    parser.add_argument("--note", default="")
    parser.add_argument("--worker", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.worker:
        import torch
        import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not part of what is timed)

        import core.cli  # noqa: F401

        torch.set_num_threads(args.threads)
        kind, *rest = args.worker
        if kind == "case":
            result = worker_case(rest[0], rest[1], json.loads(rest[2]), json.loads(rest[3]))
        elif kind == "baseline":
            result = worker_baseline(rest[0], rest[1], rest[2], int(rest[3]), json.loads(rest[4]))
        else:
            result = worker_reload(rest[0])
        print(json.dumps(result))
        return

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from transformers import AutoConfig

    from core import CalibrationConfig, Recipe, Target
    from core.memory import estimate_memory

    begin = time.perf_counter()
    tag = f"{args.shape}_{args.layers}l" if args.layers else args.shape
    ckpt = CACHE / f"llama3-{tag}-random"
    if not (ckpt / "bench_checkpoint.json").exists():
        shutil.rmtree(ckpt, ignore_errors=True)
        build_checkpoint(ckpt, args.shape, layers=args.layers)
    checkpoint = json.loads((ckpt / "bench_checkpoint.json").read_text())
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
             "--batch-size", str(args.batch_size)]
    calib_args = {"n": args.calib_samples, "t": args.calib_seq_len, "batch": args.batch_size}
    config = AutoConfig.from_pretrained(ckpt)
    doc = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(args.threads, "cpu"), "git": git_state(), "checkpoint": checkpoint,
           "command": "python bench/stream_bench.py " + " ".join(sys.argv[1:]), "note": args.note,
           "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens, batch {args.batch_size}",
           "block_bytes_fp32": estimate_memory(config).block_bytes, "cases": {}}
    stem = RESULTS / f"stream_{tag}_cpu"
    if stem.with_suffix(".json").exists():  # cases run before (e.g. one case rerun after a change) are kept
        doc["cases"] = json.loads(stem.with_suffix(".json").read_text()).get("cases", {})
    for name in args.cases.split(","):
        cli_args, kind = CASES[name]
        out = CACHE / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        drop_page_cache(ckpt)
        logger.info("case %s", name)
        result = run_worker("case", str(ckpt), str(out), json.dumps(cli_args), json.dumps(calib),
                            threads=args.threads)
        if name == "activation":
            doc["done_when_command"] = f"python -m core prune {ckpt.name} {' '.join(cli_args)} --out OUT"
            logger.info("reloading the activation output")
            doc["reload"] = run_worker("reload", str(out), threads=args.threads)
        shutil.rmtree(out, ignore_errors=True)
        drop_page_cache(ckpt)
        logger.info("baseline %s for %s", kind, name)
        base_out = CACHE / f"baseline-{name}"
        shutil.rmtree(base_out, ignore_errors=True)
        result["baseline"] = dict(run_worker("baseline", str(ckpt), str(base_out), kind,
                                             str(result["output_bytes"]), json.dumps(calib_args),
                                             threads=args.threads), kind=kind)
        shutil.rmtree(base_out, ignore_errors=True)
        method = {"maw_range": "maw_range", "activation": "activation", "slimllm": "slimllm"}[name]
        recipe = Recipe(method=method, target=Target(param_ratio=0.2),
                        calibration=CalibrationConfig(n_samples=args.calib_samples, seq_len=args.calib_seq_len),
                        batch_size=args.batch_size)
        est = estimate_memory(config, recipe)
        result.update(estimate_bytes=est.streamed_bytes, target_bytes=est.working_bytes + 2 * GIB,
                      commit=doc["git"]["commit"], date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      command=doc["command"],
                      goal_ratio={"io": 1.3, "forward": 1.5}[kind] if name != "slimllm" else 3.0)
        doc["cases"][name] = result
        logger.info("%s: %.0f s (baseline %.0f s), peak RSS %.0f MiB", name, result["seconds"],
                    result["baseline"]["seconds"], result["rss_peak"] / MIB)
        RESULTS.mkdir(exist_ok=True)
        doc["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        doc["total_seconds"] = round(time.perf_counter() - begin, 1)
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(doc))
    if not args.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)
    print(markdown(doc))


if __name__ == "__main__":
    main()
