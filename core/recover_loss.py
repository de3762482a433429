"""Objectives of recovery training: logit distillation, LM cross-entropy and hidden-state MSE on aligned layers.

Shapes: logits [B, T, V]; ids [B, T]; hidden states: tuples of [B, T, d] as transformers returns them
(`hidden_states[0]` is the embedding output, `hidden_states[i + 1]` the output of decoder layer i; the last
entry is after the final norm)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over tokens (Hinton et al.; Minitron)."""
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the predicted tokens."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def hidden_loss(student: tuple, teacher: tuple, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Mean over aligned (student layer, teacher layer) pairs of ||h_s - h_t||^2 / ||h_t||^2 (relative MSE, so
    layers with large residual streams do not dominate)."""
    total = student[0].new_zeros((), dtype=torch.float32)
    for s, t in pairs:
        hs, ht = student[s + 1].float(), teacher[t + 1].float()
        total = total + (hs - ht).pow(2).sum() / ht.pow(2).sum().clamp_min(1e-12)
    return total / max(len(pairs), 1)


def layer_pairs(kept: list[int], n_teacher: int, student_layers: list[int] | None = None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: `kept[i]` is the teacher layer student layer i came from. transformers
    returns the last layer's output after the final norm, so a pair where only one side is a last layer is left out."""
    last = len(kept) - 1
    layers = range(len(kept)) if student_layers is None else student_layers
    return [(i, kept[i]) for i in layers if (i == last) == (kept[i] == n_teacher - 1)]


def proportional_origin(n_student: int, n_teacher: int) -> list[int]:
    """Teacher layer of each student layer when nothing records which blocks were removed: spread evenly, the
    last student layer aligned with the last teacher layer."""
    if n_student == n_teacher:
        return list(range(n_student))
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


@dataclass(frozen=True)
class Objective:
    kd: float
    lm: float
    hidden: float
    temperature: float
    pairs: tuple[tuple[int, int], ...] = ()

    @property
    def needs_teacher(self) -> bool:
        return self.kd > 0 or self.hidden > 0

    def __call__(self, ids: torch.Tensor, student_out, teacher_out) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted total and its parts (floats, for the loss curve)."""
        total = student_out.logits.new_zeros((), dtype=torch.float32)
        parts: dict[str, float] = {}
        if self.kd > 0:
            value = kd_loss(student_out.logits, teacher_out.logits, self.temperature)
            total, parts["kd"] = total + self.kd * value, value.item()
        if self.lm > 0 or not self.needs_teacher:
            value = lm_loss(student_out.logits, ids)
            total, parts["lm"] = total + self.lm * value, value.item()
        if self.hidden > 0:
            value = hidden_loss(student_out.hidden_states, teacher_out.hidden_states, list(self.pairs))
            total, parts["hidden"] = total + self.hidden * value, value.item()
        return total, parts
