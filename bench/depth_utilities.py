"""What optimising depth pruning for one objective costs on the others (Siddiqui et al.'s utility study).

On the reference model, units (whole blocks, or attention sub-layers) are ranked by exact Shapley values under
three utilities: minus the calibration loss, minus the logit distance to the full model, and accuracy on the first
`--task-docs` items of the bundled multiple-choice task `pydoc_cloze`; cosine block influence is the data-only
baseline. Each pruned model is then evaluated on: held-out perplexity (`reference/corpus/eval.txt`), accuracy on
the task items the task utility never saw (held-out items), accuracy on the items it was tuned on, and the
calibration loss. A utility that wins on its own objective and loses on the others shows the trade-off.

    python bench/depth_utilities.py            # ~15 min on an idle 2-core CPU

Writes bench/results/depth_utilities_<tag>_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core  # noqa: E402
from core.architectures import spec_for_config  # noqa: E402
from core.calibration import load_calibration  # noqa: E402
from core.evaluate import perplexity_of_file  # noqa: E402
from core.harness import choice_task  # noqa: E402
from core.utility import LossUtility, TaskUtility  # noqa: E402

logger = logging.getLogger("bench.depth_utilities")
EVAL_TEXT = ROOT / "reference" / "corpus" / "eval.txt"
RANKINGS = [("cosine", None), ("shapley", "loss"), ("shapley", "logit_distance"), ("shapley", "task")]


def evaluate(model, tokenizer, calib_ids, held_out: TaskUtility, seen: TaskUtility, eval_tokens: int) -> dict:
    spec = spec_for_config(model.config)
    ppl = perplexity_of_file(model, tokenizer, EVAL_TEXT, max_length=256, max_tokens=eval_tokens)
    return {"perplexity": ppl.perplexity, "task_acc_held_out": held_out(model, spec),
            "task_acc_seen": seen(model, spec), "calibration_loss": -LossUtility(calib_ids, 8)(model, spec),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "reference" / "model"))
    parser.add_argument("--task", default="pydoc_cloze")
    parser.add_argument("--task-docs", type=int, default=100, help="items the task utility scores on")
    parser.add_argument("--units", default="block:1,block:2,attention:2,attention:3",
                        help="unit:count pairs (units removed)")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--tag", default="reference")
    parser.add_argument("--note", default="", help="a line about the run conditions, added to the markdown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("core").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    calib = core.CalibrationConfig(n_samples=args.calib_samples, seq_len=args.calib_seq_len)
    model, tokenizer = core.load_model(args.model, core.LoadOptions(device="cpu", dtype="float32"))
    calib_ids = load_calibration(tokenizer, calib)
    length = model.config.max_position_embeddings
    held_out = TaskUtility(choice_task(args.task, docs=slice(args.task_docs, None)), tokenizer, length)
    seen = TaskUtility(choice_task(args.task, docs=slice(0, args.task_docs)), tokenizer, length)
    dense = evaluate(model, tokenizer, calib_ids, held_out, seen, args.eval_tokens)
    n_layers = model.config.num_hidden_layers
    counts: dict[str, list[int]] = {}
    for item in args.units.split(","):
        unit, count = item.split(":")
        counts.setdefault(unit, []).append(int(count))
    rows = []
    for unit, wanted in counts.items():
        for score, utility in RANKINGS:
            # one-shot ranking: score once (removing the most units asked), then remove the lowest-ranked k
            options = {"unit": unit}
            if utility:
                options.update(utility=utility, task=args.task, task_docs=args.task_docs)
            recipe = core.Recipe(method="depth", score=score, target=core.Target(ratio=max(wanted) / n_layers),
                                 options=options, calibration=calib, batch_size=8)
            scored, _ = core.load_model(args.model, core.LoadOptions(device="cpu", dtype="float32"))
            t0 = time.perf_counter()
            result = core.prune(scored, tokenizer, recipe)
            seconds = time.perf_counter() - t0
            scores = {int(k): v for k, v in result.report["scores"].items()}
            ranked = sorted(scores, key=lambda i: (scores[i], i))
            for k in sorted(wanted):
                pruned = scored
                if k != max(wanted):
                    pruned, _ = core.load_model(args.model, core.LoadOptions(device="cpu", dtype="float32"))
                    core.prune(pruned, tokenizer, core.Recipe(
                        method="depth", target=core.Target(ratio=k / n_layers),
                        options={"unit": unit, "layers": sorted(ranked[:k])}))
                row = {"unit": unit, "count": k, "score": score, "utility": utility, "removed": sorted(ranked[:k]),
                       "scoring_seconds": seconds, "scores": result.report["scores"],
                       "estimate": result.report.get("estimate"),
                       **evaluate(pruned, tokenizer, calib_ids, held_out, seen, args.eval_tokens)}
                row["removed_fraction"] = 1 - row["params"] / dense["params"]
                rows.append(row)
                logger.info("%-9s x%d %-8s %-15s removed %s  ppl %.2f  acc %.3f / %.3f", unit, k, score,
                            utility or "-", row["removed"], row["perplexity"], row["task_acc_held_out"],
                            row["task_acc_seen"])
    rows.sort(key=lambda r: (list(counts).index(r["unit"]), r["count"]))
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    results = {"model": args.model, "task": args.task, "task_docs_seen": args.task_docs,
               "task_docs_held_out": len(held_out.task.docs), "command": "python " + " ".join(sys.argv),
               "machine": {"cpu": cpu, "cores": psutil.cpu_count(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat()},
               "calibration": calib.describe(), "note": args.note, "dense": dense, "rows": rows,
               "total_seconds": time.perf_counter() - start}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"depth_utilities_{args.tag}_cpu"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    stem.with_suffix(".md").write_text(markdown(results))
    logger.info("wrote %s.{json,md} in %.0f s", stem, results["total_seconds"])
    return 0


def markdown(results: dict) -> str:
    dense, n_held = results["dense"], results["task_docs_held_out"]
    acc = dense["task_acc_held_out"]
    se = math.sqrt(acc * (1 - acc) / n_held)
    m = results["machine"]
    lines = ["# Depth pruning: what optimising for one utility costs on the others", "",
             f"- Command: `{results['command']}`",
             f"- Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}, torch {m['torch']}, "
             f"{m['date'][:10]}" + (f"; {results['note']}" if results.get("note") else ""),
             f"- Model: `{Path(results['model']).name}`; calibration: {results['calibration']}",
             f"- Rankings: `cosine` (block influence, data only) and exact Shapley values (all 2^6 sub-networks) "
             f"under minus the calibration loss, minus the logit distance to the full model, or accuracy on the "
             f"first {results['task_docs_seen']} items of `{results['task']}` (4 choices, chance 25%)",
             f"- Columns: held-out perplexity (`reference/corpus/eval.txt`); accuracy on the {n_held} task items no "
             f"utility saw (held-out; one standard error at the dense accuracy is {se:.1%}, so differences below "
             f"~{2 * se:.0%} are noise); accuracy on the {results['task_docs_seen']} items the task utility was "
             "tuned on; calibration loss. No fine-tuning.",
             f"- Dense: perplexity {dense['perplexity']:.2f}, held-out accuracy {acc:.1%}, tuned-on accuracy "
             f"{dense['task_acc_seen']:.1%}, calibration loss {dense['calibration_loss']:.3f}", "",
             "| units removed | ranking | removed | params removed | held-out ppl | task acc (held-out) "
             "| task acc (tuned on) | calib loss |", "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        ranking = r["score"] if r["utility"] is None else f"shapley / {r['utility']}"
        lines.append(f"| {r['count']} {r['unit']} | {ranking} | {r['removed']} | {r['removed_fraction']:.1%} | "
                     f"{r['perplexity']:.2f} | {r['task_acc_held_out']:.1%} | {r['task_acc_seen']:.1%} | "
                     f"{r['calibration_loss']:.3f} |")
    return "\n".join(lines) + f"\n\nTotal run time: {results['total_seconds']:.0f} s.\n"


if __name__ == "__main__":
    sys.exit(main())
