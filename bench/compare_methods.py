"""Method comparison on the reference model: every method x parameter ratio, plus the peer library optipfair.

For each case and ratio of *all* parameters removed (10/20/30/50% by default) it loads the reference model, prunes
it (calibration: the shipped calibration split), and records held-out perplexity on `reference/corpus/eval.txt`
(a different split: methods are never tuned on the evaluation text), the fraction of parameters actually removed,
prune time and peak memory. optipfair (installed from PyPI) prunes the same model in the same run with its own MAW
(= max + |min|), VOW and PON; its MLP percentage is set so that it removes the same number of parameters.

The random baseline runs with 5 seeds (mean and sample standard deviation). Methods whose units are coarse (whole
blocks, whole heads) cannot remove exactly the nominal fraction: every cell shows the fraction actually removed, and
a second table compares all methods at equal removed fractions by interpolating log-perplexity linearly in the
removed fraction between each method's measured points (the dense model at 0; never extrapolated). Depth cases
also run at 40% to give that interpolation a point between 27% and 54%.

    python bench/compare_methods.py                 # default run, < 20 min on a 2-core CPU
    python bench/compare_methods.py --cases maw,slimllm --ratios 0.2
    python bench/compare_methods.py --render bench/results/methods_reference_cpu.json --previous OLD.json

Writes bench/results/methods_<model>_<device>.{json,md,png}. `--previous` adds a section listing every cell whose
perplexity or removed fraction moved against an earlier results JSON; `--render` rewrites the markdown and the plot
from a results JSON without running anything. `--merge A.json B.json ...` joins partial runs (say, subsets of
`--cases` run side by side) into one results file; a (case, ratio) cell measured by several runs keeps the records
of the last, and the markdown lists every run with its command, date and cells.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core  # noqa: E402
from core.evaluate import perplexity_of_file  # noqa: E402

logger = logging.getLogger("bench.compare")
EVAL_TEXT = ROOT / "reference" / "corpus" / "eval.txt"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    family: str  # 'core' or 'optipfair'
    method: str = ""
    score: str | None = None
    options: tuple = ()
    seeds: tuple[int, ...] = (0,)
    extra_ratios: tuple[float, ...] = ()  # more measured points for the equal-fraction interpolation

    def recipe(self, ratio: float, calib: core.CalibrationConfig, seed: int = 0) -> core.Recipe:
        return core.Recipe(method=self.method, score=self.score, target=core.Target(param_ratio=ratio),
                           options=dict(self.options), calibration=calib, batch_size=8, seed=seed)


SLIM = (("head_mode", "query"),)  # the reference model has 2 KV heads: whole-group steps would be 50% each
DEPTH_EXTRA = (0.4,)
CASES = [
    Case("random", "core", "mlp_width", "random", seeds=(0, 1, 2, 3, 4)),
    *[Case(s, "core", "mlp_width", s) for s in ("l2", "maw", "maw_range", "vow", "pon", "activation")],
    Case("slimllm", "core", "slimllm", options=SLIM),
    Case("slimllm-ends_pruned", "core", "slimllm", options=SLIM + (("protect_ends", False),)),
    Case("slimllm-no_greedy", "core", "slimllm", options=SLIM + (("greedy", False),)),
    Case("slimllm-no_feature_space", "core", "slimllm", options=SLIM + (("feature_space", False),)),
    Case("slimllm-uniform", "core", "slimllm", options=SLIM + (("nonuniform", False),)),
    Case("slimllm-no_regression", "core", "slimllm", options=SLIM + (("regression", False),)),
    Case("depth-cosine", "core", "depth", "cosine", extra_ratios=DEPTH_EXTRA),
    Case("depth-shapley", "core", "depth", "shapley", extra_ratios=DEPTH_EXTRA),
    Case("attention-sublayers", "core", "depth", "cosine", (("unit", "attention"),)),
    *[Case(f"optipfair-{m.lower()}", "optipfair", score=m) for m in ("MAW", "VOW", "PON")],
]


class PeakRss:
    """Samples the process RSS in a thread; peak above the level at start."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.proc = interval, psutil.Process()
        self.peak = self.start = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRss":
        self.start = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def overhead(self) -> int:
        return self.peak - self.start


def _mlp_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())


def prune_with_optipfair(model, method: str, ratio: float):
    import optipfair

    total = sum(p.numel() for p in model.parameters())
    percentage = 100.0 * ratio * total / _mlp_params(model)
    if percentage >= 100:
        raise ValueError(f"removing {ratio:.0%} of the parameters needs {percentage:.0f}% of the MLP")
    return optipfair.prune_model(model, pruning_type="MLP_GLU", neuron_selection_method=method,
                                 pruning_percentage=percentage, show_progress=False)


def run_cell(case: Case, ratio: float, model_path: str, calib: core.CalibrationConfig, eval_tokens: int,
             seed: int = 0) -> dict:
    model, tokenizer = core.load_model(model_path, core.LoadOptions(device="cpu", dtype="float32"))
    before = sum(p.numel() for p in model.parameters())
    record = {"case": case.name, "family": case.family, "ratio": ratio, "seed": seed, "params_before": before}
    try:
        with PeakRss() as mem:
            start = time.perf_counter()
            if case.family == "optipfair":
                model = prune_with_optipfair(model, case.score, ratio)
            elif ratio > 0:
                core.prune(model, tokenizer, case.recipe(ratio, calib, seed))
            record["prune_seconds"] = time.perf_counter() - start
    except (core.PruningError, ValueError) as err:
        record["error"] = str(err).splitlines()[0]
        logger.info("%s @ %.0f%%: %s", case.name, 100 * ratio, record["error"])
        return record
    record["peak_memory_overhead_mib"] = mem.overhead / 2**20
    after = sum(p.numel() for p in model.parameters())
    ppl = perplexity_of_file(model, tokenizer, EVAL_TEXT, max_length=256, max_tokens=eval_tokens)
    record.update(params_after=after, removed_fraction=1 - after / before, perplexity=ppl.perplexity,
                  eval_tokens=ppl.tokens)
    logger.info("%-26s %3.0f%% seed %d  params %s  ppl %8.2f  (%.1fs)", case.name, 100 * ratio, seed,
                f"{after:,}", ppl.perplexity, record["prune_seconds"])
    return record


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": psutil.cpu_count(), "threads": torch.get_num_threads(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.UTC).isoformat()}


NOMINAL_TOLERANCE = 0.005  # a cell more than half a point away from its nominal fraction is marked


def aggregate(records: list[dict]) -> dict[str, dict[str, dict]]:
    """Per case and ratio (str key): mean and sample sd of perplexity and removed fraction over seeds (errors
    dropped)."""
    cells: dict[str, dict[float, list]] = {}
    for rec in records:
        cells.setdefault(rec["case"], {}).setdefault(rec["ratio"], []).append(rec)
    out: dict[str, dict[str, dict]] = {}
    for case, by_ratio in cells.items():
        for ratio, recs in by_ratio.items():
            ok = [r for r in recs if "error" not in r]
            if not ok:
                out.setdefault(case, {})[str(ratio)] = {"n": 0, "error": recs[0].get("error")}
                continue
            ppl = torch.tensor([r["perplexity"] for r in ok], dtype=torch.float64)
            frac = torch.tensor([r["removed_fraction"] for r in ok], dtype=torch.float64)
            out.setdefault(case, {})[str(ratio)] = {
                "n": len(ok), "perplexity": ppl.mean().item(),
                "perplexity_sd": ppl.std().item() if len(ok) > 1 else 0.0,
                "removed_fraction": frac.mean().item(), "seeds": [r.get("seed", 0) for r in ok]}
    return out


def at_fraction(points: list[tuple[float, float]], target: float) -> tuple[float | None, str]:
    """Perplexity at removed fraction `target` from measured (fraction, perplexity) points: ('measured' within the
    tolerance, 'interpolated' log-linearly between the nearest points on either side, or None outside the range)."""
    near = [p for f, p in points if abs(f - target) <= NOMINAL_TOLERANCE]
    if near:
        return near[0], "measured"
    below = [(f, p) for f, p in points if f < target]
    above = [(f, p) for f, p in points if f > target]
    if not below or not above:
        return None, "outside"
    (f0, p0), (f1, p1) = max(below), min(above)
    w = (target - f0) / (f1 - f0)
    return math.exp((1 - w) * math.log(p0) + w * math.log(p1)), "interpolated"


def equal_fractions(results: dict, cells: dict) -> dict[str, dict[str, dict]]:
    dense = results["dense"]
    table = {}
    for case, by_ratio in cells.items():
        points = sorted({(c["removed_fraction"], c["perplexity"]) for c in by_ratio.values() if c["n"]})
        points = [(0.0, dense["perplexity"])] + points
        table[case] = {}
        for r in results["ratios"]:
            value, how = at_fraction(points, r)
            table[case][str(r)] = {"perplexity": value, "how": how}
    return table


def _cell(c: dict | None, nominal: float) -> str:
    if c is None:
        return "not run"
    if not c["n"]:
        return "-"
    mark = "" if abs(c["removed_fraction"] - nominal) <= NOMINAL_TOLERANCE else " †"
    ppl = f"{c['perplexity']:.2f}" + (f" ± {c['perplexity_sd']:.2f}" if c["n"] > 1 else "")
    return f"{ppl} ({c['removed_fraction']:.1%}){mark}"


def markdown(results: dict) -> str:
    ratios = results["ratios"]
    dense = results["dense"]
    cells = results["cells"]
    seeds = max((c["n"] for by in cells.values() for c in by.values()), default=1)
    lines = [f"# Method comparison on `{results['model']}` ({results['device']})", "",
             f"- Command: `{results['command']}`",
             *[f"  - merged from `{run['command']}` ({run['date'][:10]}): {', '.join(run['cases'])}"
               + (f"; {run['note']}" if run.get("note") else "") for run in results.get("runs", [])],
             f"- Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, torch threads "
             f"{results['machine']['threads']}, torch {results['machine']['torch']}, {results['machine']['date'][:10]}",
             f"- Calibration: {results['calibration']}; evaluation: held-out `reference/corpus/eval.txt`, first "
             f"{dense['eval_tokens']:,} tokens, windows of 256; no fine-tuning after pruning",
             f"- Dense model: {dense['params_before']:,} parameters, perplexity **{dense['perplexity']:.2f}**",
             "- Cells: held-out perplexity (fraction of all parameters actually removed); `-` = target not reachable "
             f"by that method; † = more than {100 * NOMINAL_TOLERANCE:.1f} percentage points away from the column's "
             "nominal fraction "
             "(compare those in the equal-fraction table below)",
             *([f"- Conditions: {results['note']}"] if results.get("note") else []),
             f"- `random`: mean ± sample sd over {seeds} seeds (0-{seeds - 1}); every other row is deterministic "
             "(one run)", "",
             "| method | " + " | ".join(f"{r:.0%} of params" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for case, by_ratio in cells.items():
        lines.append(f"| {case} | " + " | ".join(_cell(by_ratio.get(str(r)), r) for r in ratios) + " |")
    lines += ["", "## At equal removed fractions", "",
              "Perplexity at exactly the nominal fraction of parameters removed: measured where a run landed within "
              f"{100 * NOMINAL_TOLERANCE:.1f} points of it, else *interpolated* (in italics) log-linearly between "
              "the method's "
              "two nearest measured points (dense = 0%), `-` where no measured point lies beyond it.", "",
              "| method | " + " | ".join(f"{r:.0%}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for case, row in results["equal_fraction"].items():
        out = []
        for r in ratios:
            c = row[str(r)]
            out.append("-" if c["perplexity"] is None else
                       (f"*{c['perplexity']:.2f}*" if c["how"] == "interpolated" else f"{c['perplexity']:.2f}"))
        lines.append(f"| {case} | " + " | ".join(out) + " |")
    extra = sorted({float(r) for by in cells.values() for r in by} - set(ratios))
    if extra:
        lines += ["", "Extra measured points (used by the interpolation): " + "; ".join(
            f"{case} at {r:.0%}: {_cell(by[str(r)], r).replace(' †', '')}" for case, by in cells.items()
            for r in extra if str(r) in by)]
    lines += ["", "Prune time (s) / peak memory overhead (MiB) at the largest ratio:", "",
              "| method | seconds | MiB |", "|---|---|---|"]
    by_case: dict[str, dict] = {}
    for rec in results["records"]:
        by_case.setdefault(rec["case"], {})[rec["ratio"]] = rec
    for case, recs in by_case.items():
        ok = [c for c in recs.values() if "error" not in c and c["ratio"] in ratios]
        if ok:
            last = max(ok, key=lambda c: c["ratio"])
            lines.append(f"| {case} | {last['prune_seconds']:.2f} | {last['peak_memory_overhead_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def moved(previous: dict, results: dict) -> list[str]:
    """Markdown lines for every (case, ratio) whose perplexity or removed fraction differs from `previous` (an
    earlier results JSON, with or without aggregated cells), and for cases only one of them has."""
    old = previous.get("cells") or aggregate(previous["records"])
    new = results["cells"]
    lines = [f"## What moved against the previous run ({previous['machine']['date'][:10]})", "",
             "Every cell whose perplexity changed by more than 0.005 or whose removed fraction changed by more than "
             "0.05 points, and cells only one run has; cells not listed are unchanged.", "",
             "| method | ratio | before | now |", "|---|---|---|---|"]
    count = 0
    for case in dict.fromkeys([*old, *new]):
        for r in sorted({float(k) for k in (*old.get(case, {}), *new.get(case, {}))}):
            a, b = old.get(case, {}).get(str(r)), new.get(case, {}).get(str(r))
            if a is not None and b is not None and (not a["n"] and not b["n"] or a["n"] and b["n"] and abs(
                    a["perplexity"] - b["perplexity"]) <= 0.005 and abs(
                    a["removed_fraction"] - b["removed_fraction"]) <= 0.0005):
                continue
            count += 1
            lines.append(f"| {case} | {r:.0%} | {_cell(a, r) if a else 'not run'} | "
                         f"{_cell(b, r) if b else 'not run'} |")
    return lines + ([] if count else ["| (none) | | | |"])


def merge(parts: list[dict]) -> dict:
    """One results dict from partial runs of the same model, calibration and evaluation; the table's columns are the
    first run's ratios (the others may have run fewer: their missing cells show as not run)."""
    first = parts[0]
    for part in parts[1:]:
        for key in ("model", "calibration"):
            if part[key] != first[key]:
                raise SystemExit(f"cannot merge: '{key}' differs ({part[key]!r} vs {first[key]!r})")
        if not set(part["ratios"]) <= set(first["ratios"]) | {r for c in CASES for r in c.extra_ratios}:
            raise SystemExit(f"cannot merge: ratios {part['ratios']} are not among the first run's {first['ratios']}")
        # thread counts change float sums in the last digits; anything larger means a different model or evaluation
        if abs(part["dense"]["perplexity"] / first["dense"]["perplexity"] - 1) > 1e-5:
            raise SystemExit("cannot merge: the dense perplexity differs between the runs")
    cells: dict[tuple[str, float], list[dict]] = {}
    runs = []
    for part in parts:
        mine: dict[tuple[str, float], list[dict]] = {}
        for r in part["records"]:
            mine.setdefault((r["case"], r["ratio"]), []).append(r)
        cells.update(mine)  # a later run replaces the (case, ratio) cells it measured
        runs.append({"command": part["command"], "date": part["machine"]["date"], "note": part.get("note", ""),
                     "cases": [f"{c} at {'/'.join(f'{100 * r:.0f}' for c2, r in mine if c2 == c)}%"
                               for c in dict.fromkeys(c for c, _ in mine)]})
    order = {c.name: i for i, c in enumerate(CASES)}
    records = [r for key in sorted(cells, key=lambda k: (order.get(k[0], len(order)), k[1])) for r in cells[key]]
    results = {**parts[-1], "ratios": first["ratios"], "command": "python " + " ".join(sys.argv), "runs": runs,
               "records": records, "total_seconds": sum(p.get("total_seconds", 0.0) for p in parts), "note": ""}
    results["cells"] = aggregate(records)
    results["equal_fraction"] = equal_fractions(results, results["cells"])
    return results


def write_outputs(results: dict, stem: Path, previous: dict | None = None) -> None:
    text = markdown(results) + f"\nTotal run time: {results['total_seconds']:.0f} s.\n"
    if previous is not None:
        text += "\n" + "\n".join(moved(previous, results)) + "\n"
    stem.with_suffix(".md").write_text(text)
    plot(results, stem.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    dense = results["dense"]
    colors = plt.get_cmap("tab20").colors
    styles = {"optipfair": "--", "slimllm": "-.", "depth": ":", "attention": ":"}
    for n, (case, by_ratio) in enumerate(results["cells"].items()):
        cells = sorted((c for c in by_ratio.values() if c["n"]), key=lambda c: -c["removed_fraction"])
        if not cells:
            continue
        style = next((v for k, v in styles.items() if case.startswith(k)), "-")
        x = [dense["params_before"] * (1 - c["removed_fraction"]) / 1e6 for c in cells] + [dense["params_before"] / 1e6]
        y = [c["perplexity"] for c in cells] + [dense["perplexity"]]
        sd = [c["perplexity_sd"] for c in cells] + [0.0]
        ax.errorbar(x, y, yerr=sd if any(sd) else None, fmt=style, color=colors[n % len(colors)], marker="o", ms=3,
                    lw=1.6, capsize=3,
                    label=case + (f" (mean ± sd, {cells[0]['n']} seeds)" if cells[0]["n"] > 1 else ""))
    ax.set_yscale("log")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"Structured pruning of the {results.get('tag', 'reference')} model without fine-tuning "
                 f"(dense: {dense['perplexity']:.1f})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "reference" / "model"))
    parser.add_argument("--cases", help="comma-separated case names (default: all)")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5", help="fractions of all parameters removed")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--tag", default="reference", help="name used in the output files")
    parser.add_argument("--no-extra", action="store_true", help="skip the cases' extra interpolation points")
    parser.add_argument("--note", default="", help="a line about the run conditions, added to the results")
    parser.add_argument("--previous", help="an earlier results JSON: list every cell that moved against it")
    parser.add_argument("--render", help="a results JSON: rewrite its markdown and plot, run nothing")
    parser.add_argument("--merge", nargs="+", help="results JSONs of partial runs: write one results file")
    args = parser.parse_args(argv)
    previous = json.loads(Path(args.previous).read_text()) if args.previous else None
    if args.render:
        stem = Path(args.render).with_suffix("")
        results = json.loads(Path(args.render).read_text())
        if args.note:
            results["note"] = args.note
            stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        write_outputs(results, stem, previous)
        return 0
    if args.merge:
        results = merge([json.loads(Path(f).read_text()) for f in args.merge])
        results["note"] = args.note
        stem = Path(args.out_dir) / f"methods_{args.tag}_cpu"
        stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
        write_outputs(results, stem, previous)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("core").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in (args.cases or "").split(",") if n and n not in by_name]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    cases = [by_name[n] for n in args.cases.split(",")] if args.cases else CASES  # run in the order given
    ratios = [float(r) for r in args.ratios.split(",")]
    calib = core.CalibrationConfig(n_samples=args.calib_samples, seq_len=args.calib_seq_len)
    start = time.perf_counter()
    dense = run_cell(Case("dense", "core", "mlp_width", "maw"), 0.0, args.model, calib, args.eval_tokens)
    model = (str(Path(args.model).resolve().relative_to(ROOT)) if Path(args.model).resolve().is_relative_to(ROOT)
             else args.model)
    results = {"model": model, "tag": args.tag, "device": "cpu", "command": "python " + " ".join(sys.argv),
               "machine": machine(), "calibration": calib.describe(), "ratios": ratios, "dense": dense,
               "records": [], "note": args.note}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"methods_{args.tag}_cpu"
    for case in cases:
        for ratio in sorted({*ratios, *(() if args.no_extra else case.extra_ratios)}):
            for seed in case.seeds:
                results["records"].append(run_cell(case, ratio, args.model, calib, args.eval_tokens, seed))
                # after every cell: an interrupted run keeps what it measured (merge it with --merge)
                results["total_seconds"] = time.perf_counter() - start
                stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    results["cells"] = aggregate(results["records"])
    results["equal_fraction"] = equal_fractions(results, results["cells"])
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    write_outputs(results, stem, previous)
    logger.info("wrote %s.{json,md,png} in %.0f s", stem, results["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
