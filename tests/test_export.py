"""Export atomicity: a failure while writing leaves neither the output folder nor a temporary folder, and an existing
output being overwritten survives a failed attempt unchanged."""
from __future__ import annotations

import os
import stat

import pytest

import core
from conftest import save_tiny, tiny_model
from core import LoadConfig, Recipe, Target
from core.errors import OutputExistsError


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    src = save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("export-src"))
    return core.run_recipe(Recipe(model=str(src), method="maw", target=Target(ratio=0.25),
                                  load=LoadConfig(device="cpu")))


def _fail_tokenizer_save(monkeypatch, result, exc=RuntimeError):
    """Make the tokenizer's save fail after the weights are already written."""
    def boom(folder, *args, **kwargs):
        assert "model.safetensors" in os.listdir(folder), "the weights are written first: this fails midway"
        raise exc("disk full")

    monkeypatch.setattr(result.tokenizer, "save_pretrained", boom)


def test_failure_midway_leaves_nothing(result, tmp_path, monkeypatch):
    _fail_tokenizer_save(monkeypatch, result)
    with pytest.raises(RuntimeError, match="disk full"):
        core.save_pruned(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_midway_leaves_nothing(result, tmp_path, monkeypatch):
    _fail_tokenizer_save(monkeypatch, result, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        core.save_pruned(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_output(result, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous model")
    _fail_tokenizer_save(monkeypatch, result)
    with pytest.raises(RuntimeError):
        core.save_pruned(result, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_existing_output_is_refused_then_replaced(result, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous model")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        core.save_pruned(result, out)
    assert core.save_pruned(result, out, overwrite=True) == out.resolve()
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the replaced folder is gone too


def test_output_folder_gets_normal_permissions(result, tmp_path):
    out = core.save_pruned(result, tmp_path / "nested" / "out")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not a private 0700 temp dir
