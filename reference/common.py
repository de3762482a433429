"""Shared paths, constants and helpers of the reference-model scripts."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer

REFERENCE_DIR = Path(__file__).resolve().parent
CORPUS_DIR = REFERENCE_DIR / "corpus"
MODEL_DIR = REFERENCE_DIR / "model"
WORK_DIR = REFERENCE_DIR / "work"

#: The only special token: beginning/end of text and padding.
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096
SEQ_LEN = 256
MAX_POSITIONS = 512


def setup(threads: int, verbose: bool = False) -> None:
    """Configure logging (no progress bars); cap all thread pools (torch, rayon) at ``threads``."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)
    transformers.utils.logging.disable_progress_bar()


def encode_file(tokenizer_dir: Path, path: Path):
    """Token ids of the whole text file ``path`` as a 1-D int64 tensor (no special tokens)."""
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    ids = tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def unigram_log_probs(train_ids, vocab_size: int = VOCAB_SIZE):
    """Log-probabilities of a unigram model of ``train_ids`` with add-one smoothing."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    return (counts / counts.sum()).log()


def perplexities(model, ids, unigram_lp, seq_len: int = SEQ_LEN, batch_size: int = 16) -> dict:
    """Token-level perplexity of ``model`` and of the unigram model on ``ids``.

    The text is cut into non-overlapping windows of ``seq_len`` tokens (the last one may be
    shorter); within each window every token but the first is predicted. PPL = exp(mean NLL)
    over all predicted tokens; the unigram PPL is computed on exactly the same tokens.
    """
    windows = list(torch.split(ids, seq_len))
    if len(windows) > 1 and len(windows[-1]) < 2:
        windows.pop()
    nll = 0.0
    unigram_nll = 0.0
    count = 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            for length in sorted({len(w) for w in chunk}):
                batch = torch.stack([w for w in chunk if len(w) == length])
                logits = model(input_ids=batch).logits[:, :-1].float()
                targets = batch[:, 1:]
                nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                       reduction="sum").item()
                unigram_nll -= unigram_lp[targets].sum().item()
                count += targets.numel()
    model.train(was_training)
    return {
        "perplexity": math.exp(nll / count),
        "unigram_perplexity": math.exp(unigram_nll / count),
        "eval_tokens": count,
    }
