"""Calibration sources (.txt, .jsonl, builtin, dataset:) and their errors; seeded window sampling."""
from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR
from core import calibration
from core.calibration import BUILTIN_TEXT, CalibrationConfig, iter_texts, load_calibration
from core.cli import build_parser
from core.errors import CalibrationError

TEXT = ("Pruning removes the least important neurons of each layer. The remaining weights are kept as they are, "
        "and the model is written back in the same format. ") * 20


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _cfg(source, **kw) -> CalibrationConfig:
    return CalibrationConfig(source=str(source), **{"n_samples": 4, "seq_len": 16, **kw})


def _assert_flags_exist(message: str) -> None:
    """Every command-line flag an error message tells the user to pass exists on `prune`."""
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    known = {opt for action in prune._actions for opt in action.option_strings}
    for flag in re.findall(r"--[a-z][a-z-]*", message):
        assert flag in known, f"the message names {flag}, which `prune` does not have: {message}"


def test_txt_file_gives_windows_from_its_tokens(tmp_path, tokenizer):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    ids = load_calibration(tokenizer, _cfg(path))
    assert ids.shape == (4, 16) and ids.dtype == torch.long
    stream = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for row in ids.tolist():  # every window is a contiguous slice of the token stream
        assert any(stream[s:s + 16] == row for s in range(len(stream) - 15))


def test_jsonl_with_a_custom_text_field(tmp_path, tokenizer):
    path = tmp_path / "calib.jsonl"
    docs = [f"Document number {i} talks about structured pruning of language models." for i in range(30)]
    path.write_text("\n".join(json.dumps({"content": d, "id": i}) for i, d in enumerate(docs)) + "\n\n",
                    encoding="utf-8")
    assert list(iter_texts(_cfg(path, text_field="content"))) == docs
    ids = load_calibration(tokenizer, _cfg(path, text_field="content"))
    assert ids.shape == (4, 16)
    stream = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    for row in ids.tolist():  # windows come from the documents joined by EOS
        assert any(stream[s:s + 16] == row for s in range(len(stream) - 15))
    with pytest.raises(CalibrationError, match=r"calib\.jsonl:1 has no string field 'text'") as err:
        load_calibration(tokenizer, _cfg(path))
    _assert_flags_exist(str(err.value))


def test_bad_json_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:3 is not valid JSON"):
        load_calibration(tokenizer, _cfg(path))


def test_jsonl_line_that_is_not_an_object(tmp_path, tokenizer):
    path = tmp_path / "list.jsonl"
    path.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"list\.jsonl:1 has no string field 'text'"):
        load_calibration(tokenizer, _cfg(path))


def test_unknown_extension_and_missing_file(tmp_path, tokenizer):
    path = tmp_path / "calib.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"Unsupported calibration file type '\.csv'"):
        load_calibration(tokenizer, _cfg(path))
    with pytest.raises(CalibrationError, match="does not exist"):
        load_calibration(tokenizer, _cfg(tmp_path / "nope.txt"))


def test_text_shorter_than_one_window(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("Too short.", encoding="utf-8")
    with pytest.raises(CalibrationError, match="fewer than one window of 64") as err:
        load_calibration(tokenizer, _cfg(path, seq_len=64))
    _assert_flags_exist(str(err.value))


def test_empty_and_non_utf8_text(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="has 0 tokens"):
        load_calibration(tokenizer, _cfg(empty))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(CalibrationError, match="not UTF-8"):
        load_calibration(tokenizer, _cfg(binary))


def test_bad_sizes_and_missing_tokenizer(tmp_path, tokenizer):
    with pytest.raises(CalibrationError, match="n_samples >= 1"):
        load_calibration(tokenizer, _cfg("builtin", n_samples=0))
    with pytest.raises(CalibrationError, match="no tokenizer"):
        load_calibration(None, _cfg("builtin"))


def test_seeded_windows(tokenizer):
    a = load_calibration(tokenizer, _cfg("builtin", n_samples=8, seq_len=32, seed=1))
    b = load_calibration(tokenizer, _cfg("builtin", n_samples=8, seq_len=32, seed=1))
    c = load_calibration(tokenizer, _cfg("builtin", n_samples=8, seq_len=32, seed=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_builtin_text_is_shipped_and_usable(tokenizer):
    assert BUILTIN_TEXT.is_file()
    ids = load_calibration(tokenizer, CalibrationConfig(n_samples=5, seq_len=40))
    assert ids.shape == (5, 40)
    assert len({tuple(row) for row in ids.tolist()}) == 5  # distinct windows
    assert int(ids.max()) < len(tokenizer)
    assert "reference/corpus/calibration.txt" in CalibrationConfig().describe()


def test_dataset_source_offline_is_a_calibration_error(tokenizer):
    with pytest.raises(CalibrationError, match="Could not load dataset|needs the `datasets` package"):
        load_calibration(tokenizer, _cfg("dataset:definitely-not-a-real/dataset-name:sub"))


# -- reading only what the windows need ------------------------------------------------------------------------------

class CountingTokenizer:
    """Wraps the real tokenizer and counts the characters it is asked to encode."""

    def __init__(self, tokenizer) -> None:
        self.inner, self.chars = tokenizer, 0
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.inner(text, **kwargs)


def test_a_large_text_file_is_read_only_as_far_as_needed(tmp_path, tokenizer):
    import tracemalloc

    path = tmp_path / "big.txt"
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(400):  # ~20 MB, one line: no newline anywhere to split on
            fh.write(TEXT.replace("\n", " ") * 170)
    assert path.stat().st_size > 20_000_000
    counting = CountingTokenizer(tokenizer)
    tracemalloc.start()
    ids = load_calibration(counting, _cfg(path, n_samples=4, seq_len=32))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert ids.shape == (4, 32)
    assert counting.chars < 4 * calibration.PIECE_CHARS  # 512 tokens wanted: a piece or two, not 20 MB
    assert peak < 5_000_000


def test_pieces_keep_the_text_and_cut_at_spaces(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "PIECE_CHARS", 64)
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    pieces = list(calibration.iter_pieces(_cfg(path)))
    assert "".join(p for p, _ in pieces) == TEXT  # nothing lost or repeated
    assert [end for _, end in pieces].count(True) == 1 and pieces[-1][1]  # one document
    assert all(len(p) <= 64 for p, _ in pieces)
    assert all(p.endswith((" ", "\n")) for p, _ in pieces[:-2])


def test_an_overlong_jsonl_line_is_skipped_not_loaded(tmp_path, tokenizer, monkeypatch, caplog):
    monkeypatch.setattr(calibration, "MAX_LINE_CHARS", 5000)
    path = tmp_path / "long.jsonl"
    lines = [json.dumps({"text": "x " * 10000}), json.dumps({"text": TEXT})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = list(iter_texts(_cfg(path)))
    assert "".join(texts) == TEXT  # the long record is skipped, the next one read
    assert "long.jsonl:1 is longer than 5000 characters; skipped" in caplog.text


def test_non_utf8_jsonl_and_folder_sources(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"text": "caf"}).encode()[:-2] + "\xe9\"}\n".encode("latin-1"))
    with pytest.raises(CalibrationError, match="not UTF-8"):
        load_calibration(tokenizer, _cfg(path))
    with pytest.raises(CalibrationError, match="is a folder"):
        load_calibration(tokenizer, _cfg(tmp_path))


def test_a_dataset_is_streamed_only_as_far_as_needed(tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    served = []

    def records():
        while True:
            served.append(1)
            yield {"text": TEXT}

    def load_dataset(name, subset, split, streaming):
        assert streaming and (name, subset, split) == ("org/corpus", "en", "train")
        return records()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    ids = load_calibration(tokenizer, _cfg("dataset:org/corpus:en", n_samples=4, seq_len=32))
    assert ids.shape == (4, 32)
    assert len(served) < 20  # an endless dataset: stopped once 4 x 32 x 4 tokens were collected
