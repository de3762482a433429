"""The command line on tiny saved models.

`prune` and `methods` run as real `python -m core` subprocesses (offline, with a private Hub cache that holds a tiny
model under a Hub id). `inspect` and the error cases call the same `core.cli.main` in-process (a subprocess per case
would cost seconds of imports each); one error case also runs as a subprocess to check the real exit status.
Every error must exit with 2, print one `error:` line, and leave nothing behind next to the output folder.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import core
from conftest import ROOT, save_tiny, tiny_model
from core import LayerSelection, LoadConfig, Recipe, Target
from core.architectures import supported_model_types
from core.cli import main
from core.export import RECIPE_FILE

HUB_ID = "tiny-org/tiny-llama"
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("cli-src"))


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, src) -> Path:
    """A Hub cache folder holding `src` as HUB_ID (what `hf download` would leave), usable offline."""
    cache = tmp_path_factory.mktemp("hub-cache")
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return cache


def run_cli(*args, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "core", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def front_matter(readme: Path) -> dict:
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- successful runs (subprocess) ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pruned(tmp_path_factory, hub_cache):
    out = tmp_path_factory.mktemp("cli-out") / "pruned"
    proc = run_cli("prune", HUB_ID, "--method", "maw", "--ratio", "0.25", "--out", out, "--json", cache=hub_cache)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout), proc


def test_prune_writes_a_complete_checkpoint(pruned):
    out, payload, proc = pruned
    assert Path(payload["out"]) == out.resolve()
    assert payload["recipe"]["method"] == "mlp_width" and payload["recipe"]["score"] == "maw"
    assert payload["recipe"]["model"] == HUB_ID
    result = payload["result"]
    assert result["base_model"] == HUB_ID and result["family"] == "llama" and result["uniform"]
    assert [layer["intermediate_size"] for layer in result["layers"]] == [72] * 4
    assert "error" not in proc.stderr

    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", RECIPE_FILE, "README.md"} <= files
    assert TOKENIZER_FILES <= files
    assert not any(name.endswith(".bin") for name in files)
    assert [p.name for p in out.parent.iterdir()] == ["pruned"]  # no temporary folder left next to it

    meta = front_matter(out / "README.md")
    assert meta["base_model"] == HUB_ID
    assert meta["base_model_relation"] == "finetune"
    assert meta["library_name"] == "transformers"
    assert {"pruned", "mlp_width"} <= set(meta["tags"])
    recipe_doc = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert recipe_doc["result"] == result

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 72
    assert numel(model) == result["params_after"] < result["params_before"]


def test_recipe_file_with_a_flag_override(pruned, hub_cache, tmp_path):
    out, payload, _ = pruned
    out2 = tmp_path / "again"
    proc = run_cli("prune", "--recipe", out / RECIPE_FILE, "--ratio", "0.5", "--score", "l2", "--out", out2,
                   "--json", cache=hub_cache)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout)
    assert again["recipe"]["target"]["ratio"] == 0.5  # flags win over the file
    assert again["recipe"]["score"] == "l2"
    assert again["recipe"]["model"] == HUB_ID  # the rest comes from the file
    assert again["result"]["layers"][0]["intermediate_size"] == 48
    assert {p.name for p in tmp_path.iterdir()} == {"again"}


def inspect_json(capsys, *argv) -> dict:
    """`inspect --json` in-process (the same `main` as `python -m core`)."""
    assert main(["inspect", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_uniform(capsys, src):
    info = inspect_json(capsys, src)
    model = AutoModelForCausalLM.from_pretrained(src)
    assert info["parameters"]["total"] == numel(model)
    assert info["parameters"]["embeddings"] == model.get_input_embeddings().weight.numel()
    assert info["parameters"]["lm_head"] == 0 and info["tie_word_embeddings"]
    attention = sum(numel(layer.self_attn) for layer in model.model.layers)
    assert info["parameters"]["attention"] == attention
    assert info["parameters"]["mlp"] == sum(numel(layer.mlp) for layer in model.model.layers)
    assert (info["family"], info["num_layers"], info["head_dim"], info["per_layer"]) == ("llama", 4, 16, False)


def test_inspect_per_layer_checkpoint(capsys, src, tmp_path):
    result = core.run_recipe(Recipe(model=str(src), method="mlp_width", target=Target(ratio=0.5),
                                    layers=LayerSelection(ratios=(0.0, 0.5, 0.25, 0.0)), load=LoadConfig(device="cpu")))
    out = core.save_pruned(result, tmp_path / "per-layer")
    info = inspect_json(capsys, out)
    assert info["per_layer"]
    assert [layer["intermediate_size"] for layer in info["layers"]] == [96, 48, 72, 96]
    reloaded = core.load_pruned(str(out), device="cpu")
    assert info["parameters"]["total"] == numel(reloaded) == result.params_after["total"]
    assert [layer["mlp"] for layer in info["layers"]] == [numel(layer.mlp) for layer in reloaded.model.layers]


def test_methods_json(hub_cache):
    proc = run_cli("methods", "--json", cache=hub_cache)
    assert proc.returncode == 0, proc.stderr
    methods = json.loads(proc.stdout)
    assert {"mlp_width", "attention_heads", "depth"} <= set(methods)
    assert methods["mlp_width"]["default_score"] == "maw"
    assert {"maw", "maw_range", "vow", "pon", "l2", "activation", "random"} <= set(methods["mlp_width"]["scores"])
    assert methods["attention_heads"]["options"] == {"mode": "kv_group"}
    assert methods["depth"]["options"]["unit"] == "block" and methods["depth"]["options"]["layers"] is None


# -- errors ----------------------------------------------------------------------------------------------------------

def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def expect_error(capsys, parent: Path, *argv) -> str:
    """Run the CLI in-process; it must exit 2 with one error line and leave `parent` as it was."""
    before = sorted(p.name for p in parent.iterdir())
    assert main([str(a) for a in argv]) == 2
    line = error_line(capsys.readouterr().err)
    assert sorted(p.name for p in parent.iterdir()) == before, "an output or temporary folder was left behind"
    return line


def test_subprocess_error_exit_status(src, hub_cache, tmp_path):
    proc = run_cli("prune", src, "--method", "mlp_widht", "--ratio", "0.5", "--out", tmp_path / "o", cache=hub_cache)
    assert proc.returncode == 2
    assert "Did you mean 'mlp_width'?" in error_line(proc.stderr)
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,expected", [
    (["--ratio", "1.0"], r"ratio must be in [0, 1) (got 1.0)"),
    (["--ratio", "-0.1"], r"ratio must be in [0, 1) (got -0.1)"),
    (["--ratio", "0.5", "--round-to", "128"], "would remove all of them"),
    (["--width", "0"], "width must be positive"),
    (["--width", "128"], "larger than layer 0's MLP (96)"),
    (["--ratio", "0.5", "--layer-ratios", "0.5,0.5"], "give one ratio per layer"),
    (["--ratio", "0.5", "--protect-first", "2", "--protect-last", "2"], "leaves nothing to prune"),
])
def test_impossible_targets(capsys, tmp_path, src, argv, expected):
    line = expect_error(capsys, tmp_path, "prune", src, "--method", "maw", *argv, "--out", tmp_path / "o", "-q")
    assert expected in line


@pytest.mark.parametrize("method,suggestion", [("maww", "maw"), ("attention_head", "attention_heads")])
def test_unknown_method(capsys, tmp_path, src, method, suggestion):
    line = expect_error(capsys, tmp_path, "prune", src, "--method", method, "--ratio", "0.5", "--out", tmp_path / "o")
    assert f"Did you mean {suggestion!r}?" in line and "mlp_width" in line


def test_unknown_option_value_and_missing_target(capsys, tmp_path, src):
    line = expect_error(capsys, tmp_path, "prune", src, "--method", "attention_heads", "--mode", "keys", "--ratio",
                        "0.5", "--out", tmp_path / "o")
    assert "mode must be one of" in line
    line = expect_error(capsys, tmp_path, "prune", src, "--method", "maw", "--out", tmp_path / "o")
    assert "No target given" in line


def test_unsupported_architecture_lists_supported_types(capsys, tmp_path):
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32,
                                                bos_token_id=0, eos_token_id=0)).save_pretrained(gpt2)
    line = expect_error(capsys, tmp_path, "prune", gpt2, "--method", "maw", "--ratio", "0.5", "--out", tmp_path / "o")
    assert "'gpt2' is not supported" in line
    for model_type in supported_model_types():
        assert model_type in line
    line = expect_error(capsys, tmp_path, "inspect", gpt2)
    assert "'gpt2' is not supported" in line


def test_pickle_only_weights_need_allow_pickle(capsys, tmp_path):
    model = tiny_model("llama")
    folder = tmp_path / "pickled"
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    line = expect_error(capsys, tmp_path, "prune", folder, "--method", "maw", "--ratio", "0.5", "--out",
                        tmp_path / "o")
    assert "pickle" in line and "--allow-pickle" in line
    assert main(["prune", str(folder), "--method", "maw", "--ratio", "0.5", "--out", str(tmp_path / "o"), "--json",
                 "--allow-pickle"]) == 0
    capsys.readouterr()
    assert (tmp_path / "o" / "model.safetensors").is_file()  # the output is safetensors either way


def test_model_not_on_disk_while_offline(capsys, tmp_path):
    line = expect_error(capsys, tmp_path, "prune", "no-such-org/no-such-model", "--method", "maw", "--ratio", "0.5",
                        "--out", tmp_path / "o")
    assert "'no-such-org/no-such-model'" in line and "offline" in line
    line = expect_error(capsys, tmp_path, "inspect", "no-such-org/no-such-model")
    assert "offline" in line


def test_existing_output_needs_overwrite(capsys, tmp_path, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    line = expect_error(capsys, tmp_path, "prune", src, "--method", "maw", "--ratio", "0.5", "--out", out)
    assert "already exists" in line and "--overwrite" in line
    assert (out / "old.txt").read_text() == "keep me"
    # checked before the model is even loaded
    line = expect_error(capsys, tmp_path, "prune", "no-such-org/no-such-model", "--method", "maw", "--ratio", "0.5",
                        "--out", out)
    assert "already exists" in line

    assert main(["prune", str(src), "--method", "maw", "--ratio", "0.5", "--out", str(out), "--overwrite",
                 "--json"]) == 0
    capsys.readouterr()
    assert not (out / "old.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert "base_model" not in front_matter(out / "README.md")  # a local folder is not a Hub reference


def test_missing_calibration_file_for_a_data_driven_score(capsys, tmp_path, src):
    line = expect_error(capsys, tmp_path, "prune", src, "--method", "mlp_width", "--score", "activation", "--ratio",
                        "0.5", "--calib", tmp_path / "missing.txt", "--out", tmp_path / "o")
    assert "missing.txt" in line and "does not exist" in line


def test_missing_recipe_file(capsys, tmp_path):
    line = expect_error(capsys, tmp_path, "prune", "--recipe", tmp_path / "none.yaml", "--out", tmp_path / "o")
    assert "Cannot read recipe" in line
