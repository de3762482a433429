"""Recovery-training data: the token stream of a calibration source, split into a training part and a disjoint
held-out part (the last `holdout` fraction of the stream) for evaluation and early stopping.

Training batches are random windows of the training part, drawn from a generator seeded by (seed, step): a run
resumed at step s sees exactly the batches an uninterrupted run would have seen."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .calibration import CalibrationConfig, iter_texts
from .errors import CalibrationError

logger = logging.getLogger(__name__)


@dataclass
class TokenSplit:
    """train: [N_train] token ids; heldout: [N_heldout] token ids (a later, disjoint part of the stream)."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str

    def describe(self) -> str:
        return f"{self.source}: {self.train.numel():,} training + {self.heldout.numel():,} held-out tokens"


def token_stream(tokenizer, cfg: CalibrationConfig, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` tokens of the source, documents joined by EOS. Returns [N] int64."""
    if tokenizer is None:
        raise CalibrationError("Recovery training needs the model's tokenizer to encode its data; the checkpoint "
                               "has none. Save the tokenizer next to the model.")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in iter_texts(cfg):
        if text.strip():
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def load_split(tokenizer, cfg: CalibrationConfig, max_tokens: int, holdout: float, seq_len: int) -> TokenSplit:
    stream = token_stream(tokenizer, cfg, max_tokens)
    n_held = int(stream.numel() * holdout)
    n_train = stream.numel() - n_held
    if n_train < seq_len or n_held < seq_len:
        raise CalibrationError(
            f"The recovery data has {stream.numel():,} tokens: too few for a {holdout:.0%} held-out split with "
            f"windows of {seq_len} tokens (each part needs at least one window). Give more text (recover.data) or "
            "a shorter recover.seq_len.")
    where = "shipped calibration text" if cfg.source == "builtin" else cfg.source
    return TokenSplit(stream[:n_train], stream[n_train:], where)


def train_batch(split: TokenSplit, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """[batch_size, seq_len] random windows of the training part for optimizer step `step`."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, split.train.numel() - seq_len + 1, (batch_size,), generator=gen)
    return torch.stack([split.train[s:s + seq_len] for s in starts.tolist()])


def heldout_batches(split: TokenSplit, seq_len: int, batch_size: int, max_tokens: int) -> list[torch.Tensor]:
    """Non-overlapping windows of the held-out part (at most `max_tokens` tokens), in batches of [b, seq_len]."""
    n = min(split.heldout.numel(), max(max_tokens, seq_len)) // seq_len
    windows = split.heldout[:n * seq_len].view(n, seq_len)
    return list(windows.split(batch_size))
