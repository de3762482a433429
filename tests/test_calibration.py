"""Calibration sources (.txt, .jsonl, builtin, dataset:) and their errors; seeded window sampling."""
from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from conftest import TOKENIZER_DIR
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
