"""Sparse checkpoints (dense with zeros, compressed-tensors bitmask layouts), stacking with structured stages, the
CLI surface (--pattern, --then, --compressed, inspect), the 2:4 kernel decision, and the bot and Space surfaces."""
from __future__ import annotations

import json
from pathlib import Path

import numpy
import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import core
from conftest import logits, save_tiny, tiny_model
from core.cli import main
from core.errors import RecipeError
from core.export import RECIPE_FILE
from core.semi_structured import conversion_plan, ineligible_reason, sparse_kernel_speed
from core.sparse_format import compress, decompress, folder_report, pack_mask, unpack_mask

IDS = torch.arange(24)[None]


def _sparse(pattern: str = "2:4", ratio: float = 0.5, score: str = "magnitude", family: str = "llama", **extra):
    model = tiny_model(family)
    recipe = core.Recipe(method="sparsity", score=score, target=core.Target(ratio=ratio),
                         options={"pattern": pattern}, **extra)
    return core.prune(model, None, recipe)


def _tensors(folder: Path) -> dict:
    out = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k].to(sa[k].dtype)), k


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("sparse-src"))


# -- the compressed-tensors layout --------------------------------------------------------------------------------

def test_bitmask_packing_is_numpys_little_endian_packbits():
    mask = torch.rand(5, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert torch.equal(packed, torch.from_numpy(numpy.packbits(mask.numpy(), axis=-1, bitorder="little")))
    assert torch.equal(unpack_mask(packed, 21), mask)


def test_compressed_parts_have_the_compressed_tensors_layout():
    w = torch.randn(8, 16) * (torch.arange(16) % 4 < 2)  # 2:4 with zeros in columns 2, 3 of each group
    parts = compress(w, "sparse-24-bitmask")
    assert parts["compressed"].shape == (8, 8) and parts["compressed"].dtype == w.dtype
    assert parts["shape"].dtype == torch.int64 and parts["shape"].tolist() == [[8], [16]]
    assert parts["bitmask"].shape == (8, 2) and parts["bitmask"].dtype == torch.uint8
    assert torch.equal(decompress(parts), w)
    u = torch.randn(6, 10) * (torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) > 0.6)
    parts = compress(u, "sparse-bitmask")
    assert parts["compressed"].dim() == 1 and parts["compressed"].numel() == int((u != 0).sum())
    assert parts["row_offsets"].tolist() == ([0] + (u != 0).sum(1).cumsum(0).tolist())[:-1]
    assert parts["shape"].tolist() == [6, 10]
    assert torch.equal(decompress(parts), u)


@pytest.mark.parametrize("pattern,ratio,fmt", [("2:4", 0.5, "sparse-24-bitmask"), ("4:8", 0.5, "sparse-bitmask"),
                                               ("unstructured", 0.6, "sparse-bitmask")])
def test_compressed_round_trip_has_the_same_logits(tmp_path, pattern, ratio, fmt):
    result = _sparse(pattern, ratio)
    expected = logits(result.model, IDS)
    out = core.save_pruned(result, tmp_path / "out", sparse_format="compressed", max_shard_size="100KB")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    sc = config["sparsity_config"]
    assert sc["format"] == fmt and sc["sparsity_structure"] == ("2:4" if pattern == "2:4" else "unstructured")
    assert "lm_head" in sc["ignore"] and not any(".layers." in name for name in sc["ignore"])
    stored = _tensors(out)
    assert not any(".layers." in k and k.endswith("proj.weight") for k in stored)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(stored)
    reloaded = core.load_pruned(str(out))
    _same_weights(reloaded, result.model)
    torch.testing.assert_close(logits(reloaded, IDS), expected)  # eager in memory, sdpa after loading
    report = folder_report(out)
    assert report["format"] == fmt and report["sparsity"] == pytest.approx(result.extra["sparsity"]["sparsity"])
    assert report["disk_bytes"] < report["dense_bytes"]
    bitmasks = sum(t.numel() for k, t in stored.items() if k.endswith(".bitmask"))
    assert report["index_bytes"] >= bitmasks


@pytest.mark.parametrize("family", ["phi3", "qwen2", "gemma3"])
def test_compressed_round_trip_other_families(tmp_path, family):
    """Fused projections (Phi-3), biases (Qwen2), interleaved layer types (Gemma 3)."""
    result = _sparse(family=family)
    out = core.save_pruned(result, tmp_path / "out", sparse_format="compressed")
    _same_weights(core.load_pruned(str(out)), result.model)


def test_compressed_disk_bytes_match_the_arithmetic(tmp_path):
    """2:4 in float32: half the values plus one bit per weight (and 16 bytes of shape per linear)."""
    result = _sparse()
    out = core.save_pruned(result, tmp_path / "out", sparse_format="compressed")
    linears = [m.weight for n, m in result.model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    numel = sum(w.numel() for w in linears)
    stored = _tensors(out)
    values = sum(t.numel() * t.element_size() for k, t in stored.items() if k.endswith(".compressed"))
    bitmask = sum(t.numel() for k, t in stored.items() if k.endswith(".bitmask"))
    assert values == numel // 2 * 4 and bitmask == numel // 8
    assert folder_report(out)["index_bytes"] == bitmask + 16 * len(linears)


def test_dense_default_reloads_with_plain_transformers(tmp_path):
    result = _sparse()
    expected = logits(result.model, IDS)
    out = core.save_pruned(result, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["pruning_sparsity"]["structure"] == "2:4" and config["pruning_sparsity"]["format"] == "dense"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    _same_weights(reloaded, result.model)
    torch.testing.assert_close(logits(reloaded, IDS), expected)
    for k, t in _tensors(out).items():
        if ".layers." in k and k.endswith("proj.weight"):
            assert ((t != 0).reshape(t.shape[0], -1, 4).sum(-1) == 2).all(), k
    card = (out / "README.md").read_text()
    assert "## Sparsity" in card and "50.00%" in card and "no speed-up" in card


def test_compressed_needs_a_sparsity_stage(tmp_path):
    result = core.prune(tiny_model("llama"), None, core.Recipe(method="maw", target=core.Target(ratio=0.25)))
    with pytest.raises(RecipeError, match="sparsity stage"):
        core.save_pruned(result, tmp_path / "out", sparse_format="compressed")
    assert not (tmp_path / "out").exists()


# -- stacking -----------------------------------------------------------------------------------------------------

STACK = """\
- method: maw
  target: {ratio: 0.25}
- method: sparsity
  score: magnitude
  target: {ratio: 0.5}
  options: {pattern: "2:4"}
"""


def test_stacking_a_structured_stage_then_two_four(tmp_path):
    recipe = core.Recipe.from_yaml(STACK)
    assert [s.method for s in recipe.stages()] == ["maw", "sparsity"]
    model = tiny_model("llama")
    result = core.prune(model, None, recipe)
    assert model.config.intermediate_size == 72  # 96 * 0.75
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            assert ((module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert [s["method"] for s in result.report["stages"]] == ["mlp_width", "sparsity"]
    out = core.save_pruned(result, tmp_path / "out", sparse_format="compressed")
    doc = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert doc["method"] == "mlp_width" and doc["then"][0]["method"] == "sparsity"
    assert doc["result"]["sparsity"]["sparsity"] == 0.5
    card = (out / "README.md").read_text()
    assert "stages **mlp_width (maw)**, then **sparsity (magnitude, 2:4)**" in card
    # the written recipe reproduces the run
    again = core.prune(tiny_model("llama"), None, core.Recipe.from_file(out / RECIPE_FILE))
    torch.testing.assert_close(logits(again.model, IDS), logits(core.load_pruned(str(out)), IDS))


@pytest.mark.parametrize("pattern", ["2:4", 124])
def test_structured_stage_after_nm_is_refused(pattern):
    recipe = core.Recipe(method="sparsity", target=core.Target(ratio=0.5), options={"pattern": pattern},
                         then=(core.Stage(method="maw", target=core.Target(ratio=0.2)),))
    with pytest.raises(RecipeError, match="before the sparsity stage"):
        core.prune(tiny_model("llama"), None, recipe)


def test_single_stage_recipes_keep_their_layout_and_hash():
    from hub_bot.recipes import recipe_entry, recipe_hash

    plain = core.Recipe(method="maw", target=core.Target(ratio=0.3))
    assert "then" not in plain.to_dict()
    entry = recipe_entry({"method": "sparsity", "score": "wanda", "target": {"ratio": 0.5},
                          "options": {"pattern": "2:4"}})
    assert entry.name == "sparsity-50pct"
    stacked = recipe_entry({"name": "maw-then-24", **yaml.safe_load(STACK)[0],
                            "then": yaml.safe_load(STACK)[1:]})
    assert stacked.hash != recipe_hash(stacked.recipe.replace(then=()))
    assert core.Recipe.from_yaml(stacked.as_yaml()) == stacked.recipe


def test_bot_publishes_a_sparsity_variant(tmp_path):
    """The real bot on the local Hub: a pushed source, a Wanda 2:4 recipe, a published variant whose every pruned
    linear is exactly 2:4, that reloads with plain transformers, and whose card reports the measured zeros."""
    pytest.importorskip("fastapi")
    from huggingface_hub import HfApi

    from bot_support import bot_config, drain, online_on_one_thread, push, tiny_source
    from hub_bot.local_hub import start_local_hub
    from hub_bot.service import Bot

    alice, bot_token = "hf_AliceSparseToken0123456789abcdef", "hf_BotSparseToken0123456789abcdefgh"
    recipe = {"method": "sparsity", "score": "wanda", "target": {"ratio": 0.5}, "options": {"pattern": "2:4"},
              "calibration": {"n_samples": 4, "seq_len": 32}}
    hub = start_local_hub(tmp_path / "hub", {"users": {"pruning-bot": {"orgs": ["pruners"]}},
                                              "tokens": {alice: {"user": "alice", "role": "write"},
                                                         bot_token: {"user": "pruning-bot", "role": "write"}}})
    try:
        with online_on_one_thread():
            api = HfApi(endpoint=hub.url, token=alice)
            push(api, "alice/sparse-src", tiny_source(tmp_path / "src"))
            with Bot(bot_config(tmp_path, hub.url, [{"repo": "alice/sparse-src", "recipes": [recipe]}]),
                     token=bot_token) as bot:
                bot.poller.poll_once()
                drain(bot)
                job = bot.store.jobs()[0]
                assert job.state == "done", job
            out = Path(api.snapshot_download("pruners/sparse-src-sparsity-50pct", local_dir=tmp_path / "variant"))
    finally:
        hub.stop()
    for k, t in _tensors(out).items():
        if ".layers." in k and k.endswith("proj.weight"):
            assert ((t != 0).reshape(t.shape[0], -1, 4).sum(-1) == 2).all(), k
    card = (out / "README.md").read_text()
    assert "## Sparsity" in card and "50.00% of the decoder-block linear weights are" in card
    assert yaml.safe_load((out / RECIPE_FILE).read_text())["result"]["sparsity"]["sparsity"] == 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, IDS), logits(core.load_pruned(str(out)), IDS))


def test_space_builds_a_sparsity_recipe_from_its_form():
    from space.forms import Form, build_recipe, method_names, needs_calibration, options_yaml, score_choices

    assert "sparsity" in method_names()
    assert ("SparseGPT (reconstruction with weight update) · uses data", "sparsegpt") in score_choices("sparsity")
    assert "pattern: unstructured" in options_yaml("sparsity")
    form = Form(method="sparsity", score="sparsegpt", target_kind="ratio", target_value="0.5",
                options_yaml="pattern: 2:4\n")
    recipe = build_recipe(form, None)
    assert recipe.options == {"pattern": 124} and needs_calibration("sparsity", "sparsegpt")
    core.prune(tiny_model("llama"), None, recipe.replace(score="magnitude"))


def test_space_job_runs_sparsity_and_shows_the_zeros(tmp_path, src):
    """A whole Space job: the same parameter count is not 'nothing removed'; the page shows the measured zeros."""
    pytest.importorskip("fastapi")
    from space import handlers
    from space.forms import Form
    from space.jobs import JobQueue, ResultStore
    from space.settings import Settings

    settings = Settings(default_model=src, default_model_label="tiny", on_space=False, allow_local_paths=True,
                        work_dir=tmp_path / "work", eval_tokens=128, eval_length=64, generation_tokens=4)
    store = ResultStore(keep=1, root=settings.work_dir)
    try:
        form = Form(method="sparsity", score="magnitude", target_value="0.5", options_yaml="pattern: 2:4\n")
        events = list(handlers.run_job(form, settings, store, JobQueue(), "s1"))
        kind, res = events[-1][0], events[-1][1]
        assert kind == "done", res
        assert res.sparsity == 0.5 and res.evidence.removed_fraction == 0
        assert "50.0% of the decoder-block linear weights set to zero" in handlers.done_status(res)
        assert res.suggest_repo(None).endswith("-sparsity-50pct")
        html = handlers.chart_markdown(res)
        assert "non-zero linear weights" in html and html.count(">50.0%</div>") == 4
        for k, t in _tensors(res.folder).items():
            if ".layers." in k and k.endswith("proj.weight"):
                assert ((t != 0).reshape(t.shape[0], -1, 4).sum(-1) == 2).all(), k
    finally:
        store.close()


# -- the command line ---------------------------------------------------------------------------------------------

def test_cli_sparsegpt_two_four_done_when(tmp_path, src, capsys):
    out = tmp_path / "out"
    code = main(["prune", str(src), "--method", "sparsity", "--score", "sparsegpt", "--pattern", "2:4",
                 "--calib-samples", "4", "--calib-seq-len", "32", "--out", str(out), "--json"])
    assert code == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["recipe"]["target"]["ratio"] == 0.5 and payload["result"]["sparsity"]["sparsity"] == 0.5
    for k, t in _tensors(out).items():
        if ".layers." in k and k.endswith("proj.weight"):
            assert ((t != 0).reshape(t.shape[0], -1, 4).sum(-1) == 2).all(), k
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # dense: nothing for transformers to decompress
    described = config["pruning_sparsity"]
    assert described["format"] == "dense" and described["structure"] == "2:4" and described["sparsity"] == 0.5
    assert described["targets"] == sorted(f"{part}.{p}_proj" for part, names in
                                          (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for p in names)
    assert described["layers"] == [0.5] * 4 and described["zeros"] * 2 == described["linear_weights"]
    in_memory = core.run_recipe(core.Recipe.from_file(out / RECIPE_FILE), stream=False)  # the same run, kept
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.pruning_sparsity == described
    _same_weights(reloaded, in_memory.model)
    torch.testing.assert_close(logits(reloaded, IDS), logits(in_memory.model, IDS))


def test_cli_then_compressed_and_inspect(tmp_path, src, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(src), "--method", "maw", "--ratio", "0.25", "--then",
                 "sparsity score=magnitude pattern=2:4", "--compressed", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mlp_width (maw) -> sparsity (magnitude, 2:4)" in text and "compressed weights" in text
    # transformers 5 cannot decompress the layout: the CLI and the card say to load it with core.load_pruned
    layout = next(line for line in text.splitlines() if line.startswith("layout"))
    assert "core.load_pruned" in layout and "from_pretrained" not in layout
    card = (out / "README.md").read_text()
    assert "Checkpoint layout: compressed sparse weights" in card and "random weights" in card
    assert "AutoModelForCausalLM.from_pretrained(" not in card
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sparsity"]["format"] == "sparse-24-bitmask"
    assert [entry["sparsity"] for entry in info["sparsity"]["layers"]] == [0.5] * 4
    assert info["sparsity"]["disk_bytes"] < info["sparsity"]["dense_bytes"] - info["sparsity"]["index_bytes"]
    recipe = tmp_path / "stack.yaml"
    recipe.write_text(STACK)
    assert main(["prune", str(src), "--recipe", str(recipe), "--out", str(tmp_path / "again"), "-q"]) == 0
    torch.testing.assert_close(logits(core.load_pruned(str(tmp_path / "again")), IDS),
                               logits(core.load_pruned(str(out)), IDS))


@pytest.mark.parametrize("argv,match", [
    (["--method", "sparsity", "--pattern", "2:4", "--ratio", "0.3"], "disagrees"),
    (["--method", "maw", "--ratio", "0.2", "--compressed"], "sparsity stage"),
    (["--method", "maw", "--ratio", "0.2", "--then", "sparsity score=wanda"], "no target"),
    (["--method", "maw", "--ratio", "0.2", "--then", "ratio=0.5"], "method first"),
])
def test_cli_bad_sparsity_input(tmp_path, src, capsys, argv, match):
    assert main(["prune", str(src), *argv, "--out", str(tmp_path / "out")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_speed_on_cpu_says_there_is_no_speedup(src, capsys):
    assert main(["eval", str(src), "--speed", "--no-ppl", "--prompt-tokens", "8", "--new-tokens", "2",
                 "--repeats", "1"]) == 0
    assert "no speed-up on CPU" in capsys.readouterr().out


# -- the 2:4 kernel decision (what `eval --speed` converts on a GPU) ----------------------------------------------

@pytest.mark.parametrize("kwargs,reason", [
    ({}, None),
    ({"device_type": "cpu"}, "not a CUDA device"),
    ({"capability": (7, 5)}, "below 8.0"),
    ({"dtype": torch.float32}, "float16 or bfloat16"),
    ({"shape": (80, 64)}, "multiple of 32x64"),
    ({"shape": (64, 96)}, "multiple of 32x64"),
    ({"two_four": False}, "not 2:4"),
])
def test_semi_structured_eligibility(kwargs, reason):
    args = dict(shape=(128, 256), dtype=torch.bfloat16, device_type="cuda", capability=(8, 0), two_four=True)
    got = ineligible_reason(**{**args, **kwargs})
    assert got is None if reason is None else reason in got


def test_conversion_plan_skips_the_head_and_dense_linears():
    result = _sparse()
    model = result.model
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.fill_(1.0)  # dense again
    plan = {p["name"]: p["reason"] for p in conversion_plan(model, capability=(9, 0))}
    assert "lm_head" not in plan and len(plan) == 28
    assert all("not a CUDA device" in r for r in plan.values())  # CPU tensors
    assert sparse_kernel_speed(model, lambda m: {})["converted"] == 0
