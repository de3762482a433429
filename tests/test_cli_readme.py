"""What the README promises: every pruning example changes the model it claims to, the lighter requirement sets are
consistent with requirements.txt, and the command line runs with requirements/core.txt alone."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, save_tiny, tiny_model

README = (ROOT / "README.md").read_text(encoding="utf-8")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _requirements(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.startswith(("#", "-r"))}


def test_requirement_sets_are_subsets_of_requirements_txt():
    everything = _requirements(ROOT / "requirements.txt")
    for name in ("core.txt", "eval.txt"):
        part = _requirements(ROOT / "requirements" / name)
        assert part and part <= everything, f"requirements/{name} pins what requirements.txt does not: {part - everything}"
    assert not any(name in line for line in _requirements(ROOT / "requirements" / "core.txt")
                   for name in ("gradio", "lm-eval", "playwright", "matplotlib", "datasets", "optipfair"))


def prune_commands() -> list[str]:
    """The concrete `python -m core prune` lines of the README (lines with placeholders such as MODEL are usage)."""
    lines = [line.split("#")[0].strip() for block in _blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line.startswith("python -m core prune") and not re.search(r"\b[A-Z]{2,}\b", line)]


def test_the_readme_has_examples_to_check():
    assert prune_commands() and any("core.run_recipe" in b for b in _blocks("python"))


@pytest.mark.slow
@pytest.mark.parametrize("command", prune_commands())
def test_readme_prune_commands_change_the_model(command, tmp_path):
    argv = shlex.split(command)[3:]
    out = argv[argv.index("--out") + 1]
    argv[argv.index("--out") + 1] = str(tmp_path / Path(out).name)
    proc = subprocess.run([sys.executable, "-m", "core", *argv, "--json"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["result"]
    assert result["params_after"] < result["params_before"] or result["sparsity"]["zeros"] > 0  # sparsity: zeros


@pytest.mark.slow
def test_readme_python_example_changes_the_model(tmp_path, monkeypatch):
    code = next(b for b in _blocks("python") if "core.run_recipe" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert result.params_after["total"] < result.params_before["total"]
    assert result.params_after["attention"] < result.params_before["attention"]
    saved = next((tmp_path / "out").iterdir())
    assert (saved / "model.safetensors").is_file()


def test_readme_recipe_example_is_valid_and_prunes(tmp_path):
    """The recipe YAML of the README (its Hub model and calibration file swapped for offline stand-ins)."""
    import core

    text = next(b for b in _blocks("yaml") if "method:" in b)
    data = yaml.safe_load(text)
    calib = tmp_path / "my_texts.jsonl"
    calib.write_text("\n".join(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 30})
                               for _ in range(20)))
    data["model"] = None  # the shipped reference model
    data["calibration"] = dict(data["calibration"], source=str(calib), n_samples=4, seq_len=32)
    result = core.run_recipe(core.Recipe.from_dict(dict(data, load={"device": "cpu"})))
    removed = 1 - result.params_after["total"] / result.params_before["total"]
    assert removed == pytest.approx(data["target"]["param_ratio"], abs=0.02)


# packages outside requirements/core.txt look uninstalled: `import x` fails and importlib.util.find_spec gives None
BLOCK_EXTRAS = """
import sys
for name in ("lm_eval", "datasets", "gradio", "matplotlib", "playwright", "optipfair", "fastapi", "uvicorn", "psutil"):
    sys.modules[name] = None
from core.cli import main
sys.exit(main())
"""


@pytest.mark.slow
def test_the_cli_runs_with_the_core_requirements_only(tmp_path):
    src = save_tiny(tiny_model("llama"), tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    for argv in (["methods"], ["inspect", str(src)],
                 ["prune", str(src), "--method", "mlp_width", "--score", "activation", "--ratio", "0.5", "--out",
                  str(tmp_path / "o"), "-q"],
                 ["eval", str(tmp_path / "o"), "--compare", str(src), "--ppl", str(text), "--max-length", "32",
                  "--speed", "--repeats", "2", "--prompt-tokens", "8", "--new-tokens", "2", "-q"]):
        proc = subprocess.run([sys.executable, "-c", BLOCK_EXTRAS, *argv], cwd=tmp_path, env=ENV,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (argv, proc.stderr)
