"""Calibration data: `n` windows of `T` tokens, seeded, from the shipped text, a local .txt/.jsonl file or a
`datasets` dataset. Windows are drawn from the concatenated token stream (documents joined by EOS)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import CalibrationError

logger = logging.getLogger(__name__)

BUILTIN_TEXT = Path(__file__).resolve().parent.parent / "reference" / "corpus" / "calibration.txt"
BUILTIN = "builtin"
DATASET_PREFIX = "dataset:"


@dataclass(frozen=True)
class CalibrationConfig:
    """Where calibration text comes from and how much of it.

    source: 'builtin' (the shipped text), a path to a .txt or .jsonl file, or 'dataset:NAME[:CONFIG]'.
    """

    source: str = BUILTIN
    n_samples: int = 32
    seq_len: int = 128
    seed: int = 42
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> str:
        where = "shipped calibration text (reference/corpus/calibration.txt)" if self.source == BUILTIN else self.source
        return f"{where}, {self.n_samples} x {self.seq_len} tokens, seed {self.seed}"


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CalibrationError(f"{path}:{lineno} is not valid JSON ({err.msg}); each line of a .jsonl "
                                       f"calibration file must be an object with a {field!r} field.") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise CalibrationError(f"{path}:{lineno} has no string field {field!r}; set the text field name "
                                       "(--calib-text-field) to the one your file uses.")
            yield record[field]


def _dataset_texts(cfg: CalibrationConfig) -> Iterator[str]:
    name, _, subset = cfg.source[len(DATASET_PREFIX):].partition(":")
    try:
        import datasets
    except ImportError as err:
        raise CalibrationError("Calibration from a dataset needs the `datasets` package (pip install datasets).") from err
    try:
        ds = datasets.load_dataset(name, subset or None, split=cfg.split, streaming=True)
    except Exception as err:  # datasets raises many types for missing/offline data
        raise CalibrationError(f"Could not load dataset {name!r} (split {cfg.split!r}): {err}. Offline, use a "
                               "local .txt/.jsonl file or the builtin text instead.") from err
    for record in ds:
        text = record.get(cfg.text_field)
        if not isinstance(text, str):
            raise CalibrationError(f"Dataset {name!r} has no string field {cfg.text_field!r}; set the text field.")
        yield text


def iter_texts(cfg: CalibrationConfig) -> Iterator[str]:
    """The documents of the calibration source, in order."""
    if cfg.source.startswith(DATASET_PREFIX):
        yield from _dataset_texts(cfg)
        return
    path = BUILTIN_TEXT if cfg.source == BUILTIN else Path(cfg.source)
    if not path.is_file():
        raise CalibrationError(f"Calibration file {str(path)!r} does not exist. Give a .txt or .jsonl file, "
                               f"'{BUILTIN}', or 'dataset:NAME'.")
    if path.suffix == ".jsonl":
        yield from _jsonl_texts(path, cfg.text_field)
    elif path.suffix in (".txt", ".md", ""):
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CalibrationError(f"{path} is not UTF-8 text.") from None
    else:
        raise CalibrationError(f"Unsupported calibration file type {path.suffix!r}; use .txt or .jsonl.")


def load_calibration(tokenizer, cfg: CalibrationConfig) -> torch.Tensor:
    """Token windows for calibration. Returns a LongTensor of shape [n_samples, seq_len]."""
    if tokenizer is None:
        raise CalibrationError("This score needs calibration data, but the model has no tokenizer to encode it.")
    if cfg.n_samples < 1 or cfg.seq_len < 2:
        raise CalibrationError("Calibration needs n_samples >= 1 and seq_len >= 2.")
    wanted = cfg.n_samples * cfg.seq_len * 4  # enough distinct text for well-spread windows
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in iter_texts(cfg):
        if not text.strip():
            continue
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= wanted:
            break
    if len(ids) < cfg.seq_len:
        raise CalibrationError(f"Calibration text has {len(ids)} tokens, fewer than one window of {cfg.seq_len}. "
                               "Give more text or a shorter --calib-seq-len (recipe: calibration.seq_len).")
    if len(ids) < cfg.n_samples * cfg.seq_len:
        logger.warning("calibration text has %d tokens < %d x %d: windows will overlap", len(ids), cfg.n_samples,
                       cfg.seq_len)
    stream = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, len(ids) - cfg.seq_len + 1, (cfg.n_samples,), generator=gen)
    return torch.stack([stream[s:s + cfg.seq_len] for s in starts.tolist()])
