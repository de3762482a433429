"""`python -m space.bundle OUT`: the folder uploaded as a Hugging Face Space is complete and works on its own."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT

SPACE_ONLY = ("pytest", "playwright", "fastapi", "uvicorn", "gradio", "psutil", "matplotlib", "optipfair")


def _run(args, cwd, **env):
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=clean, timeout=600)


def test_bundle_is_a_complete_space_that_runs_from_its_own_folder(tmp_path):
    out = tmp_path / "space"
    done = _run(["-m", "space.bundle", str(out)], ROOT)
    assert done.returncode == 0, done.stderr
    # the Space's front matter and entry point at the root
    assert (out / "README.md").read_text() == (ROOT / "space" / "README.md").read_text()
    assert "from space.app import main" in (out / "app.py").read_text()
    # the packages, without caches or the screenshot, and the reference model with its texts and task
    for package in ("core", "space"):
        sources = {p.relative_to(ROOT / package) for p in (ROOT / package).rglob("*.py")
                   if "__pycache__" not in p.parts}
        copied = {p.relative_to(out / package) for p in (out / package).rglob("*.py")}
        assert copied == sources
    assert not list(out.rglob("__pycache__")) and not list(out.rglob("screenshot.png"))
    for rel in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "corpus/calibration.txt",
                "corpus/eval.txt", "tasks/pydoc_cloze.yaml", "tasks/pydoc_cloze.jsonl"):
        assert (out / "reference" / rel).read_bytes() == (ROOT / "reference" / rel).read_bytes(), rel
    assert not (out / "reference" / "train.py").exists() and not (out / "tests").exists()
    # requirements: the library's, without test/benchmark/web-server tools (the Space SDK brings gradio), + OAuth
    lines = (out / "requirements.txt").read_text().splitlines()
    names = [re.split(r"[=<>\[ ]", line)[0].lower() for line in lines if line and not line.startswith("#")]
    assert not set(names) & set(SPACE_ONLY)
    assert "torch==2.13.0" in lines and {"authlib", "itsdangerous", "transformers"} <= set(names)
    # on its own (no access to this checkout): the bundled core prunes the bundled reference model
    probe = ("import core, space.handlers; "
             "r = core.run_recipe(core.Recipe(method='maw', target=core.Target(ratio=0.1))); "
             "print(core.__file__, r.params_before['total'], r.params_after['total'])")
    done = _run(["-c", probe], out)
    assert done.returncode == 0, done.stderr
    where, before, after = done.stdout.split()[-3:]
    # the reference model: embeddings 4096 x 256 (tied) + 6 layers x (attention 256 x (256 + 64 + 64 + 256)
    # + MLP 3 x 256 x 768 + two norms of 256) + the final norm of 256 = 5,573,888 parameters
    reference = 4096 * 256 + 6 * (256 * 640 + 3 * 256 * 768 + 2 * 256) + 256
    assert where.startswith(str(out)) and int(after) < int(before) == reference


def test_bundle_refuses_an_existing_folder_and_leaves_it_alone(tmp_path):
    out = tmp_path / "space"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = _run(["-m", "space.bundle", str(out)], ROOT)
    assert done.returncode != 0
    assert "already exists" in done.stderr and "Traceback" not in done.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
