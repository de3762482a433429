"""Sparsity masks that stay fixed while recovery training changes the weights.

A mask comes from the exact zeros of a weight (what any unstructured or N:M method leaves behind), or from a mask a
sparsity method recorded ({parameter name: bool tensor, True = kept}). Training zeroes the gradient of masked
entries before each optimizer step and re-zeroes the entries after it, so exact zeros stay exactly zero whatever
the optimizer does (momentum, weight decay) and whatever is merged into the weight (LoRA).

Weights with few zeros (a dense weight with a stray exact zero) store the zero positions as indices instead of a
full boolean mask, so a dense model costs almost nothing."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PruningError

INDEX_BELOW = 1 / 64  # zero fraction below which positions are stored as indices (8 bytes each) instead of a mask


@dataclass
class _Mask:
    param: nn.Parameter
    keep: torch.Tensor | None = None  # bool, same shape as the parameter
    zeros: torch.Tensor | None = None  # int64 flat positions of the masked entries

    def apply_(self, t: torch.Tensor) -> None:
        if self.keep is not None:
            t.mul_(self.keep.to(t.device))
        else:
            t.view(-1).index_fill_(0, self.zeros.to(t.device), 0)

    @property
    def masked(self) -> int:
        return int(self.zeros.numel()) if self.zeros is not None else int((~self.keep).sum())


class MaskSet:
    """The fixed masks of a model's weights (matrices only: norms and biases are never sparse)."""

    def __init__(self, masks: dict[str, _Mask]) -> None:
        self.masks = masks

    @classmethod
    def from_model(cls, model: nn.Module, recorded: dict[str, torch.Tensor] | None = None) -> "MaskSet":
        params = dict(model.named_parameters())
        masks: dict[str, _Mask] = {}
        for name, keep in (recorded or {}).items():
            if name not in params or params[name].shape != keep.shape:
                raise PruningError(f"The recorded sparsity mask {name!r} does not match any weight of the model "
                                   "(name or shape differs); record masks with the model's parameter names.")
            masks[name] = _Mask(params[name], keep=keep.to(torch.bool))
        for name, p in params.items():
            if name in masks or p.dim() < 2:
                continue
            with torch.no_grad():
                zero = p == 0
                count = int(zero.sum())
            if count == 0:
                continue
            if count < INDEX_BELOW * p.numel():
                masks[name] = _Mask(p, zeros=zero.view(-1).nonzero().squeeze(1).cpu())
            else:
                masks[name] = _Mask(p, keep=~zero)
        return cls(masks)

    def __bool__(self) -> bool:
        return bool(self.masks)

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the masked entries of every weight (after an optimizer step or a LoRA merge)."""
        for mask in self.masks.values():
            mask.apply_(mask.param.data)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        for mask in self.masks.values():
            if mask.param.grad is not None:
                mask.apply_(mask.param.grad)

    def describe(self) -> dict:
        masked = sum(m.masked for m in self.masks.values())
        total = sum(m.param.numel() for m in self.masks.values())
        return {"weights": len(self.masks), "masked_entries": masked,
                "masked_fraction_of_those_weights": round(masked / total, 6) if total else 0.0}
