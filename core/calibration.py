"""Calibration data: `n` windows of `T` tokens, seeded, from the shipped text, a local .txt/.jsonl file or a
`datasets` dataset. Windows are drawn from the concatenated token stream (documents joined by EOS).

Only what the windows need is read: text is streamed in pieces of at most `PIECE_CHARS` characters and tokenized
piece by piece until `n * T * 4` tokens are collected, so a 100 MB file costs what its first few pages cost. A
.jsonl line longer than `MAX_LINE_CHARS` is skipped (it cannot be parsed without loading it); a long line of a
.txt file is simply read in pieces.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from .errors import CalibrationError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BUILTIN_TEXT = Path(__file__).resolve().parent.parent / "reference" / "corpus" / "calibration.txt"
BUILTIN = "builtin"
DATASET_PREFIX = "dataset:"
TEXT_SUFFIXES = (".txt", ".md", "")
PIECE_CHARS = 1 << 16  # characters tokenized at a time
MAX_LINE_CHARS = 1 << 24  # a .jsonl record longer than this (16M characters) is skipped


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


def check_source(cfg: CalibrationConfig) -> None:
    """Raise CalibrationError when the source cannot be read (checked before any model is loaded)."""
    if cfg.source.startswith(DATASET_PREFIX):
        if not cfg.source[len(DATASET_PREFIX):].partition(":")[0].strip():
            raise CalibrationError("Give a dataset name after 'dataset:', e.g. dataset:wikitext:wikitext-2-raw-v1.")
        return
    path = BUILTIN_TEXT if cfg.source == BUILTIN else Path(cfg.source)
    if path.is_dir():
        raise CalibrationError(f"Calibration source {str(path)!r} is a folder; give one .txt or .jsonl file in it, "
                               f"'{BUILTIN}', or 'dataset:NAME'.")
    if not path.is_file():
        raise CalibrationError(f"Calibration file {str(path)!r} does not exist. Give a .txt or .jsonl file, "
                               f"'{BUILTIN}', or 'dataset:NAME'.")
    if path.suffix != ".jsonl" and path.suffix not in TEXT_SUFFIXES:
        raise CalibrationError(f"Unsupported calibration file type {path.suffix!r}; use .txt or .jsonl.")


def _not_utf8(path: Path) -> CalibrationError:
    return CalibrationError(f"{path} is not UTF-8 text; convert it to UTF-8 (e.g. iconv -t UTF-8).")


def _split(text: str) -> Iterator[str]:
    """`text` in pieces of at most PIECE_CHARS characters, cut after whitespace where there is some."""
    while len(text) > PIECE_CHARS:
        cut = max(text.rfind(" ", 0, PIECE_CHARS), text.rfind("\n", 0, PIECE_CHARS)) + 1 or PIECE_CHARS
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _txt_pieces(path: Path) -> Iterator[tuple[str, bool]]:
    """The file as one document, read PIECE_CHARS characters at a time."""
    try:
        with path.open(encoding="utf-8") as fh:
            carry = ""
            while block := fh.read(PIECE_CHARS):
                *done, carry = _split(carry + block)
                for piece in done:
                    yield piece, False
            yield carry, True
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) with lines longer than MAX_LINE_CHARS skipped (their rest is read and dropped)."""
    try:
        with path.open(encoding="utf-8") as fh:
            lineno = 0
            while True:
                line = fh.readline(MAX_LINE_CHARS + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > MAX_LINE_CHARS and not line.endswith("\n"):
                    while (rest := fh.readline(PIECE_CHARS)) and not rest.endswith("\n"):
                        pass
                    logger.warning("%s:%d is longer than %d characters; skipped", path, lineno, MAX_LINE_CHARS)
                    continue
                yield lineno, line
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    for lineno, line in _lines(path):
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
        ds = datasets.load_dataset(name, subset or None, split=cfg.split, streaming=True)  # records on demand
    except Exception as err:  # datasets raises many types for missing/offline data
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CalibrationError(f"Could not load dataset {name!r} (split {cfg.split!r}): {first}. Offline, use a "
                               "local .txt/.jsonl file or the builtin text instead.") from None
    for record in ds:
        text = record.get(cfg.text_field)
        if not isinstance(text, str):
            raise CalibrationError(f"Dataset {name!r} has no string field {cfg.text_field!r}; set the text field.")
        yield text


def _documents_as_pieces(texts: Iterable[str]) -> Iterator[tuple[str, bool]]:
    for text in texts:
        pieces = list(_split(text)) or [""]
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


def iter_pieces(cfg: CalibrationConfig) -> Iterator[tuple[str, bool]]:
    """(text piece, ends a document) in order; a document comes in pieces of at most PIECE_CHARS characters."""
    check_source(cfg)
    if cfg.source.startswith(DATASET_PREFIX):
        yield from _documents_as_pieces(_dataset_texts(cfg))
        return
    path = BUILTIN_TEXT if cfg.source == BUILTIN else Path(cfg.source)
    if path.suffix == ".jsonl":
        yield from _documents_as_pieces(_jsonl_texts(path, cfg.text_field))
    else:
        yield from _txt_pieces(path)


def iter_texts(cfg: CalibrationConfig) -> Iterator[str]:
    """The text of the calibration source, in order, in pieces (read lazily: stop iterating to stop reading)."""
    for piece, _ in iter_pieces(cfg):
        yield piece


def load_calibration(tokenizer, cfg: CalibrationConfig) -> "torch.Tensor":
    """Token windows for calibration. Returns a LongTensor of shape [n_samples, seq_len]."""
    import torch

    if tokenizer is None:
        raise CalibrationError("This score needs calibration data, but the model has no tokenizer to encode it.")
    if cfg.n_samples < 1 or cfg.seq_len < 2:
        raise CalibrationError("Calibration needs n_samples >= 1 and seq_len >= 2.")
    wanted = cfg.n_samples * cfg.seq_len * 4  # enough distinct text for well-spread windows
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for piece, ends_document in iter_pieces(cfg):
        if piece.strip():
            ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
        if ends_document and eos is not None and ids and ids[-1] != eos:
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
