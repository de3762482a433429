"""Streaming as the front ends see it: the memory estimate (pure, from the config), the device choice, the CLI
(prune streams by default, eval streams what does not fit and says why speed was not measured) and Hub models
(only safetensors, configs and tokenizer files are downloaded, then streamed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import core
import core.cli
from conftest import hub_client_online, logits, save_tiny, tiny_model
from core import Recipe, Target
from core.memory import GIB, estimate_memory
from core.model_io import resolve_device
from core.replay import replay_bytes

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)


def _config(**fields):
    from transformers import LlamaConfig

    config = LlamaConfig(**fields)
    config.dtype = torch.bfloat16
    return config


def test_memory_estimate_of_an_8b_model():
    config = _config(**LLAMA3_8B)
    est = estimate_memory(config, Recipe(method="mlp_width", score="activation", target=Target(param_ratio=0.2)))
    assert est.params == 8_030_261_248  # Llama-3-8B, counted from the config alone
    assert est.block_bytes == 218_112_000 * 4  # one decoder block in float32
    assert est.model_bytes == est.params * 4 and est.disk_bytes == est.params * 2
    assert 2 * GIB < est.streamed_bytes < 6 * GIB < 30 * GIB < est.in_memory_bytes
    gpu = estimate_memory(config, device="cuda")
    assert gpu.compute_dtype == "bfloat16" and gpu.block_bytes == 218_112_000 * 2
    assert "GiB" in est.describe()


def test_memory_estimate_follows_the_recipe():
    config = _config(**LLAMA3_8B)

    def est(**kw):
        defaults = dict(method="mlp_width", score="activation", target=Target(ratio=0.2))
        return estimate_memory(config, Recipe(**{**defaults, **kw}))

    small = est()
    more_tokens = est(calibration=core.CalibrationConfig(n_samples=256, seq_len=2048))
    assert more_tokens.hidden_bytes >= 8 * 16 * small.hidden_bytes  # 128x the tokens (and longer masks)
    assert est(method="slimllm", score=None).working_bytes > small.working_bytes  # float64 covariances
    assert est(score="maw").hidden_bytes == 0 < small.hidden_bytes  # weight-only: no calibration data

    def working(n):
        return est(calibration=core.CalibrationConfig(n_samples=n, seq_len=128)).working_bytes

    # the replay's recordings (core.replay) grow with the tokens while they fit in one block (832 MiB) ...
    assert working(64) - working(32) == replay_bytes(32 * 128, 4096, 14336, 4)
    assert working(128) < working(64)  # ... and are not kept beyond it
    assert est(score="maw_range").working_bytes < est(score="vow").working_bytes  # extremes need no float copy
    # SparseGPT's MLP pass holds the gate/up and down Grams, then the down Hessian's factor, the down weights in
    # float32 and their Z: 4 bytes x (d^2 + m^2 + m^2 + 2 d m) more than Wanda, also as a later stage
    d, m = 4096, 14336
    two_four = dict(method="sparsity", target=Target(ratio=0.5), options={"pattern": "2:4"})
    hessians = 4 * (d * d + 2 * m * m + 2 * d * m)
    assert est(score="sparsegpt", **two_four).working_bytes - est(score="wanda", **two_four).working_bytes == hessians
    stacked = est(then=(core.recipe.Stage(score="sparsegpt", **two_four),))
    assert stacked.working_bytes - small.working_bytes == hessians
    ppl = est(method="depth", score="ppl_drop")
    assert ppl.logits_bytes > 0 and small.logits_bytes == 0  # whole-model logits need the head
    distance = est(method="depth", score="shapley_mc", options={"utility": "logit_distance"})
    assert distance.logits_bytes > ppl.logits_bytes  # the full model's logits are kept
    gpu = estimate_memory(config, Recipe(method="slimllm", target=Target(ratio=0.2),
                                         calibration=core.CalibrationConfig(n_samples=512, seq_len=2048)),
                          device="cuda")
    offloaded = estimate_memory(config, Recipe(method="slimllm", target=Target(ratio=0.2),
                                               calibration=core.CalibrationConfig(n_samples=512, seq_len=2048)),
                                device="cuda", offload_hidden=True)
    assert offloaded.streamed_bytes == gpu.streamed_bytes - gpu.hidden_bytes
    assert offloaded.cpu_bytes > gpu.cpu_bytes


def test_device_auto_means_cuda_when_present(monkeypatch):
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device(None) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"


def test_cli_prune_streams_by_default(tiny_dir, tmp_path, capsys):
    src = tiny_dir("qwen3")
    args = ["prune", str(src), "--method", "activation", "--param-ratio", "0.05", "--calib-samples", "4",
            "--calib-seq-len", "32", "--device", "auto", "--max-shard-size", "100KB", "--json"]
    assert core.cli.main(args + ["--out", str(tmp_path / "streamed")]) == 0
    assert core.cli.main(args + ["--out", str(tmp_path / "memory"), "--no-stream"]) == 0
    capsys.readouterr()
    streamed, memory = tmp_path / "streamed", tmp_path / "memory"
    index = json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {f for n, f in index.items() if n.startswith("model.layers.2.")}
    assert len(shards) == 1  # a streamed prune writes one shard per decoder block
    assert {p.name for p in tmp_path.iterdir()} == {"streamed", "memory"}  # no temporary folder left
    from safetensors.torch import load_file

    a = {k: v for f in streamed.glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in memory.glob("*.safetensors") for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prunes_that_cannot_fit_are_refused_before_loading(tiny_dir, tmp_path, monkeypatch, capsys):
    """A whole-model prune that does not fit points to streaming; a streamed one that cannot fit even one block at
    a time (here: many calibration tokens) names what it needs and what needs less. Nothing is written."""
    from core.model_io import load_config

    src = tiny_dir("llama")
    config = load_config(str(src))
    recipe = Recipe(method="mlp_width", score="activation", target=Target(param_ratio=0.05))
    est = estimate_memory(config, recipe)
    free = (est.streamed_bytes + est.in_memory_bytes) // 2 * 0.8  # room to stream, not to load it whole
    monkeypatch.setattr("core.memory.available_bytes", lambda device="cpu": int(free))
    import sys

    loads = []
    monkeypatch.setattr(sys.modules["core.prune"], "load_model", lambda *a, **k: loads.append(a))
    base = ["prune", str(src), "--method", "activation", "--param-ratio", "0.05", "--device", "cpu"]
    assert core.cli.main(base + ["--out", str(tmp_path / "whole"), "--no-stream"]) == 2
    err = capsys.readouterr().err
    assert "Loaded whole, this model needs about" in err and "Let it stream" in err and "Traceback" not in err
    assert core.cli.main(base + ["--out", str(tmp_path / "many"), "--calib-samples", "4096", "--calib-seq-len",
                                 "2048"]) == 2
    err = capsys.readouterr().err
    assert "even streamed one block at a time" in err and "--calib-samples" in err and "Traceback" not in err
    assert not loads and list(tmp_path.iterdir()) == []


def test_cli_eval_streams_what_does_not_fit(tiny_dir, monkeypatch, capsys):
    src = tiny_dir("llama")
    base = ["eval", str(src), "--max-tokens", "200", "--max-length", "64", "--json"]
    assert core.cli.main(base + ["--no-stream"]) == 0
    in_memory = json.loads(capsys.readouterr().out)["results"][0]
    monkeypatch.setattr("core.memory.available_bytes", lambda device="cpu": 10 * 2**20)  # 10 MiB free
    assert core.cli.main(base + ["--speed", "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1"]) == 0
    streamed = json.loads(capsys.readouterr().out)["results"][0]
    assert streamed["perplexity"] == pytest.approx(in_memory["perplexity"], rel=1e-6)
    assert streamed["speed"] is None and "GiB are free" in streamed["speed_not_measured"]
    monkeypatch.undo()
    assert core.cli.main(base + ["--stream", "--speed", "--prompt-tokens", "8", "--new-tokens", "2",
                                 "--repeats", "1"]) == 0  # streamed but small: measured whole
    assert json.loads(capsys.readouterr().out)["results"][0]["speed"]["decode"]


def test_compare_measures_a_streamed_result_that_fits(tiny_dir, tmp_path):
    from core.compare import EvalSettings, compare

    src = tiny_dir("llama")
    base, tokenizer = core.load_model(str(src), core.LoadOptions(device="cpu"))
    result = core.run_recipe(Recipe(model=str(src), method="maw", target=Target(ratio=0.5)))
    assert core.streaming.is_streamed(result.model)
    text = tmp_path / "eval.txt"
    text.write_text("Return the list of names in the module namespace. " * 30)
    settings = EvalSettings(text=text, max_tokens=128, prompt_tokens=8, new_tokens=2, repeats=1)
    comparison = compare(base, result.model, tokenizer, settings, rounds=1)
    assert "perplexity" in comparison.ratios and comparison.base.speed and comparison.pruned.speed
    assert {"prefill", "decode_b1"} <= set(comparison.speed["metrics"])  # both timed (a ratio only if measurable)
    # measured whole, streamed again afterwards
    assert all(p.is_meta for layer in result.model.model.layers for p in layer.parameters())
    result.model.core_stream.close()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from huggingface_hub import constants

    from hub_bot.local_hub import start_local_hub

    server = start_local_hub(tmp_path_factory.mktemp("hub"), {"tokens": {"hf_" + "w" * 34: {"user": "alice",
                                                                                           "role": "write"}}})
    names = ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE")
    saved = {n: getattr(constants, n) for n in names}
    constants.ENDPOINT = server.url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HUB_CACHE = str(tmp_path_factory.mktemp("hf-cache"))
    with hub_client_online():
        yield server
    for n, v in saved.items():
        setattr(constants, n, v)
    server.stop()


def test_hub_models_stream_from_their_downloaded_shards(hub, tmp_path, tokens):
    from huggingface_hub import HfApi, constants

    src = save_tiny(tiny_model("mistral"), tmp_path / "src")
    (src / "pytorch_model.bin").write_bytes(b"pickle weights are never downloaded")
    (src / "modeling_custom.py").write_text("raise SystemExit('remote code must not run')\n")
    api = HfApi(endpoint=hub.url, token="hf_" + "w" * 34)
    api.create_repo("alice/tiny-mistral")
    api.upload_folder(folder_path=str(src), repo_id="alice/tiny-mistral")
    recipe = Recipe(model="alice/tiny-mistral", method="mlp_width", score="activation", target=Target(ratio=0.25),
                    calibration=core.CalibrationConfig(n_samples=4, seq_len=32))
    result = core.run_recipe(recipe, out_dir=tmp_path / "out")
    assert core.streaming.is_streamed(result.model)
    out = core.save_pruned(result, tmp_path / "out")
    downloaded = {p.name for p in Path(constants.HF_HUB_CACHE).rglob("*") if p.is_file()}
    assert "pytorch_model.bin" not in downloaded and "modeling_custom.py" not in downloaded
    assert "model.safetensors" in downloaded
    expected = core.run_recipe(recipe.replace(model=str(src)), stream=False)
    reloaded = core.load_pruned(str(out), device="cpu")
    torch.testing.assert_close(logits(reloaded, tokens), logits(expected.model, tokens), atol=1e-5, rtol=0)
