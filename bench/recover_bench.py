"""Recovery training benchmarks on CPU. Budgets are steps and tokens (the machine may be shared: the measured times
are recorded, with the load average, but are not what the runs are sized by).

    python bench/recover_bench.py slimllm      # SlimLLM at 50% of parameters: one-shot vs + distillation
    python bench/recover_bench.py iterative    # N prune -> recover rounds vs one-shot + recovery, same final
                                               # size and the same total training tokens
    python bench/recover_bench.py throughput   # recovery tokens/s on a 1B-shaped Llama (random weights)

Perplexity as in bench/compare_methods.py: held-out reference/corpus/eval.txt, first 16,384 tokens, windows of 256.
Recovery data: reference/corpus/train.txt (the reference model's own pre-training text; build it with
`python reference/build_corpus.py`) when present, else the shipped calibration text; its last 10% is held out
for early stopping. Results go to bench/results/recover_reference_cpu.{json,md} (one section per case) and
bench/results/recover_1b_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core  # noqa: E402
from compare_methods import EVAL_TEXT, PeakRss, machine  # noqa: E402
from core.calibration import CalibrationConfig  # noqa: E402
from core.evaluate import perplexity_of_file  # noqa: E402
from core.recover import recover  # noqa: E402
from core.layers import decoder_layers  # noqa: E402
from core.recover_config import RecoverConfig  # noqa: E402

logger = logging.getLogger("bench.recover")
REFERENCE = ROOT / "reference" / "model"
TRAIN_TEXT = ROOT / "reference" / "corpus" / "train.txt"
RESULTS = ROOT / "bench" / "results"
SLIM = {"head_mode": "query"}  # as in compare_methods: 2 KV heads, whole-group steps would be 50% each


def data_source() -> CalibrationConfig:
    return CalibrationConfig(source=str(TRAIN_TEXT)) if TRAIN_TEXT.is_file() else CalibrationConfig()


def ppl(model, tokenizer, tokens: int) -> float:
    return perplexity_of_file(model, tokenizer, EVAL_TEXT, max_length=256, max_tokens=tokens).perplexity


def load():
    return core.load_model(str(REFERENCE), core.LoadOptions(device="cpu", dtype="float32"))


def recipe(args, recover_cfg: RecoverConfig | None = None) -> core.Recipe:
    options = dict(SLIM) if args.method == "slimllm" else {}
    options.update(yaml.safe_load(args.options or "{}") or {})
    target = core.Target(**{args.target: args.ratio})
    return core.Recipe(method=args.method, score=args.score, target=target, options=options, recover=recover_cfg)


def recover_config(args, steps: int, **changes) -> RecoverConfig:
    data = data_source()
    return RecoverConfig(steps=steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                         trainable=args.trainable, data=data, eval_every=args.eval_every, patience=args.patience,
                         kd=args.kd, lm=args.lm, **changes)


def summary(rec: dict) -> dict:
    keep = ("objective", "trainable", "steps", "steps_budget", "stopped", "tokens", "lr", "data", "kept_step",
            "heldout_perplexity", "seconds", "tokens_per_second", "rounds", "schedule")
    out = {k: rec[k] for k in keep if k in rec}
    out["data"] = out.get("data", "").replace(f"{ROOT}/", "")  # paths relative to the repository
    return out


def case_slimllm(args) -> dict:
    """Dense, one-shot, and one-shot + recovery (the recovery alone is timed)."""
    model, tokenizer = load()
    dense = ppl(model, tokenizer, args.eval_tokens)
    teacher, _ = load()
    result = core.prune(model, tokenizer, recipe(args))
    one_shot = ppl(model, tokenizer, args.eval_tokens)
    logger.info("dense %.3f, one-shot %.3f (%s params)", dense, one_shot, f"{result.params_after['total']:,}")
    load_avg = os.getloadavg()
    cpu = time.process_time()
    with PeakRss() as mem:
        model, rec = recover(model, teacher, tokenizer, recover_config(args, args.steps), bars=False)
    cpu = time.process_time() - cpu
    recovered = ppl(model, tokenizer, args.eval_tokens)
    logger.info("recovered %.3f after %d steps (%.0f s)", recovered, rec["steps"], rec["seconds"])
    masks = {}
    if args.method == "sparsity":  # the zeros the recovery had to keep: measured before and after it
        from core.sparse_format import is_nm, measure_sparsity

        pattern = (yaml.safe_load(args.options or "{}") or {}).get("pattern")
        n, m = (int(x) for x in str(pattern).split(":")) if pattern else (None, None)
        linears = [mod.weight for layer in decoder_layers(model, result.spec) for mod in layer.modules()
                   if isinstance(mod, torch.nn.Linear)]
        masks = {"sparsity_one_shot": result.extra.get("sparsity", {}).get("sparsity"),
                 "sparsity_recovered": measure_sparsity(model, result.spec)["sparsity"],
                 "pattern": pattern, "pattern_holds": all(is_nm(w, n, m) for w in linears) if n else None}
        logger.info("masks after recovery: %s", masks)
    return {"method": args.method, "score": args.score, "param_ratio": args.ratio, "target": args.target,
            "options": args.options, "masks": masks,
            "params": [result.params_before["total"],
                                                                         result.params_after["total"]],
            "dense": dense, "one_shot": one_shot, "recovered": recovered,
            "one_shot_ratio": one_shot / dense, "recovered_ratio": recovered / dense,
            "recovery": summary(rec), "loss_curve": rec["loss_curve"], "load_average_at_start": load_avg,
            "recovery_cpu_seconds": round(cpu, 1),
            "peak_memory_overhead_mib": round(mem.overhead / 2**20), "threads": torch.get_num_threads()}


def case_iterative(args) -> dict:
    """Rounds vs one-shot: the same final target and the same total recovery steps."""
    out = {"method": args.method, "score": args.score, "param_ratio": args.ratio, "steps_total": args.steps,
           "rounds": {}}
    _, tokenizer = load()
    dense_model, _ = load()
    out["dense"] = ppl(dense_model, tokenizer, args.eval_tokens)
    del dense_model
    for rounds in (args.rounds, 1):  # rounds first: when a method cannot be iterated, nothing else is spent
        cfg = recover_config(args, args.steps, rounds=rounds, schedule=args.schedule)
        start = time.perf_counter()
        try:
            result = core.run_recipe(dataclasses.replace(recipe(args), recover=cfg, model=str(REFERENCE)))
        except core.PruningError as err:
            out["rounds"][str(rounds)] = {"error": str(err)}
            logger.warning("%d round(s): %s", rounds, err)
            break
        rec = result.extra["recovery"]
        value = ppl(result.model, tokenizer, args.eval_tokens)
        out["rounds"][str(rounds)] = {
            "perplexity": value, "ratio_to_dense": value / out["dense"], "params_after": result.params_after["total"],
            "steps": rec["steps"], "tokens": rec["tokens"], "seconds": round(time.perf_counter() - start, 1),
            "per_round": [{k: r.get(k) for k in ("round", "target", "params_after", "heldout_perplexity")}
                          for r in rec.get("per_round", [])]}
        logger.info("%d round(s): perplexity %.3f, %s params, %d steps", rounds, value,
                    f"{result.params_after['total']:,}", rec["steps"])
    return out


def case_throughput(args) -> dict:
    """Recovery steps on a 1B-shaped Llama (TinyLlama-1.1B shape, random weights), MLP width pruned 20%."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config).eval()
    student = LlamaForCausalLM(config)
    student.load_state_dict(teacher.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)  # ids < 4096 fit the 32k vocabulary
    core.prune(student, tokenizer, core.Recipe(method="mlp_width", score="random", target=core.Target(ratio=0.2)))
    rows = []
    trainables = args.trainables.split(",")
    for n, trainable in enumerate(trainables):
        cfg = RecoverConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, trainable=trainable,
                            eval_every=10 ** 6, eval_tokens=args.seq_len, data_tokens=200_000, patience=0, warmup=1,
                            dtype=args.dtype)
        model = student  # the last case trains the student itself: one copy less in memory
        if n < len(trainables) - 1:
            model = LlamaForCausalLM(student.config)
            model.load_state_dict(student.state_dict())
        with PeakRss() as mem:
            _, rec = recover(model, teacher, tokenizer, cfg)
        rows.append({"trainable": trainable, "dtype": rec["dtype"], "steps": rec["steps"], "tokens": rec["tokens"],
                     "seconds": rec["seconds"], "tokens_per_second": rec["tokens_per_second"],
                     "trainable_parameters": rec["trainable_parameters"],
                     "peak_memory_overhead_gib": round(mem.overhead / 2**30, 2)})
        logger.info("%s", rows[-1])
        del model
    return {"shape": "TinyLlama-1.1B (hidden 2048, 22 layers, MLP 5632, 32/4 heads, vocab 32000)",
            "params": [sum(p.numel() for p in teacher.parameters()), sum(p.numel() for p in student.parameters())],
            "batch": [args.batch, args.seq_len], "rows": rows, "load_average_at_start": os.getloadavg()}


def markdown(doc: dict) -> str:
    m = doc.get("machine", {})
    lines = ["# Recovery training on CPU", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, torch threads {m.get('threads')}, torch "
             f"{m.get('torch')}. The machine was shared with other jobs while these ran (load average recorded "
             "per case): budgets are steps and tokens; times are what this shared machine measured.", ""]
    for key in sorted(k for k in doc if k.startswith("slimllm")):
        s = doc[key]
        r = s["recovery"]
        name = "SlimLLM" if s["method"] == "slimllm" else " ".join(
            x for x in (s["method"], s.get("score"), s.get("options")) if x)
        share = "of parameters" if s.get("target", "param_ratio") == "param_ratio" else "of the prunable weights"
        lines += [f"## {name} at {s['param_ratio']:.0%} {share} + distillation ({r['trainable']})", "",
                  f"`{s['command']}`", "",
                  f"- {s['params'][0]:,} -> {s['params'][1]:,} parameters; recovery: {r['objective']}, "
                  f"{r['trainable']}, {r['steps']:,} steps ({r['stopped']}), {r['tokens']:,} tokens, lr {r['lr']:g}, "
                  f"data {r['data']}",
                  *([f"- sparsity of the decoder linears: {s['masks']['sparsity_one_shot']} after pruning, "
                     f"{s['masks']['sparsity_recovered']} after recovery; {s['masks']['pattern']} pattern holds in "
                     f"every linear after recovery: {s['masks']['pattern_holds']}"] if s.get("masks") else []),
                  f"- recovery time on the shared machine {r['seconds']:.0f} s wall ({r['tokens_per_second']} "
                  f"tokens/s, load average {s['load_average_at_start'][0]:.1f} at the start); CPU time of the "
                  f"process {s['recovery_cpu_seconds']:.0f} s on {s['threads']} thread(s), i.e. about the wall time "
                  "on an otherwise idle core", "",
                  "| model | held-out perplexity | vs dense |", "|---|---|---|",
                  f"| dense | {s['dense']:.2f} | 1.00x |",
                  f"| {name}, one-shot | {s['one_shot']:.2f} | {s['one_shot_ratio']:.2f}x |",
                  f"| {name} + distillation | {s['recovered']:.2f} | {s['recovered_ratio']:.2f}x |", "",
                  "Held-out loss curve during recovery (held-out part of the recovery data):", "",
                  "| step | tokens | held-out perplexity |", "|---|---|---|"]
        lines += [f"| {h['step']} | {h['tokens']:,} | {h['heldout_perplexity']:.2f} |" for h in s["loss_curve"]]
        lines.append("")
    for it in [doc[k] for k in sorted(doc) if k.startswith("iterative")]:
        name = it["method"] + (f" ({it['score']})" if it.get("score") else "")
        lines += [f"## Iterative ({max(map(int, it['rounds']))} rounds) vs one-shot: {name}", "",
                  f"`{it['command']}`", "",
                  f"{it['method']} at {it['param_ratio']:.0%} of parameters, {it['steps_total']} recovery steps in all "
                  "(split evenly over the rounds). Dense perplexity "
                  f"{it['dense']:.2f}.", "", "| rounds | parameters | steps | tokens | held-out perplexity | vs dense |",
                  "|---|---|---|---|---|---|"]
        for n, row in sorted(it["rounds"].items(), key=lambda kv: int(kv[0])):
            if "error" in row:
                lines.append(f"| {n} | - | - | - | {row['error']} | - |")
            else:
                lines.append(f"| {n} | {row['params_after']:,} | {row['steps']} | {row['tokens']:,} | "
                             f"{row['perplexity']:.2f} | {row['ratio_to_dense']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def markdown_1b(doc: dict) -> str:
    t = doc["throughput"]
    m = doc["machine"]
    lines = ["# Recovery throughput on a 1B-shaped Llama (CPU)", "", f"`{t['command']}`", "",
             f"{t['shape']}: {t['params'][0]:,} parameters teacher, {t['params'][1]:,} student (MLP width -20%). "
             f"Batch {t['batch'][0]} x {t['batch'][1]} tokens; teacher forward + student forward/backward + AdamW "
             f"per step. Machine: {m['cpu']}, {m['cores']} cores, torch threads {m['threads']}, shared with other "
             f"jobs (load average {t['load_average_at_start'][0]:.1f} at the start): a short run, indicative only.",
             "", "| trained | dtype | trainable parameters | steps | tokens/s | peak memory above start (GiB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['trainable']} | {r['dtype']} | {r['trainable_parameters']:,} | {r['steps']} | "
              f"{r['tokens_per_second']} | {r['peak_memory_overhead_gib']} |" for r in t["rows"]]
    return "\n".join(lines) + "\n"


def save(name: str, key: str, value: dict, render) -> None:
    path = RESULTS / f"{name}.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[key] = value
    doc["machine"] = machine()
    path.write_text(json.dumps(doc, indent=1) + "\n")
    path.with_suffix(".md").write_text(render(doc))
    logger.info("wrote %s", path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=["slimllm", "iterative", "throughput"])
    p.add_argument("--method", default="slimllm")
    p.add_argument("--score")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of all parameters removed")
    p.add_argument("--target", choices=["param_ratio", "ratio"], default="param_ratio",
                   help="what --ratio is a fraction of: all parameters, or the method's prunable part (sparsity: "
                        "the decoder weights)")
    p.add_argument("--options", help="method options as YAML, e.g. \"{pattern: '2:4'}\"")
    p.add_argument("--steps", type=int, default=400, help="recovery steps (in all)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the core's, from the model width)")
    p.add_argument("--kd", type=float, default=1.0)
    p.add_argument("--lm", type=float, default=0.0)
    p.add_argument("--trainable", default="all")
    p.add_argument("--trainables", default="lora,all", help="throughput: what to train, comma separated")
    p.add_argument("--dtype", default="auto", help="throughput: float32 or bfloat16 training")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared 2-core machine)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    command = "python bench/recover_bench.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.case == "throughput":
        save("recover_1b_cpu", "throughput", dict(case_throughput(args), command=command), markdown_1b)
    else:
        value = case_slimllm(args) if args.case == "slimllm" else case_iterative(args)
        key = args.case + ("_lora" if args.case == "slimllm" and args.trainable == "lora" else "")
        key += f"_{args.method}" if args.case == "slimllm" and args.method != "slimllm" else ""
        key += f"_{args.method}" if args.case == "iterative" else ""
        save("recover_reference_cpu", key, dict(value, command=command), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
