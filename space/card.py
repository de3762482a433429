"""The model card of a Space run: the core's card, rebuilt for the final repo id, with the measured comparison
(`core.card.add_comparison`: `model-index` results and a before/after table) and the checkpoint sizes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import yaml
from huggingface_hub import ModelCard

from core.card import add_comparison, model_card
from core.export import RECIPE_FILE, load_snippet

from .evaluation import Evidence

SPACE_TAG = "pruning-space"


def record_base_name(folder: Path, name: str) -> None:
    """Name the base model in the saved recipe as the user chose it (the core saved it from a server folder,
    which is where it found the base model's license)."""
    path = folder / RECIPE_FILE
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    doc["result"]["base_model"] = name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")


def write_card(folder: Path, repo_id: str, evidence: Evidence, base_repo: str | None,
               base_label: str) -> ModelCard:
    """(Re)write `folder/README.md` for `repo_id`. `base_repo`: the base model's Hub id (None for local models)."""
    license = None
    if (folder / "README.md").is_file():  # the core's card already looked the base model's license up
        license = ModelCard.load(folder / "README.md", ignore_metadata_errors=True).data.license
    doc = yaml.safe_load((folder / RECIPE_FILE).read_text(encoding="utf-8"))
    summary = doc.pop("result")
    summary.update(method=doc["method"], score=doc.get("score"), license=license, base_model=base_repo or base_label)
    card = model_card(summary, yaml.safe_dump(doc, sort_keys=False), repo_id,
                      load_snippet(SimpleNamespace(uniform=summary["uniform"]), repo_id))
    card.data.base_model = base_repo  # a local folder is not a Hub reference
    card.data.base_model_relation = "finetune" if base_repo else None
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), SPACE_TAG]))
    add_comparison(card, evidence.comparison, repo_id, heading="Measured by the pruning Space")
    base, pruned = evidence.disk_bytes
    if base and pruned:
        card.text = (card.text.rstrip() + f"\n\nCheckpoint (safetensors): {base / 1e6:,.1f} MB -> "
                     f"{pruned / 1e6:,.1f} MB ({pruned / base - 1:+.1%}).\n")
    card.save(folder / "README.md")
    return card
