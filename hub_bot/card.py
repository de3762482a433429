"""What the bot writes next to a variant: the model card (the core's card and measured results, plus the
speed ratios in `model-index` and the source commit) and pruning_recipe.yaml (the recipe pinned to the source
commit, plus a `result.source` section the publisher reads to stay idempotent)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard

from core.card import add_comparison, model_card
from core.compare import Comparison
from core.export import load_snippet, recipe_document
from core.prune import PruneResult

from .evaluation import summary as evaluation_summary

BOT_TAG = "pruning-bot"


@dataclass(frozen=True)
class Source:
    repo: str
    sha: str
    url: str  # web URL of the source commit
    content: str  # hash of the model files at that commit (see worker.content_key)
    recipe_hash: str
    recipe_name: str


def published_view(result: PruneResult, source: Source) -> PruneResult:
    """The result as the Hub sees it: base model = the source repo at its commit (not the local download)."""
    return dataclasses.replace(result, base_model=source.repo, base_revision=source.sha,
                               recipe=result.recipe.replace(model=source.repo, revision=source.sha))


def recipe_file(result: PruneResult, source: Source, comparison: Comparison) -> str:
    """pruning_recipe.yaml: `python -m core prune --recipe` reproduces it; `result.source` identifies it."""
    doc = recipe_document(published_view(result, source))
    doc["result"]["source"] = {"repo": source.repo, "sha": source.sha, "content": source.content,
                               "recipe_hash": source.recipe_hash, "recipe_name": source.recipe_name}
    doc["result"]["evaluation"] = evaluation_summary(comparison)
    return yaml.safe_dump(doc, sort_keys=False)


def _speed_results(comparison: Comparison) -> list[EvalResult]:
    speed = comparison.pruned.speed
    if not speed:
        return []
    where = f"{speed.get('device', 'cpu')}, {speed.get('dtype', '?')}"
    return [EvalResult(task_type="text-generation", task_name="Speed vs. base model", dataset_type="random-tokens",
                       dataset_name=f"{speed['prompt_tokens']}-token prompts", metric_type=name,
                       metric_name=f"{name} ({where})", metric_value=round(value, 4), verified=False)
            for name, value in comparison.ratios.items() if "speedup" in name]


def source_terms(folder: Path) -> dict:
    """What a variant inherits from its source's card: the license (with license_name / license_link for 'other')
    and the gating form (every `extra_gated_*` field), so that a gated variant asks what its source asks."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        meta = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # an unreadable card: the variant says 'other'
        return {}
    terms = {k: meta[k] for k in ("license", "license_name", "license_link") if isinstance(meta.get(k), str)}
    return terms | {k: v for k, v in meta.items() if k.startswith("extra_gated_") and v is not None}


def variant_card(result: PruneResult, source: Source, repo_name: str, comparison: Comparison, terms: dict,
                 snippet: str | None = None) -> str:
    """README.md of a variant: YAML metadata (base_model, base_model_relation, tags, inherited license and gating
    form, model-index) and the core's description and measured results, followed by the source commit."""
    view = published_view(result, source)
    summary = dict(view.summary(), method=view.recipe.method, score=view.recipe.score, license=terms.get("license"))
    card = model_card(summary, yaml.safe_dump(view.recipe.to_dict(), sort_keys=False), repo_name,
                      snippet or load_snippet(view, repo_name))
    add_comparison(card, comparison, repo_name)
    data = card.data
    data.base_model = source.repo
    data.base_model_relation = "finetune"
    if terms.get("license") == "other":
        data.license_name, data.license_link = terms.get("license_name"), terms.get("license_link")
    for key, value in terms.items():
        if key.startswith("extra_gated_"):
            setattr(data, key, value)
    data.tags = list(dict.fromkeys([*(data.tags or []), BOT_TAG]))
    data.eval_results = (data.eval_results or []) + _speed_results(comparison) or None
    card.text = card.text.rstrip() + f"""

## Source

Pruned from [`{source.repo}`]({source.url}) at commit `{source.sha}` by the pruning bot (recipe
`{source.recipe_name}`, hash `{source.recipe_hash}`). A new commit on the source produces a new version here.
"""
    return card.content
