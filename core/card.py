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
    base = summary["base_model"]
    # a local folder is not a valid Hub reference: the card names it in the text only
    hub_base = None if Path(base).exists() else base
    data = ModelCardData(
        base_model=hub_base, base_model_relation="finetune" if hub_base else None, library_name="transformers",
        license=summary.get("license") or "other", tags=["pruned", method, "structured-pruning"],
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

A structurally pruned version of `{base}`{f" (revision `{summary['base_revision']}`)" if summary.get('base_revision') else ""}:
method **{method}**{f" (score `{summary['score']}`)" if summary.get('score') else ""}, {_fmt(before)} -> {_fmt(after)} parameters
({summary['params_removed_fraction']:.1%} removed). {_recovery_line(summary.get('recovery'))}

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
