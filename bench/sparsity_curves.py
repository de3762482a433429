"""Accuracy against sparsity on the reference model: magnitude (per layer and global), Wanda, SparseGPT and Taylor,
unstructured from 10% to 90% and the N:M patterns 2:4 and 4:8, with llm-compressor's own SparseGPT and Wanda as the
peer rows (run in their own virtual environment, see bench/llmc_peer.py; skipped with a note when it is missing).

Every cell loads the reference model (float32, CPU), prunes every decoder-block linear (embeddings and head never)
with the shipped calibration split (32 x 128 tokens, the same token windows for the peer), and measures the held-out
perplexity on `reference/corpus/eval.txt` and the accuracy on the bundled cloze task (`pydoc_cloze`, 300 questions,
4 choices, chance 25%, through lm-eval). The peer writes a dense checkpoint that is evaluated by the same code.

    python bench/sparsity_curves.py                       # the default grid (hours on a busy 2-core CPU)
    python bench/sparsity_curves.py --cases wanda,sparsegpt --levels 0.2,0.4,0.6,0.8    # more points

Cells already in the results file are kept (the run resumes, and every command is recorded); --fresh starts over;
--report only rewrites the markdown and plot from the JSON.
Writes bench/results/sparsity_reference_cpu.{json,md,png}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core  # noqa: E402
from core.evaluate import perplexity_of_file  # noqa: E402
from core.harness import run_tasks  # noqa: E402

logger = logging.getLogger("bench.sparsity")
EVAL_TEXT = ROOT / "reference" / "corpus" / "eval.txt"
RESULTS = ROOT / "bench" / "results" / "sparsity_reference_cpu"
LLMC_PYTHON = Path("/work/venvs/llmc14/bin/python")
LEVELS = ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "2:4", "4:8"]
EVAL_TOKENS = 16384
CASES = {  # name -> (score, options)
    "magnitude": ("magnitude", {}),
    "magnitude-global": ("magnitude", {"scope": "global"}),
    "wanda": ("wanda", {}),
    "sparsegpt": ("sparsegpt", {}),
    "taylor": ("taylor", {}),
    "llmc-wanda": ("wanda", None),
    "llmc-sparsegpt": ("sparsegpt", None),
}
# a busy shared 2-core machine: every other level for the curves, the figures' levels for Taylor and the peers
DEFAULT_LEVELS = {"taylor": ["0.5", "2:4"], "llmc-wanda": ["0.5", "2:4"], "llmc-sparsegpt": ["0.5", "2:4"]}
CURVE_LEVELS = ["0.1", "0.3", "0.5", "0.7", "0.9", "2:4", "4:8"]


def _recipe(score: str, options: dict, level: str) -> core.Recipe:
    nm = ":" in level
    options = dict(options, pattern=level) if nm else dict(options)
    if nm:
        options.pop("scope", None)  # one count per group: no scope
    return core.Recipe(method="sparsity", score=score, target=core.Target(ratio=0.5 if nm else float(level)),
                       options=options)


def _evaluate(model, tokenizer) -> dict:
    ppl = perplexity_of_file(model, tokenizer, EVAL_TEXT, max_length=256, max_tokens=EVAL_TOKENS)
    cloze = run_tasks(model, tokenizer, ["pydoc_cloze"], batch_size=16)["tasks"]["pydoc_cloze"]
    return {"perplexity": ppl.perplexity, "eval_tokens": ppl.tokens, "cloze_acc": cloze["acc"],
            "cloze_acc_norm": cloze.get("acc_norm")}


def _sparsity_of(model) -> float:
    spec = core.architectures.spec_for_config(model.config)
    from core.sparse_format import measure_sparsity

    return measure_sparsity(model, spec)["sparsity"]


def run_core(case: str, level: str) -> dict:
    score, options = CASES[case]
    model, tokenizer = core.load_model(None, core.LoadOptions(device="cpu", dtype="float32"))
    start = time.perf_counter()
    core.prune(model, tokenizer, _recipe(score, options, level))
    seconds = time.perf_counter() - start
    return {"prune_seconds": seconds, "sparsity": _sparsity_of(model), **_evaluate(model, tokenizer)}


def run_peer(case: str, level: str, calib: Path) -> dict:
    score = CASES[case][0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        nm = level if ":" in level else "0:0"
        cmd = [str(LLMC_PYTHON), str(ROOT / "bench" / "llmc_peer.py"), str(core.model_io.REFERENCE_MODEL), str(calib),
               str(out), "--method", score, "--sparsity", "0.5" if ":" in level else level, "--nm", nm]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])["prune_seconds"]
        model, tokenizer = core.load_model(str(out), core.LoadOptions(device="cpu", dtype="float32"))
        return {"prune_seconds": seconds, "sparsity": _sparsity_of(model), **_evaluate(model, tokenizer)}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def markdown(doc: dict) -> str:
    dense = doc["dense"]
    levels = [lv for lv in LEVELS if any(r["level"] == lv for r in doc["records"])]
    cells: dict[str, dict] = {}
    for r in doc["records"]:
        cells.setdefault(r["case"], {})[r["level"]] = r
    commands = "; ".join(f"`{c}`" for c in doc.get("commands", [doc["command"]]))
    lines = [f"# Accuracy against sparsity on the reference model (CPU)", "",
             f"- Commands (in this order, each resuming the same results file): {commands}; started "
             f"{doc['started']}, finished {doc.get('finished', '-')}",
             f"- Machine: {doc['machine']['cpu']}, {doc['machine']['cores']} cores shared with other jobs (load "
             f"average {doc['machine']['load_average']} at the start): prune times are indicative only",
             f"- Calibration: {doc['calibration']}; perplexity on held-out `reference/corpus/eval.txt` "
             f"(first {dense['eval_tokens']:,} tokens, windows of 256); cloze: `pydoc_cloze` accuracy (300 questions, "
             "chance 25%)",
             f"- Dense model: perplexity **{dense['perplexity']:.2f}**, cloze accuracy **{dense['cloze_acc']:.3f}**",
             "- Every decoder-block linear pruned at the level (embeddings and head dense); no fine-tuning",
             f"- Peer: {doc.get('peer_note') or 'llm-compressor ' + str(doc.get('peer_version'))}",
             *([f"- Note: {doc['note']}"] if doc.get("note") else []), "",
             "## Held-out perplexity", "", "| method | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for case, row in cells.items():
        lines.append(f"| {case} | " + " | ".join(
            "-" if lv not in row else ("error" if "error" in row[lv] else f"{row[lv]['perplexity']:.2f}")
            for lv in levels) + " |")
    lines += ["", "## Cloze accuracy", "", "| method | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for case, row in cells.items():
        lines.append(f"| {case} | " + " | ".join(
            "-" if lv not in row or "error" in row[lv] else f"{row[lv]['cloze_acc']:.3f}" for lv in levels) + " |")
    lines += ["", "## Prune time (s)", "", "| method | " + " | ".join(levels) + " |", "|---|" + "---|" * len(levels)]
    for case, row in cells.items():
        lines.append(f"| {case} | " + " | ".join(
            "-" if lv not in row or "error" in row[lv] else f"{row[lv]['prune_seconds']:.1f}" for lv in levels) + " |")
    lines += figures(cells)
    errors = [f"- {r['case']} @ {r['level']}: {r['error']}" for r in doc["records"] if "error" in r]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def figures(cells: dict[str, dict]) -> list[str]:
    """The issue's figures at 50% and 2:4: SparseGPT <= Wanda <= magnitude, and ours against the peer's."""
    def ppl(case, level):
        rec = cells.get(case, {}).get(level)
        return rec["perplexity"] if rec and "error" not in rec else None

    lines = ["", "## Figures", ""]
    for level in ("0.5", "2:4"):
        m, w, g = ppl("magnitude", level), ppl("wanda", level), ppl("sparsegpt", level)
        if None not in (m, w, g):
            lines.append(f"- {level}: SparseGPT {g:.2f} <= Wanda {w:.2f} <= magnitude {m:.2f}: "
                         f"{'yes' if g <= w <= m else 'NO'}")
        for score in ("wanda", "sparsegpt"):
            ours, peer = ppl(score, level), ppl(f"llmc-{score}", level)
            if ours is not None and peer is not None:
                lines.append(f"- {level}: our {score} {ours:.2f} against llm-compressor's {peer:.2f}: "
                             f"{100 * (ours / peer - 1):+.1f}% ({'within 2% or better' if ours <= 1.02 * peer else 'NOT within 2%'})")
    return lines if len(lines) > 3 else []


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    cells: dict[str, list] = {}
    for r in doc["records"]:
        if "error" not in r:
            cells.setdefault(r["case"], []).append(r)
    colors = dict(zip(CASES, plt.get_cmap("tab10").colors))
    for case, recs in cells.items():
        peer = case.startswith("llmc")
        un = sorted((r for r in recs if ":" not in r["level"]), key=lambda r: float(r["level"]))
        nm = [r for r in recs if ":" in r["level"]]
        for ax, key in zip(axes, ("perplexity", "cloze_acc")):
            xs = [0.0] + [float(r["level"]) for r in un]
            ys = [doc["dense"][key]] + [r[key] for r in un]
            ax.plot(xs, ys, "--" if peer else "-", marker="o", ms=3, color=colors[case], label=case)
            for r in nm:
                ax.scatter([0.5 + (0.012 if r["level"] == "4:8" else -0.012)], [r[key]], color=colors[case],
                           marker="s" if r["level"] == "2:4" else "^", s=40, zorder=3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("held-out perplexity (log)")
    axes[1].set_ylabel("pydoc_cloze accuracy")
    axes[1].axhline(0.25, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xlabel("fraction of decoder-linear weights zeroed (squares: 2:4, triangles: 4:8)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Reference model (5.6M Llama): accuracy against sparsity, no fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--levels", help="comma separated, e.g. 0.5,2:4 (default: all; fewer for taylor and peers)")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rewrite the markdown and plot from the JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    json_path = RESULTS.with_suffix(".json")
    doc = json.loads(json_path.read_text()) if json_path.exists() and not args.fresh else None
    if args.report:
        RESULTS.with_suffix(".md").write_text(markdown(doc))
        plot(doc, RESULTS.with_suffix(".png"))
        return
    if doc is None:
        model, tokenizer = core.load_model(None, core.LoadOptions(device="cpu", dtype="float32"))
        doc = {"command": "python " + " ".join(sys.argv), "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": machine(), "calibration": core.CalibrationConfig().describe(),
               "dense": _evaluate(model, tokenizer), "records": []}
    doc.setdefault("commands", [doc["command"]])
    if doc["commands"][-1] != "python " + " ".join(sys.argv) or len(doc["records"]) > 0:
        doc["commands"].append("python " + " ".join(sys.argv))
    calib = Path(tempfile.mkdtemp()) / "calib.pt"
    from core.calibration import load_calibration

    torch.save(load_calibration(core.model_io.load_tokenizer(str(core.model_io.REFERENCE_MODEL)),
                                core.CalibrationConfig()), calib)
    if not LLMC_PYTHON.exists():
        doc["peer_note"] = (f"llm-compressor not run: {LLMC_PYTHON} is missing (it cannot be installed next to our "
                            "pins: see bench/llmc_peer.py)")
    else:
        proc = subprocess.run([str(LLMC_PYTHON), "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                              capture_output=True, text=True)
        doc["peer_version"] = (proc.stdout.strip() or proc.stderr.strip()).splitlines()[-1]  # its logger writes first
        doc["peer_note"] = (f"llm-compressor {doc['peer_version']} in its own virtual environment (it pins "
                            f"transformers <= 5.17; there 5.17 with this machine's torch {torch.__version__}); same "
                            "calibration windows, block size and dampening; its sequential pipeline calibrates every "
                            "linear of a block in one pass")
    done = {(r["case"], r["level"]) for r in doc["records"]}
    for case in [c for c in args.cases.split(",") if c]:
        levels = args.levels.split(",") if args.levels else DEFAULT_LEVELS.get(case, CURVE_LEVELS)
        for level in levels:
            if (case, level) in done:
                continue
            if case.startswith("llmc") and not LLMC_PYTHON.exists():
                continue
            try:
                record = run_peer(case, level, calib) if case.startswith("llmc") else run_core(case, level)
            except core.PruningError as err:
                record = {"error": str(err)}
            doc["records"].append({"case": case, "level": level, **record})
            logger.info("%-16s %-4s %s", case, level, {k: (round(v, 3) if isinstance(v, float) else v)
                                                      for k, v in record.items()})
            json_path.write_text(json.dumps(doc, indent=2) + "\n")
    doc["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    RESULTS.with_suffix(".md").write_text(markdown(doc))
    plot(doc, RESULTS.with_suffix(".png"))
    print(markdown(doc))


if __name__ == "__main__":
    main()
