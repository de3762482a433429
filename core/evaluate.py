"""Perplexity with one definition everywhere: token-level exp(mean NLL) over strided windows.

Windows of `max_length` tokens start every `stride` tokens; each token is scored once, by the first window that
contains it with context (the tokens a window shares with the previous one are context only). Windows of equal
length are batched. A streamed model (core.streaming) is evaluated layer by layer: every window of a length goes
through block i before block i + 1 is loaded, so the model is read once per window length, not once per batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .architectures import spec_for_config
from .errors import CalibrationError
from .pipeline import model_logits
from .streaming import drop_head


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    max_length: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position within the window) for strided evaluation of n_tokens."""
    out, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, max(prev_end - begin, 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, max_length: int = 256, stride: int | None = None,
                      batch_size: int = 8) -> Perplexity:
    """Perplexity of a 1-D token tensor."""
    stride = stride or max_length
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in (0, max_length]; got {stride} with max_length {max_length}")
    if ids.numel() < 2:
        raise CalibrationError("Perplexity needs at least two tokens of text.")
    stream = getattr(model, "core_stream", None)
    spec = spec_for_config(model.config) if stream is not None else None
    spans = windows(ids.numel(), max_length, stride)
    total_nll, total_tokens = 0.0, 0
    by_length: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        by_length.setdefault(span[1] - span[0], []).append(span)
    for group in by_length.values():
        rows = torch.stack([ids[b:e] for b, e, _ in group])
        for start, (batch, logits) in zip(range(0, len(group), batch_size),
                                          model_logits(model, spec, rows, batch_size)):
            chunk = group[start:start + batch_size]
            logits = logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, L-1]
            mask = torch.zeros_like(nll, dtype=torch.bool)
            for row, (_, _, first) in enumerate(chunk):
                mask[row, first - 1:] = True
            total_nll += nll[mask].sum().item()
            total_tokens += int(mask.sum().item())
    if stream is not None:  # the head and the last block leave memory
        stream.release()
        drop_head(model)
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, total_tokens, len(spans), max_length, stride)


def perplexity(model, tokenizer, text: str, max_length: int = 256, stride: int | None = None,
               batch_size: int = 8, max_tokens: int | None = None) -> Perplexity:
    """Perplexity of `text` (optionally only its first `max_tokens` tokens)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    if max_tokens:
        ids = ids[:max_tokens]
    return perplexity_of_ids(model, ids, max_length, stride, batch_size)


def perplexity_of_file(model, tokenizer, path: str | Path, **kwargs) -> Perplexity:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"Evaluation text {str(path)!r} does not exist.")
    return perplexity(model, tokenizer, path.read_text(encoding="utf-8"), **kwargs)
