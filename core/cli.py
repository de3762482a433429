"""Command line: `python -m core prune|inspect|eval|methods`. Flags map onto the same Recipe the Space and bot use."""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import replace
from pathlib import Path

from . import checks, recover_cli
from .entry import configure_output, guarded
from .errors import EnvironmentFailure, RecipeError

logger = logging.getLogger("core")

EVAL_TEXT = Path(__file__).resolve().parent.parent / "reference" / "corpus" / "eval.txt"

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


def parse_count(text: str) -> int:
    """'800M', '1.2B', '250k' or a plain integer."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (use e.g. 800M, 1.2B or 123456)")
    return int(round(float(match.group(1)) * _SUFFIX.get(match.group(2).lower(), 1)))


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, e.g. 3,5 (got {text!r})") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 0,0.3,0.3 (got {text!r})") from None


def _option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as a YAML scalar or list (true, 8, 0.5, [1, 2], kv_group)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value  # the method's typed options say whether a plain string will do


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors raised as one-line errors (exit 2) that name the command's --help."""

    def error(self, message: str):
        raise RecipeError(f"{message} (see `{self.prog} --help`).")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    p.add_argument("--debug", action="store_true", help="full tracebacks and library warnings")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="Hub id or local folder (default: the shipped reference model)")
    p.add_argument("--revision", help="branch, tag or commit of a Hub model")
    p.add_argument("--dtype", help="auto (default), float32, bfloat16, float16")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... or auto (default: cuda when available)")
    p.add_argument("--device-map", help="e.g. 'auto' to spread a large model over devices / CPU (loads it whole)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--stream", action="store_true", default=None,
                   help="keep the weights on disk and load one decoder block at a time (prune: the default)")
    s.add_argument("--no-stream", dest="stream", action="store_false",
                   help="load the whole model in memory (eval: the default when it fits)")
    p.add_argument("--allow-pickle", action="store_true", default=None, help="accept *.bin pickle weights")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="run the repository's own modeling code (only for repositories you trust)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and write it to a folder")
    _add_load_args(p)
    p.add_argument("--recipe", help="YAML recipe; flags given here override its fields")
    p.add_argument("--method", help="mlp_width, attention_heads, depth (or an MLP score name, e.g. maw)")
    p.add_argument("--score", help="importance score of the method (see `python -m core methods`)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--ratio", type=float, help="fraction of the pruned component removed, in [0, 1)")
    t.add_argument("--param-ratio", type=float, help="fraction of all parameters removed, in [0, 1)")
    t.add_argument("--target-params", type=parse_count, help="parameter count after pruning, e.g. 800M")
    t.add_argument("--expansion-rate", type=float, help="MLP width = rate x hidden size")
    t.add_argument("--width", type=int, help="absolute MLP width")
    p.add_argument("--round-to", type=int, help="round MLP widths to a multiple (e.g. 64, 128, 256)")
    p.add_argument("--layer-ratios", type=_float_list, help="explicit per-layer ratios, comma separated")
    p.add_argument("--protect-first", type=int, help="leave the first N layers untouched")
    p.add_argument("--protect-last", type=int, help="leave the last N layers untouched")
    p.add_argument("--mode", help="head pruning: kv_group (default) or query")
    p.add_argument("--unit", help="depth pruning: block (default), attention or mlp")
    p.add_argument("--layers", type=_int_list, help="depth pruning: remove exactly these units, e.g. 3,5")
    p.add_argument("--pattern", help="sparsity: unstructured (default) or N:M, e.g. 2:4 (the ratio is then 1 - N/M)")
    p.add_argument("--then", action="append", metavar="'METHOD KEY=VALUE ...'",
                   help="a further stage after this one, e.g. --then 'sparsity score=sparsegpt pattern=2:4' "
                        "(keys: score, ratio, param_ratio, target_params, ... ; others are method options; repeatable)")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--dense", dest="sparse_format", action="store_const", const="dense",
                   help="sparsity: store the zeros in plain dense weights (default; loads anywhere)")
    f.add_argument("--compressed", dest="sparse_format", action="store_const", const="compressed",
                   help="sparsity: compressed-tensors bitmask layout (less disk; load with core.load_pruned)")
    p.add_argument("--option", action="append", type=_option, metavar="KEY=VALUE", default=None,
                   help="any method option, e.g. --option greedy=false --option alpha=8 (repeatable)")
    p.add_argument("--calib", help="calibration: builtin, a .txt/.jsonl file, or dataset:NAME[:CONFIG]")
    p.add_argument("--calib-samples", type=int, help="number of calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, help="tokens per window (default 128)")
    p.add_argument("--calib-seed", type=int, help="seed of the window sampling (default 42)")
    p.add_argument("--calib-split", help="dataset split (default train)")
    p.add_argument("--calib-text-field", help="text field of .jsonl / dataset records (default text)")
    p.add_argument("--batch-size", type=int, help="calibration batch size (default 8)")
    p.add_argument("--seed", type=int, help="seed of random scores")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB; a streamed "
                                                           "prune writes one shard per decoder block)")
    p.add_argument("--offload-hidden", action="store_true",
                   help="keep calibration hidden states in CPU memory between blocks (many tokens on a GPU)")
    recover_cli.add_prune_args(p)
    recover_cli.add_recover_parser(sub)

    i = sub.add_parser("inspect", help="architecture and parameter counts (no weights are loaded)")
    _add_load_args(i)
    i.add_argument("--sparsity", action="store_true", help="measure zeros per layer and bytes on disk against "
                   "dense (local folders; reads the weights one tensor at a time; automatic for compressed ones)")
    e = sub.add_parser("eval", help="perplexity and parameter counts of a model (or two, side by side)")
    _add_load_args(e)
    e.add_argument("--compare", help="a second model evaluated the same way, shown side by side")
    e.add_argument("--ppl", default=str(EVAL_TEXT), help="text file for perplexity (default: the held-out "
                                                         "reference text)")
    e.add_argument("--max-length", type=int, default=256, help="window length in tokens (default 256)")
    e.add_argument("--stride", type=int, help="window stride (default: max-length, i.e. no overlap)")
    e.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    e.add_argument("--tasks", help="lm-eval tasks, comma separated ('default' = the pruning literature's set; "
                                   "offline: pydoc_cloze)")
    e.add_argument("--task-dir", action="append", default=[], help="extra lm-eval task folder (repeatable)")
    e.add_argument("--limit", type=int, help="lm-eval: at most N examples per task")
    e.add_argument("--speed", action="store_true", help="prefill latency and decode time, with warm-up, repeats and "
                                                         "(with --compare) interleaved rounds")
    e.add_argument("--prompt-tokens", type=int, default=128, help="speed: prompt length (default 128)")
    e.add_argument("--new-tokens", type=int, default=32, help="speed: generated tokens (default 32)")
    e.add_argument("--batch-sizes", type=_int_list, default=[1], help="speed: decode batch sizes (default 1)")
    e.add_argument("--repeats", type=int, default=5, help="speed: timed rounds per model (default 5)")
    e.add_argument("--warmup", type=int, default=1, help="speed: untimed rounds first (default 1)")
    m = sub.add_parser("methods", help="list methods, what they remove, their scores and options")
    m.add_argument("--json", action="store_true")
    _add_common(m)
    return parser


_STAGE_TARGETS = ("ratio", "param_ratio", "target_params", "expansion_rate", "width")


def _stage(text: str) -> dict:
    """'METHOD key=value ...' -> a stage mapping; keys that are not stage fields become method options."""
    import shlex

    from .methods.sparsity import implied_target

    words = shlex.split(text)
    if not words or "=" in words[0]:
        raise RecipeError(f"--then needs a method first, e.g. --then 'sparsity score=wanda ratio=0.5' (got {text!r}).")
    stage: dict = {"method": words[0]}
    for word in words[1:]:
        try:
            key, value = _option(word)
        except argparse.ArgumentTypeError as err:
            raise RecipeError(f"--then {text!r}: {err}") from None
        if key == "pattern":  # YAML would read 2:4 as a base-60 number
            value = word.partition("=")[2].strip()
        if key in _STAGE_TARGETS:
            stage.setdefault("target", {})[key] = parse_count(str(value)) if key == "target_params" else value
        elif key in ("protect_first", "protect_last"):
            stage.setdefault("layers", {})[key] = value
        elif key in ("score", "round_to"):
            stage[key] = value
        else:
            stage.setdefault("options", {})[key] = value
    if "target" not in stage:
        stage["target"] = implied_target(stage.get("options", {}))
    if stage["target"] is None:
        raise RecipeError(f"--then {text!r} has no target: add e.g. ratio=0.5.")
    return stage


def _recipe_from_args(args: argparse.Namespace):
    from .methods.sparsity import implied_target
    from .recipe import Recipe, recipe_data

    data: dict = recipe_data(args.recipe) if args.recipe else {}

    def put(section: str | None, key: str, value) -> None:
        if value is None:
            return
        target = data.setdefault(section, {}) if section else data
        target[key] = value

    for key in ("model", "revision", "method", "score", "round_to", "batch_size", "seed"):
        put(None, key, getattr(args, key))
    targets = {k: getattr(args, k) for k in ("ratio", "param_ratio", "target_params", "expansion_rate", "width")
               if getattr(args, k) is not None}
    if targets:
        data["target"] = targets
    put("layers", "ratios", args.layer_ratios)
    put("layers", "protect_first", args.protect_first)
    put("layers", "protect_last", args.protect_last)
    for key in ("mode", "unit", "layers", "pattern"):
        put("options", key, getattr(args, key))
    for key, value in args.option or []:
        put("options", key, value)
    for flag, key in (("calib", "source"), ("calib_samples", "n_samples"), ("calib_seq_len", "seq_len"),
                      ("calib_seed", "seed"), ("calib_split", "split"), ("calib_text_field", "text_field")):
        put("calibration", key, getattr(args, flag))
    for key in ("dtype", "device", "device_map", "allow_pickle", "trust_remote_code"):
        put("load", key, getattr(args, key))
    recover_cli.apply_to_recipe_data(args, data)
    if "method" not in data:
        raise RecipeError("No method given: pass --method (see `python -m core methods`) or --recipe FILE.")
    if args.then:
        data["then"] = [*data.get("then", []), *(_stage(text) for text in args.then)]
    if "target" not in data and implied_target(data.get("options") or {}):
        data["target"] = implied_target(data["options"])
    if "target" not in data and args.layer_ratios:
        data["target"] = {"ratio": sum(args.layer_ratios) / len(args.layer_ratios)}  # informational only
    if "target" not in data:
        raise RecipeError("No target given: pass one of --ratio, --param-ratio, --target-params, "
                          "--expansion-rate, --width (or a recipe with target:).")
    return Recipe.from_dict(data)


def _emit(args, payload: dict, lines: list[str]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")


# -- checks before anything is loaded ---------------------------------------------------------------------------------

def _check_load_args(args: argparse.Namespace) -> None:
    checks.device(args.device)
    checks.dtype(args.dtype)
    checks.model_name(args.model)


def _check_prune_args(args: argparse.Namespace) -> None:
    _check_load_args(args)
    for flag, minimum in (("calib_samples", 1), ("calib_seq_len", 2), ("batch_size", 1), ("round_to", 1),
                          ("protect_first", 0), ("protect_last", 0)):
        checks.at_least(getattr(args, flag), minimum, "--" + flag.replace("_", "-"))
    args.max_shard_size = checks.shard_size(args.max_shard_size)


def _check_recipe(recipe) -> tuple[str, ...]:
    """Checks of the merged recipe (flags + file); returns the local inputs an --overwrite must not delete."""
    from .calibration import BUILTIN, DATASET_PREFIX
    from .model_io import resolve_model_name

    checks.device(recipe.load.device)
    checks.dtype(recipe.load.dtype)
    checks.model_name(recipe.model)
    inputs = [resolve_model_name(recipe.model)]
    source = recipe.calibration.source
    if source != BUILTIN and not source.startswith(DATASET_PREFIX):
        inputs.append(source)
    return tuple(p for p in inputs if Path(p).expanduser().exists())


def _check_eval_args(args: argparse.Namespace) -> None:
    _check_load_args(args)
    checks.model_name(args.compare)
    for flag, minimum in (("max_length", 2), ("stride", 1), ("batch_size", 1), ("max_tokens", 2), ("limit", 1),
                          ("prompt_tokens", 1), ("new_tokens", 1), ("repeats", 1), ("warmup", 0)):
        checks.at_least(getattr(args, flag), minimum, "--" + flag.replace("_", "-"))
    if args.stride is not None and args.stride > args.max_length:
        raise RecipeError(f"--stride {args.stride} is larger than --max-length {args.max_length}: windows would skip "
                          "text. Use a stride of at most the window length.")
    for b in args.batch_sizes:
        checks.at_least(b, 1, "--batch-sizes")
    if not args.no_ppl:
        checks.text_file(args.ppl, "Evaluation text (--ppl)")
    if args.no_ppl and not (args.tasks or args.speed):
        logger.info("--no-ppl without --tasks or --speed: only sizes are reported")


# -- commands ---------------------------------------------------------------------------------------------------------

def cmd_prune(args: argparse.Namespace) -> None:
    from .card import reload_note, stage_names
    from .export import check_output, check_sparse_format, save_pruned
    from .prune import normalize, run_recipe

    _check_prune_args(args)
    recipe = normalize(_recipe_from_args(args))  # method, score, options and target checked before loading
    sparse_format = args.sparse_format or "dense"
    check_sparse_format(recipe, sparse_format)
    protect = _check_recipe(recipe)
    check_output(args.out, args.overwrite, protect)  # fail before a long pruning run, not after it
    folder = recover_cli.checkpoint_dir(args.out)
    result = recover_cli.interruptible(lambda: run_recipe(
        recipe, bars=_bars(args), stream=args.stream, out_dir=args.out, offload_hidden=args.offload_hidden,
        **recover_cli.prune_kwargs(recipe, folder, args)), folder)
    out = save_pruned(result, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                      sparse_format=sparse_format)
    summary = result.summary()
    lines = [
        f"method      {' -> '.join(stage_names(result.recipe))}",
        f"parameters  {summary['params_before']:,} -> {summary['params_after']:,} "
        f"({summary['params_removed_fraction']:.1%} removed)",
        f"layers      {summary['num_layers'][0]} -> {summary['num_layers'][1]}",
        *([f"sparsity    {summary['sparsity']['sparsity']:.1%} of the decoder-block linear weights are zero "
           f"({sparse_format} weights)"] if "sparsity" in summary else []),
        f"layout      {reload_note(summary, sparse_format)}",
        f"time        {summary['prune_seconds']:.1f} s",
        f"written to  {out}",
    ] + recover_cli.finished(result, folder)
    _emit(args, {"out": str(out), "recipe": result.recipe.to_dict(), "result": summary}, lines)


def cmd_inspect(args: argparse.Namespace) -> None:
    from .architectures import spec_for_config
    from .layer_config import head_dim, layer_shapes
    from .memory import estimate_memory
    from .model_io import LoadOptions, build_empty, load_config, resolve_model_name
    from .params import count_parameters

    _check_load_args(args)
    name = resolve_model_name(args.model)
    opts = LoadOptions(revision=args.revision, trust_remote_code=bool(args.trust_remote_code))
    config = load_config(name, opts)
    spec = spec_for_config(config)
    counts = count_parameters(build_empty(config), spec)
    shapes = layer_shapes(config)
    info = {
        "model": name, "family": spec.family, "model_type": config.model_type,
        "hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers, "head_dim": head_dim(config),
        "vocab_size": config.vocab_size, "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "per_layer": bool(getattr(config, "is_heterogeneous", False)),
        "layers": [{"layer": i, **s.overrides(), **counts["layers"][i]} for i, s in enumerate(shapes)],
        "parameters": {k: v for k, v in counts.items() if k != "layers"},
        "memory": {d: estimate_memory(config, device=d).to_dict() for d in ("cpu", "cuda")},  # a data-driven prune
    }
    p = info["parameters"]
    s0 = shapes[0]
    lines = [
        f"model       {name}",
        f"family      {spec.family} ({config.model_type}){'  per-layer sizes' if info['per_layer'] else ''}",
        f"shape       {config.num_hidden_layers} layers, hidden {config.hidden_size}, heads {s0.num_attention_heads} "
        f"(KV {s0.num_key_value_heads}, dim {info['head_dim']}), MLP {s0.intermediate_size}, vocab {config.vocab_size}",
        f"parameters  total {p['total']:,} = embeddings {p['embeddings']:,} + lm_head {p['lm_head']:,} + "
        f"attention {p['attention']:,} + mlp {p['mlp']:,} + norms {p['total'] - p['embeddings'] - p['lm_head'] - p['attention'] - p['mlp']:,}",
        f"memory      a data-driven prune on CPU {estimate_memory(config).describe()}",
    ]
    from .sparse_format import folder_report, sparsity_config

    if Path(name).is_dir() and (args.sparsity or sparsity_config(config) is not None):
        sp = info["sparsity"] = folder_report(name, count_dense_zeros=True)
        lines += [f"sparsity    {sp['sparsity']:.2%} of the decoder-block linear weights are zero ({sp['format']})",
                  f"disk        {sp['disk_bytes'] / 1e6:.2f} MB of weights vs {sp['dense_bytes'] / 1e6:.2f} MB dense "
                  f"({sp['disk_vs_dense']:.1%}; bitmask/index {sp['index_bytes'] / 1e6:.2f} MB)"]
        lines += [f"  layer {l['layer']:>3}: {l['sparsity']:.1%} zero" for l in sp["layers"]]
    if info["per_layer"]:
        lines += [f"  layer {l['layer']:>3}: heads {l['num_attention_heads']}/{l['num_key_value_heads']} "
                  f"mlp {l['intermediate_size']} skip {','.join(l.get('skip', [])) or '-'}" for l in info["layers"]]
    _emit(args, info, lines)


def _evaluate(name: str | None, args: argparse.Namespace):
    """(JSON-able numbers, the loaded model) of one model: sizes, perplexity, lm-eval."""
    from .architectures import spec_for_config
    from .card import public_model_name
    from .evaluate import perplexity_of_file
    from .model_io import LoadOptions, load_model, resolve_model_name
    from .params import count_parameters
    from .memory import too_big_for_memory
    from .speed import folder_bytes, weight_bytes
    from .streaming import is_streamed

    path = resolve_model_name(name)
    opts = LoadOptions(revision=args.revision, dtype=args.dtype or "auto", device=args.device,
                       device_map=args.device_map, allow_pickle=bool(args.allow_pickle),
                       trust_remote_code=bool(args.trust_remote_code))
    too_big = too_big_for_memory(path, opts)
    model, tokenizer = load_model(path, replace(opts, stream=bool(args.stream or (args.stream is None and too_big))))
    result = {"model": name or public_model_name(path), "parameters": count_parameters(model, spec_for_config(
        model.config))["total"], "weight_bytes": weight_bytes(model), "disk_bytes": folder_bytes(path)}
    if not args.no_ppl:
        ppl = perplexity_of_file(model, tokenizer, args.ppl, max_length=args.max_length, stride=args.stride,
                                 batch_size=args.batch_size, max_tokens=args.max_tokens)
        result.update(perplexity=ppl.to_dict(), text=public_model_name(args.ppl))
    if args.tasks and is_streamed(model):
        raise EnvironmentFailure(f"lm-eval needs the model in memory: {too_big or 'it streams from disk'}. Use a "
                                 "machine with more memory, or evaluate perplexity only (it streams).")
    if args.tasks:
        from .harness import DEFAULT_TASKS, run_tasks

        tasks = list(DEFAULT_TASKS) if args.tasks == "default" else [t for t in args.tasks.split(",") if t]
        result["lm_eval"] = run_tasks(model, tokenizer, tasks, args.task_dir, args.limit, args.batch_size)
    return result, model


def _speed(models: list, args: argparse.Namespace) -> list[dict]:
    """Speed of one model, or of two in interleaved rounds (with a progress bar)."""
    from .compare import in_memory
    from .progress import Progress

    sizes = dict(prompt_len=args.prompt_tokens, new_tokens=args.new_tokens, batch_sizes=tuple(args.batch_sizes),
                 repeats=args.repeats, warmup=args.warmup)
    progress = Progress(bars=_bars(args), unit="round")
    try:
        with in_memory(*models):  # a streamed model that fits is loaded whole for timing
            return _timed(models, sizes, progress)
    finally:
        progress.close()


def _timed(models: list, sizes: dict, progress) -> list[dict]:
    from .speed import measure_pair, measure_speed

    if len(models) == 1:
        return [measure_speed(models[0], progress=progress.update, **sizes)]
    reference, candidate = measure_pair(models[1], models[0], progress=progress.update, **sizes)
    return [candidate, reference]


def _sparse_kernels(results: list[dict], models: list, args: argparse.Namespace) -> None:
    """Each model's 2:4 linears on torch's semi-structured sparse kernels against the same weights on dense ones,
    interleaved (GPU only; on CPU a note that sparsity gives no speed-up there)."""
    from .compare import in_memory
    from .semi_structured import sparse_kernel_speed
    from .speed import measure_speed

    def measure(m):
        return measure_speed(m, args.prompt_tokens, args.new_tokens, repeats=args.repeats, warmup=args.warmup)

    for result, model in zip(results, models):
        with in_memory(model):
            result["sparse_kernels"] = sparse_kernel_speed(model, measure)


def cmd_eval(args: argparse.Namespace) -> None:
    """Numbers of MODEL, and with --compare REF those of REF next to them and MODEL relative to REF."""
    from .speed import compare_timings, speed_ratios

    _check_eval_args(args)
    results, models = [], []
    for name in [args.model] + ([args.compare] if args.compare else []):
        result, model = _evaluate(name, args)
        results.append(result)
        if args.speed:
            models.append(model)  # kept: two models are timed in interleaved rounds
        del model
    from .compare import not_timeable

    why_not = not_timeable(*models) if args.speed else None
    if why_not:
        logger.warning("speed not measured: %s", why_not)
        for result in results:
            result["speed"], result["speed_not_measured"] = None, why_not
    elif args.speed:
        for result, speed in zip(results, _speed(models, args)):
            result["speed"] = speed
        _sparse_kernels(results, models, args)
    del models
    speeds = args.speed and not why_not
    rows = [("parameters", lambda r: f"{r['parameters']:,}"), ("weights MB", lambda r: f"{r['weight_bytes'] / 1e6:.1f}")]
    if not args.no_ppl:
        rows += [("perplexity", lambda r: f"{r['perplexity']['perplexity']:.3f}"),
                 ("ppl tokens", lambda r: f"{r['perplexity']['tokens']:,}")]
    for task, metrics in (results[0].get("lm_eval") or {}).get("tasks", {}).items():
        rows += [(f"{task} {m}"[:24], lambda r, t=task, m=m: f"{r['lm_eval']['tasks'][t][m]:.4f}")
                 for m in metrics if "stderr" not in m]
    if why_not:
        rows += [("speed", lambda r: "not measured (does not fit in memory)")]
    if speeds:
        from .compare import timing_text

        rows += [(("prefill ms" if key == "prefill" else f"decode ms b{key.removeprefix('decode_b')}"),
                  lambda r, k=key: timing_text(r["speed"]["timings"][k])) for key in results[0]["speed"]["timings"]]
    lines = [f"{'':<24}" + "".join(f"{r['model'][-40:]:>42}" for r in results)]
    lines += [f"{label:<24}" + "".join(f"{fmt(r):>42}" for r in results) for label, fmt in rows]
    payload: dict = {"results": results}
    if len(results) == 2:
        a, b = results  # MODEL, REF
        ratios = {"parameters": a["parameters"] / b["parameters"], "weight_bytes": a["weight_bytes"] / b["weight_bytes"]}
        if not args.no_ppl:
            ratios["perplexity"] = a["perplexity"]["perplexity"] / b["perplexity"]["perplexity"]
        parts = [f"{k.replace('_', ' ')} x{v:.3f}" for k, v in ratios.items()]
        if speeds:
            payload["speed"] = compare_timings(b["speed"], a["speed"])
            ratios.update(speed_ratios(b["speed"], a["speed"], measurable_only=True))
            parts += [f"{entry['label']}: {entry['text']}" for entry in payload["speed"]["metrics"].values()]
        payload["ratios"] = ratios
        lines.append(f"{a['model']} relative to {b['model']}:")
        lines += [f"  {part}" for part in parts]
    for r in results if speeds else []:
        sk = r["sparse_kernels"]
        lines.append(f"2:4 kernels ({r['model'][-30:]}): " + (
            f"{sk['converted']}/{sk['linears']} linears, speed-up " + ", ".join(
                f"{k} {v:.3f}" for k, v in sk["speedup_median"].items()) if sk["converted"] else sk["note"]))
    _emit(args, payload, lines)


def cmd_methods(args: argparse.Namespace) -> None:
    from .methods import METHODS
    from .options import describe_options

    payload = {}
    lines = []
    for name, method in METHODS.items():
        scores = {s: method.scores.get(s).doc for s in method.scores} if method.scores else {}
        described = describe_options(method.Options)
        payload[name] = {"removes": method.describe(), "default_score": method.default_score, "scores": scores,
                         "options": {k: v["default"] for k, v in described.items()}, "option_types": described}
        lines.append(f"{name}: {method.describe()}")
        if scores:
            lines.append(f"  scores (--score, default {method.default_score}):")
            lines += [f"    {s:<22} {doc}" for s, doc in scores.items()]
        if described:
            lines.append("  options (--option KEY=VALUE):")
        for key, d in described.items():
            allowed = f"one of {', '.join(map(str, d['choices']))}" if d["choices"] else d["type"] + (
                f" {d['range']}" if d["range"] else "")
            default = "null" if d["default"] is None else json.dumps(d["default"])
            lines.append(f"    {key:<22} {allowed}; default {default}" + (f". {d['help']}" if d["help"] else ""))
        lines.append("")
    _emit(args, payload, lines[:-1])


COMMANDS = {"prune": cmd_prune, "inspect": cmd_inspect, "eval": cmd_eval, "methods": cmd_methods,
            "recover": recover_cli.cmd_recover}


# -- entry point -----------------------------------------------------------------------------------------------------

def _bars(args: argparse.Namespace) -> bool:
    return not (args.quiet or getattr(args, "json", False))


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends as one `error:` line on stderr (tracebacks with --debug).

    Exit status: 0 done, 2 bad input, 1 environment failure or bug, 130 / 143 interrupted by SIGINT / SIGTERM.
    """
    argv = list(sys.argv[1:] if argv is None else argv)

    def run() -> None:
        args = build_parser().parse_args(argv)
        configure_output(quiet=args.quiet or getattr(args, "json", False), debug=args.debug, bars=_bars(args))
        COMMANDS[args.command](args)

    return guarded(run, debug="--debug" in argv)
