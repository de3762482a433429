"""The model card (README.md with YAML metadata) written next to every pruned checkpoint."""
from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

logger = logging.getLogger(__name__)


def base_license(base_model: str, revision: str | None = None) -> str | None:
    """The license declared in the base model's card, if it can be read (local folder or Hub)."""
    try:
        local = Path(base_model) / "README.md"
        card = ModelCard.load(local if local.is_file() else base_model, ignore_metadata_errors=True)
        return card.data.to_dict().get("license")
    except Exception as err:  # no card, offline, gated: the card simply says 'other'
        logger.info("no license found for %s: %s", base_model, err)
        return None


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


def model_card(summary: dict, recipe_yaml: str, repo_name: str, load_snippet: str) -> ModelCard:
    """Build the card from the result summary (see PruneResult.summary) and the recipe text."""
    method = summary["method"]
    stages = summary.get("stages") or []
    base = summary["base_model"]
    # a local folder is not a valid Hub reference: the card names it in the text only
    hub_base = None if Path(base).exists() else base
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
    content = f"""---
{data.to_yaml()}
---

# {repo_name}

A {"structurally " if "sparsity" not in summary else ""}pruned version of `{base}`{f" (revision `{summary['base_revision']}`)" if summary.get('base_revision') else ""}:
{"stages **" + "**, then **".join(stages) + "**" if len(stages) > 1 else f"method **{method}**"}{f" (score `{summary['score']}`)" if summary.get('score') and len(stages) < 2 else ""}, {_fmt(before)} -> {_fmt(after)} parameters
({summary['params_removed_fraction']:.1%} removed). No fine-tuning was applied after pruning.

## Load it

```python
{load_snippet}
```

## What was removed

- Layers: {summary['num_layers'][0]} -> {summary['num_layers'][1]}
- Attention parameters: {_fmt(summary['attention_params'][0])} -> {_fmt(summary['attention_params'][1])}
- MLP parameters: {_fmt(summary['mlp_params'][0])} -> {_fmt(summary['mlp_params'][1])}
- Calibration data: {summary.get('calibration') or 'none (weights only)'}
- Checkpoint layout: {'uniform (plain transformers)' if summary['uniform'] else 'per-layer sizes in `per_layer_config`'}

| layer | query heads | KV heads | MLP width | removed sub-layers |
|---|---|---|---|---|
{rows}

## Recipe

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
