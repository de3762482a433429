"""The resumable state of a recovery run: trainable tensors, optimizer, counters, loss curve and the best state
seen on the held-out data. Written atomically (temp file + rename) so an interrupt never leaves a torn checkpoint;
loaded with `weights_only=True` (no pickle code)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import RecipeError

logger = logging.getLogger(__name__)

STATE_FILE = "recover_state.pt"
# fields that may change between an interrupted run and its resumption (the budget, not the run itself)
BUDGET_FIELDS = {"steps", "max_seconds", "patience", "eval_every", "checkpoint_every"}


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_loss: float = math.inf
    best_step: int = -1
    bad_evals: int = 0
    stopped: str = ""  # why a finished run ended (a resumed finished run does not train again)
    history: list[dict] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable tensors, by name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))


def fingerprint(cfg, model: nn.Module) -> str:
    """What must match for a checkpoint to continue this run: the settings (budget aside) and the trainable
    tensors' names and shapes."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in BUDGET_FIELDS}
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    text = json.dumps([settings, shapes], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(folder: Path, run_id: str, state: TrainState, model: nn.Module, optimizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": run_id, "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
               **{k: v for k, v in asdict(state).items() if k != "best"}, "best": state.best}
    tmp = folder / f"{STATE_FILE}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, folder / STATE_FILE)
    logger.info("recovery checkpoint at step %d written to %s", state.step, folder)


def load(folder: Path, run_id: str, model: nn.Module, optimizer) -> TrainState | None:
    """Restore model, optimizer and counters from `folder`; None when it holds no checkpoint."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("fingerprint") != run_id:
        raise RecipeError(f"The recovery checkpoint in {folder} belongs to a different run (other settings or "
                          "model shape). Delete that folder to start afresh, or resume with the settings it was "
                          "written with.")
    load_trainable(model, payload["trainable"])
    optimizer.load_state_dict(payload["optimizer"])
    names = {f for f in TrainState.__dataclass_fields__}
    state = TrainState(**{k: v for k, v in payload.items() if k in names})
    logger.info("resumed recovery from %s at step %d", folder, state.step)
    return state
