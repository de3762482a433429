"""The model card (README.md with YAML metadata) written next to every pruned checkpoint."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

logger = logging.getLogger(__name__)


TOOL_ROOT = Path(__file__).resolve().parent.parent


def public_model_name(name: str | None) -> str | None:
    """How cards and recipes name a model: a Hub id as given; a local folder as a relative './path' (relative to
    the current folder or to the tool's folder), never an absolute path of this machine (a folder elsewhere is
    named by its last component)."""
    if not name or not is_local_name(name):
        return name
    path = Path(name).expanduser()
    if not path.is_absolute():
        return "./" + Path(os.path.normpath(path)).as_posix().removeprefix("./")
    path = path.resolve()
    for root in (Path.cwd().resolve(), TOOL_ROOT):
        if root == path or root in path.parents:
            return "./" + path.relative_to(root).as_posix() if path != root else "."
    return "./" + path.name


def is_local_name(name: str) -> bool:
    """A local folder (or a path-like name), not a Hub id."""
    return name.startswith((".", "/", "~")) or "\\" in name or Path(name).expanduser().exists()


def base_license(base_model: str, revision: str | None = None) -> str | None:
    """The license declared in the base model's card, if it can be read (local folder or Hub)."""
    try:
        local = Path(base_model).expanduser() / "README.md"
        if is_local_name(base_model) and not local.is_file():
            return None
        card = ModelCard.load(local if local.is_file() else base_model, ignore_metadata_errors=True)
        return card.data.to_dict().get("license")
    except Exception as err:  # no card, offline, gated: the card simply says 'other'
        logger.debug("no license found for %s: %s", base_model, err)
        return None


SUBLAYER_WARNING = ("Some layers have their attention or MLP removed. Plain `AutoModelForCausalLM.from_pretrained` "
                    "does not know that: it builds every sub-layer and silently fills the removed ones with random "
                    "weights (its load report lists them as missing). Load this model with `core.load_pruned`.")


COMPRESSED_WARNING = ("The sparse linears are stored in compressed-tensors' bitmask layout, which transformers 5 no "
                      "longer decompresses: without compressed-tensors plain `AutoModelForCausalLM.from_pretrained` "
                      "refuses this checkpoint, and with compressed-tensors >= 0.15 it silently fills every sparse "
                      "linear with random weights (its load report lists them as missing). Load it with "
                      "`core.load_pruned`.")


def reload_note(summary: dict, sparse_format: str = "dense") -> str:
    """One line on how the checkpoint reloads (for the CLI output and the card), from `PruneResult.summary()` and
    the format its sparse weights were written in."""
    layers = summary["layers"]
    if sparse_format == "compressed":
        return ("compressed sparse weights: load with core.load_pruned (plain transformers 5 cannot decompress "
                "them; with compressed-tensors installed it would fill them with random weights)")
    if summary["uniform"]:
        return "uniform: loads with AutoModelForCausalLM.from_pretrained"
    if any(layer.get("skip") for layer in layers):
        return ("per-layer, with removed sub-layers: load with core.load_pruned (plain from_pretrained would "
                "silently re-create them with random weights)")
    sizes = {(l["num_attention_heads"], l["num_key_value_heads"], l["intermediate_size"]) for l in layers}
    if len(sizes) == 1:
        heads = layers[0]["num_attention_heads"]
        return (f"per-layer: every layer is the same size, but the {summary.get('family', 'model')} config check "
                f"of transformers refuses {heads} attention heads for this hidden size as global values, so plain "
                "from_pretrained cannot load it; load with core.load_pruned")
    return "per-layer sizes: load with core.load_pruned (plain transformers does not build per-layer sizes yet)"


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def stage_names(recipe) -> list[str]:
    """'method (score[, pattern])' for every stage of a recipe."""
    names = []
    for stage in recipe.stages():
        detail = [x for x in (stage.score, stage.options.get("pattern")) if x]
        names.append(f"{stage.method} ({', '.join(map(str, detail))})" if detail else stage.method)
    return names


def sparsity_section(sparsity: dict, recipe, disk: dict | None, sparse_format: str) -> str:
    """Card section: measured zeros per layer, the format and bytes on disk against dense (when `disk` is known: a
    card written before its weights has none), and what it buys."""
    patterns = {str(s.options.get("pattern", "unstructured")) for s in recipe.stages() if s.method == "sparsity"}
    rows = "\n".join(f"| {l['layer']} | {l['sparsity']:.1%} | " + ", ".join(
        f"{k.rpartition('.')[2]} {v:.0%}" for k, v in l["linears"].items()) + " |" for l in sparsity["layers"])
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    if sparse_format == "compressed":
        stored = (f"compressed-tensors `{disk.get('format', 'bitmask')}` layout: {mb(disk['disk_bytes'])} of weights "
                  f"on disk against {mb(disk['dense_bytes'])} dense ({disk['disk_vs_dense']:.1%}, of which "
                  f"{mb(disk['index_bytes'])} bitmask/index overhead). Load it with `core.load_pruned`: "
                  "transformers 5 (compressed-tensors >= 0.15) no longer decompresses this format.")
    else:
        size = f" ({mb(disk['disk_bytes'])} of weights)" if disk else ""
        stored = (f"dense safetensors with the zeros stored{size}: loads anywhere, "
                  "but saves no disk or memory by itself (`python -m core prune ... --compressed` writes the "
                  "compressed-tensors bitmask format).")
    return f"""## Sparsity

- Pattern: {', '.join(sorted(patterns))}; measured: {sparsity['sparsity']:.2%} of the decoder-block linear weights are
  zero ({sparsity['zeros']:,} of {sparsity['linear_weights']:,}); non-zero parameters: {sparsity['nonzero_parameters']:,}.
- Stored as {stored}
- Speed: zeros alone make nothing faster. 2:4 runs on the sparse tensor cores of Ampere and newer GPUs through
  `torch.sparse.to_sparse_semi_structured` (`python -m core eval MODEL --speed` converts eligible linears on a GPU);
  on CPU, unstructured and 2:4 sparsity give no speed-up.

| layer | zeros | per linear |
|---|---|---|
{rows}
"""


def _recovery_line(rec: dict | None) -> str:
    if not rec or not rec.get("steps"):
        return "No fine-tuning was applied after pruning."
    ppl = rec.get("heldout_perplexity")
    change = f" (held-out perplexity {ppl[0]:.2f} -> {ppl[1]:.2f})" if ppl else ""
    return (f"Recovered by training after pruning: {rec['objective']}, {rec['steps']:,} steps, "
            f"{rec['tokens']:,} tokens{change}.")


def _recovery_section(rec: dict | None) -> str:
    """Objective, budget, data and the held-out loss curve of recovery training (empty without one)."""
    if not rec or not rec.get("steps"):
        return ""
    curve = rec.get("loss_curve", [])
    by_round = any("round" in h for h in curve)
    rows = "\n".join((f"| {h.get('round')} " if by_round else "") +
                     f"| {h['step']} | {h['tokens']:,} | "
                     f"{'-' if h['train_loss'] is None else format(h['train_loss'], '.4f')} | {h['heldout_loss']:.4f} | "
                     f"{h['heldout_perplexity']:.3f} |" for h in curve)
    head = ("| round " if by_round else "") + "| step | tokens | training loss | held-out loss | held-out perplexity |"
    rule = ("|---" if by_round else "") + "|---|---|---|---|---|"
    rounds = f"- Rounds: {rec['rounds']} prune -> recover rounds ({rec['schedule']} schedule)\n" if rec.get("rounds") else ""
    return f"""## Recovery training

- Objective: {rec['objective']}
- Trained: {rec['trainable']}
- Budget: {rec['steps']:,} steps of {rec['batch'][0]} x {rec['batch'][1]} tokens ({rec['tokens']:,} tokens), \
learning rate {rec['lr']:g}, {rec['seconds']:.0f} s on {rec['device']} ({rec['dtype']})
- Data: {rec['data']} (held-out part for evaluation and early stopping; the best held-out state is kept)
{rounds}
{head}
{rule}
{rows}

"""


def model_card(summary: dict, recipe_yaml: str, repo_name: str, load_snippet: str) -> ModelCard:
    """Build the card from the result summary (see PruneResult.summary) and the recipe text."""
    method = summary["method"]
    stages = summary.get("stages") or []
    base = summary["base_model"]
    # a local folder is not a valid Hub reference: the card names it in the text only
    hub_base = None if is_local_name(base) else base
    data = ModelCardData(
        base_model=hub_base, base_model_relation="finetune" if hub_base else None, library_name="transformers",
        license=summary.get("license") or "other", tags=["pruned", *sorted({s.split(" ")[0] for s in stages} | {method}),
              "sparse" if "sparsity" in summary else "structured-pruning"],
        pipeline_tag="text-generation",
    )
    layers = summary["layers"]
    rows = "\n".join(
        f"| {l['layer']} | {l['num_attention_heads']} | {l['num_key_value_heads']} | {l['intermediate_size']} | "
        f"{', '.join(l.get('skip', [])) or '-'} |" for l in layers)
    before, after = summary["params_before"], summary["params_after"]
    sparse_format = summary.get("sparse_format", "dense")
    layout = ("compressed sparse weights" if sparse_format == "compressed" else
              "uniform (plain transformers)" if summary["uniform"] else "per-layer sizes in `per_layer_config`")
    warnings = [w for w, on in ((SUBLAYER_WARNING, any(l.get("skip") for l in layers)),
                                (COMPRESSED_WARNING, sparse_format == "compressed")) if on]
    warning = "".join(f"\n> **Warning:** {w}\n" for w in warnings)
    content = f"""---
{data.to_yaml()}
---

# {repo_name}

A {"structurally " if "sparsity" not in summary else ""}pruned version of `{base}`{f" (revision `{summary['base_revision']}`)" if summary.get('base_revision') else ""}:
{"stages **" + "**, then **".join(stages) + "**" if len(stages) > 1 else f"method **{method}**"}{f" (score `{summary['score']}`)" if summary.get('score') and len(stages) < 2 else ""}, {_fmt(before)} -> {_fmt(after)} parameters
({summary['params_removed_fraction']:.1%} removed). {_recovery_line(summary.get('recovery'))}

## Load it

```python
{load_snippet}
```
{warning}
## What was removed

- Layers: {summary['num_layers'][0]} -> {summary['num_layers'][1]}
- Attention parameters: {_fmt(summary['attention_params'][0])} -> {_fmt(summary['attention_params'][1])}
- MLP parameters: {_fmt(summary['mlp_params'][0])} -> {_fmt(summary['mlp_params'][1])}
- Calibration data: {summary.get('calibration') or 'none (weights only)'}
- Checkpoint layout: {layout}: {reload_note(summary, sparse_format)}

| layer | query heads | KV heads | MLP width | removed sub-layers |
|---|---|---|---|---|
{rows}

{_recovery_section(summary.get('recovery'))}## Recipe

Reproduce with `python -m core prune --recipe pruning_recipe.yaml` (the file is in this repository).

```yaml
{recipe_yaml.strip()}
```

Produced by the structured-pruning tool `core` version {summary['tool_version']}.
"""
    return ModelCard(content)


def add_comparison(card: ModelCard, comparison, model_name: str, heading: str = "Measured results") -> ModelCard:
    """Add measured results to a card: `model-index` entries in the metadata and a before/after table."""
    card.data.model_name = model_name
    card.data.eval_results = comparison.eval_results() or None
    card.text = card.text.rstrip() + "\n\n" + comparison.markdown(heading)
    return card
