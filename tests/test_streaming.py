"""Streaming (core.streaming): a streamed prune equals the in-memory one bit for bit, for every method and family,
with sharded, tied, bf16 and fp16 sources; one block is in memory at a time; changed blocks are re-read as changed;
failures (interrupts, a full disk) leave nothing behind."""
from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

import core
import core.cli
from conftest import FAMILIES, logits, save_tiny, tiny_model
from core import CalibrationConfig, LayerSelection, Recipe, Stage, Target
from core.architectures import spec_for_config
from core.errors import DiskFullError
from core.layers import decoder_layers, layer_at
from core.methods import METHODS
from core.prune import normalize
from core.blocks import BlockStore
from core.streaming import drop_head, is_streamed, open_streamed
from core.surgery import LayerPlan, prune_layer

CALIB = CalibrationConfig(n_samples=4, seq_len=32)

# one case per method and per path through it (weights only, data-driven, removal, recovery, utilities)
CASES = {
    "mlp_weights": dict(method="maw_range", target=Target(ratio=0.25)),
    "mlp_activation": dict(method="mlp_width", score="activation", target=Target(ratio=0.25),
                           layers=LayerSelection(protect_first=1)),
    "heads_activation": dict(method="attention_heads", score="activation", target=Target(ratio=0.5)),
    "slimllm": dict(method="slimllm", target=Target(ratio=0.3)),
    "depth_blocks": dict(method="depth", target=Target(ratio=0.25)),
    "depth_blocks_recovery": dict(method="depth", options={"recovery": "mean_update"}, target=Target(ratio=0.5)),
    "depth_mlp_recovery_pruned": dict(method="depth", target=Target(ratio=0.5),
                                      options={"unit": "mlp", "recovery": "mean_update", "recovery_source": "pruned"}),
    "depth_attention_iterative": dict(method="depth", options={"unit": "attention", "iterative": True},
                                      target=Target(ratio=0.5)),
    "depth_shapley_logits": dict(method="depth", score="shapley", target=Target(ratio=0.25),
                                 options={"utility": "logit_distance", "samples": 4}),
    "depth_ppl_drop": dict(method="depth", score="ppl_drop", target=Target(ratio=0.25)),
    "sparsegpt_2_4": dict(method="sparsity", score="sparsegpt", target=Target(ratio=0.5), options={"pattern": "2:4"}),
    "magnitude_global": dict(method="sparsity", score="magnitude", target=Target(ratio=0.6),
                             options={"scope": "global"}),
    "taylor_unstructured": dict(method="sparsity", score="taylor", target=Target(ratio=0.5)),
    "maw_then_wanda_2_4": dict(method="maw", target=Target(ratio=0.25),
                               then=(Stage(method="sparsity", score="wanda", target=Target(ratio=0.5),
                                           options={"pattern": "2:4"}),)),
}
# the default run: every case on llama (tied, GQA); the cases that fold, remove and keep constant layers on the
# families with fused projections (phi3) and output norms (gemma3); every other combination in the slow run
DEFAULT = [(c, "llama") for c in CASES] + [(c, f) for f in ("phi3", "gemma3")
                                          for c in ("slimllm", "depth_blocks_recovery")]
FULL = [(c, f) for f in FAMILIES for c in CASES if (c, f) not in DEFAULT]


def _loaded(layer) -> bool:
    params = list(layer.parameters())
    return bool(params) and not any(p.is_meta for p in params)


def _tensors(folder):
    out = {}
    for path in folder.glob("*.safetensors"):
        out.update(load_file(path))
    return out


def _both(src, tmp_path, case: dict, **stream_kwargs):
    """Prune `src` in memory and streamed; returns both results and output folders."""
    recipe = Recipe(model=str(src), calibration=CALIB, **case)
    mem = core.run_recipe(recipe, stream=False)
    mem_out = core.save_pruned(mem, tmp_path / "memory")
    streamed = core.run_recipe(recipe, stream=True, out_dir=tmp_path / "streamed", **stream_kwargs)
    assert is_streamed(streamed.model)
    str_out = core.save_pruned(streamed, tmp_path / "streamed")
    return mem, mem_out, streamed, str_out


def _assert_same(mem, mem_out, streamed, str_out, tokens):
    assert streamed.report == mem.report  # the same units chosen (scores, removed units, per-layer sizes)
    assert streamed.layers() == mem.layers()
    assert streamed.params_after == mem.params_after
    a, b = _tensors(mem_out), _tensors(str_out)
    assert a.keys() == b.keys()
    for name in a:  # the same kept rows and columns, the same values, the same dtype
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((mem_out / "config.json").read_text()) == json.loads((str_out / "config.json").read_text())
    # reloaded outputs (in float32 on CPU) compute the same logits; for a float32 source they are also the
    # in-memory model's (a half-precision export rounds what the in-memory model holds in float32)
    expected = logits(core.load_pruned(str(mem_out), device="cpu", dtype="auto"), tokens)
    torch.testing.assert_close(logits(core.load_pruned(str(str_out), device="cpu", dtype="auto"), tokens), expected, atol=1e-5,
                               rtol=0)
    if next(iter(a.values())).dtype == torch.float32:
        torch.testing.assert_close(logits(mem.model, tokens), expected, atol=1e-5, rtol=0)
    # the streamed result now streams from its output and computes the same logits
    torch.testing.assert_close(logits(streamed.model, tokens), expected, atol=1e-5, rtol=0)


def test_every_method_has_a_streaming_case():
    """A new method (e.g. sparsity) must get a case here: streaming is its default path."""
    covered = {normalize(Recipe(calibration=CALIB, **case)).method for case in CASES.values()}
    assert set(METHODS) <= covered, f"add streaming cases for {sorted(set(METHODS) - covered)}"


@pytest.mark.parametrize("fam", FAMILIES)
@torch.no_grad()
def test_streamed_forward_equals_the_loaded_model(tiny_dir, fam, tokens):
    src = tiny_dir(fam)
    loaded = core.load_model(str(src), core.LoadOptions(device="cpu"))[0]
    streamed = open_streamed(src)
    torch.testing.assert_close(logits(streamed, tokens), logits(loaded, tokens), atol=1e-5, rtol=0)
    layers = decoder_layers(streamed, spec_for_config(streamed.config))
    assert sum(_loaded(layer) for layer in layers) == 1  # the last one used
    drop_head(streamed)  # the head (tied: the embedding) came in for the logits, and goes
    assert streamed.get_input_embeddings().weight.is_meta  # embedding rows are read per forward, never the whole


@pytest.mark.parametrize("case,fam", DEFAULT)
def test_streamed_prune_equals_in_memory(tiny_dir, tmp_path, case, fam, tokens):
    _assert_same(*_both(tiny_dir(fam), tmp_path, CASES[case]), tokens)


@pytest.mark.slow
@pytest.mark.parametrize("case,fam", FULL)
def test_streamed_prune_equals_in_memory_full_matrix(tiny_dir, tmp_path, case, fam, tokens):
    if fam == "llama_mha" and "query" in str(CASES[case]):
        pytest.skip("no GQA groups")
    _assert_same(*_both(tiny_dir(fam), tmp_path, CASES[case]), tokens)


@pytest.mark.parametrize("dtype,case", [
    (torch.bfloat16, "slimllm"), (torch.float16, "depth_blocks_recovery"),
    (torch.bfloat16, "mlp_weights"),  # weight-only: blocks stay in bf16 while streaming, the result is the same
    pytest.param(torch.float16, "slimllm", marks=pytest.mark.slow),
    pytest.param(torch.bfloat16, "depth_blocks_recovery", marks=pytest.mark.slow),
    pytest.param(torch.bfloat16, "mlp_activation", marks=pytest.mark.slow)])
def test_half_precision_sources(tmp_path, dtype, case, tokens):
    """Computed in float32, written back in the source dtype; folded regression scales and recovery biases (not
    representable in the source dtype) are re-read exactly, so the result equals the in-memory one bit for bit."""
    src = save_tiny(tiny_model("qwen2").to(dtype), tmp_path / "src")
    seen = set()
    init = BlockStore.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.after_load = lambda i, store=self: seen.add(store.dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlockStore, "__init__", record)
        mem, mem_out, streamed, str_out = _both(src, tmp_path, CASES[case])
    assert {t.dtype for t in _tensors(str_out).values()} == {dtype}
    # weight-only methods stream blocks in the source dtype; the result computes in float32 like any other
    assert seen == {dtype if case == "mlp_weights" else torch.float32}
    assert streamed.model.core_stream.dtype == torch.float32
    _assert_same(mem, mem_out, streamed, str_out, tokens)


def test_tensors_of_one_block_split_across_shards(tmp_path, tokens):
    model = tiny_model("gemma3")
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    save_tiny(model, tmp_path / "unused")  # the tokenizer files
    for f in (tmp_path / "unused").glob("tokenizer*"):
        f.rename(tmp_path / "src" / f.name)
    weight_map = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())["weight_map"]
    block0 = {file for name, file in weight_map.items() if name.startswith("model.layers.0.")}
    assert len(block0) > 1, "block 0's tensors must be spread over several shards for this test"
    for case in ("mlp_activation", "depth_blocks_recovery"):
        _assert_same(*_both(tmp_path / "src", tmp_path / case, CASES[case]), tokens)


@pytest.mark.parametrize("fam,tied", [("llama", True), ("qwen2", False)])
def test_tied_and_untied_heads(tiny_dir, tmp_path, fam, tied, tokens):
    mem, mem_out, streamed, str_out = _both(tiny_dir(fam), tmp_path, CASES["mlp_weights"])
    assert ("lm_head.weight" in _tensors(str_out)) is not tied
    _assert_same(mem, mem_out, streamed, str_out, tokens)


def test_one_block_in_memory_at_a_time(tiny_dir):
    """Through every pass of SlimLLM (similarity, then pruning with two regressions) and depth with recovery."""
    for case in ("slimllm", "depth_shapley_logits"):
        model, tokenizer = core.load_model(str(tiny_dir("llama")), core.LoadOptions(device="cpu", stream=True))
        layers = decoder_layers(model, spec_for_config(model.config))
        seen = []

        def count(i, layers=layers, seen=seen):  # blocks holding weights (stand-ins hold none)
            seen.append(sum(_loaded(layer) for layer in layers))

        model.core_stream.after_load = count
        result = core.prune(model, tokenizer, Recipe(calibration=CALIB, **CASES[case]))
        assert seen and max(seen) == 1, (case, seen)
        assert model.core_stream.loads >= 2 * model.config.num_hidden_layers  # several passes did stream
        result.model.core_stream.close()


@torch.no_grad()
def test_a_changed_block_is_reread_as_changed(tiny_dir, tokens):
    model = open_streamed(tiny_dir("llama"))
    spec = spec_for_config(model.config)
    layers, store = decoder_layers(model, spec), model.core_stream
    prune_layer(model, spec, 0, LayerPlan(mlp=list(range(0, 96, 2))))  # loads block 0, rebuilds it
    pruned = {k: v.clone() for k, v in layers[0].state_dict().items()}
    layers[1]  # releases block 0: written
    assert store.writes == 1 and store.origins[0].reader is not store.source
    assert all(p.is_meta for p in layer_at(layers, 0).parameters())
    again = layers[0].state_dict()  # read back from the written block, not from the source
    assert again.keys() == pruned.keys() and all(torch.equal(again[k], pruned[k]) for k in pruned)
    assert again["mlp.down_proj.weight"].shape[1] == 48
    down = layers[2].mlp.down_proj.weight
    before = down.clone()
    down.mul_(2)  # an in-place change is detected too
    layers[3]
    assert torch.equal(layers[2].mlp.down_proj.weight, 2 * before)
    writes = store.writes
    layers[3], layers[2]  # loading and releasing an unchanged block writes nothing
    assert store.writes == writes
    store.close()


def test_whole_model_logits_read_each_block_once_per_call(tiny_dir):
    from core.pipeline import model_logits

    model = open_streamed(tiny_dir("llama"))
    ids = torch.randint(0, 4096, (5, 16), generator=torch.Generator().manual_seed(0))
    loads = model.core_stream.loads
    batches = list(model_logits(model, spec_for_config(model.config), ids, batch_size=2))
    assert len(batches) == 3
    assert model.core_stream.loads - loads == model.config.num_hidden_layers


def test_offloaded_hidden_states_give_the_same_result(tiny_dir, tmp_path, tokens):
    _assert_same(*_both(tiny_dir("phi3"), tmp_path, CASES["slimllm"], offload_hidden=True), tokens)


def test_interrupted_prune_leaves_nothing(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    work = tmp_path / "work"
    work.mkdir()

    def interrupt(stage, done, total):
        if done == 3:
            raise KeyboardInterrupt

    recipe = Recipe(model=str(src), method="maw_range", target=Target(ratio=0.25))
    with pytest.raises(KeyboardInterrupt):
        core.run_recipe(recipe, progress=interrupt, out_dir=work / "out")
    assert list(work.iterdir()) == []
    result = core.run_recipe(recipe, out_dir=work / "out")
    assert any(work.iterdir())  # the run's blocks wait in the output's temporary folder
    write = BlockStore.write_weights

    def write_then_interrupt(self, *args):
        write(self, *args)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:  # Ctrl-C while saving, after the weights were written
        mp.setattr(BlockStore, "write_weights", write_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            core.save_pruned(result, work / "out")
    assert list(work.iterdir()) == []


def test_full_disk_gives_a_clear_error_and_leaves_nothing(tiny_dir, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    src = tiny_dir("llama")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("core.weights.shutil.disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(DiskFullError, match="disk space"):
        core.run_recipe(Recipe(model=str(src), method="maw_range", target=Target(ratio=0.25)),
                        out_dir=tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == []
    code = core.cli.main(["prune", str(src), "--method", "maw", "--ratio", "0.25", "--out", str(tmp_path / "out")])
    assert code == 1 and "Not enough disk space" in capsys.readouterr().err  # a problem of the machine
    assert [p.name for p in tmp_path.iterdir()] == []
    monkeypatch.undo()

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", enospc)
    with pytest.raises(DiskFullError, match="filled up"):
        core.run_recipe(Recipe(model=str(src), method="maw_range", target=Target(ratio=0.25)),
                        out_dir=tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_publishing_in_another_dtype(tiny_dir, tmp_path):
    """A result written in another dtype than its source's (the bot's publish_dtype): written blocks are converted,
    exactly as the in-memory export converts."""
    src = tiny_dir("qwen2")
    recipe = Recipe(model=str(src), calibration=CALIB, **CASES["depth_blocks_recovery"])
    outs = []
    for stream in (False, True):
        result = core.run_recipe(recipe, stream=stream)
        result.model.source_dtype = torch.float16
        outs.append(_tensors(core.save_pruned(result, tmp_path / str(stream))))
    assert outs[0].keys() == outs[1].keys() and {t.dtype for t in outs[1].values()} == {torch.float16}
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_a_reopened_result_keeps_its_work_folder_through_garbage_collection(tiny_dir, tmp_path):
    """A weight-only streamed prune reopens its model in the compute dtype; the old store, once collected, must not
    delete the work folder that holds the written blocks (a finalizer stays bound to the object it was made for)."""
    import gc

    result = core.run_recipe(Recipe(model=str(tiny_dir("llama")), method="maw", target=Target(ratio=0.5)),
                             out_dir=tmp_path / "out")
    work = result.model.core_stream.work
    assert work is not None and work.is_dir()
    gc.collect()
    assert work.is_dir()
    out = core.save_pruned(result, tmp_path / "out")
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


@pytest.mark.parametrize("case,streams", [
    (dict(method="maw", target=Target(ratio=0.5)), True),
    (dict(method="mlp_width", score="activation", target=Target(ratio=0.5)), True),
    (dict(method="mlp_width", score="taylor", target=Target(ratio=0.5)), False),  # gradients of the whole model
    (dict(method="depth", target=Target(ratio=0.25), options={"recovery": "mean_update"}), True),
    (dict(method="depth", target=Target(ratio=0.25), options={"recovery": "learned_bias"}), False),
])
def test_recipes_that_need_the_whole_model_are_loaded_whole(tiny_dir, case, streams):
    recipe = normalize(Recipe(calibration=CALIB, **case))
    assert METHODS.get(recipe.method).streams(recipe) is streams
    if not streams:
        with pytest.raises(core.errors.RecipeError, match="cannot stream"):
            core.run_recipe(recipe.replace(model=str(tiny_dir("llama"))), stream=True)


def test_the_next_streamed_prune_removes_the_work_folder_of_a_killed_run(tiny_dir, tmp_path, monkeypatch):
    """A run killed with SIGKILL cannot delete its work folder (blocks written under the temp folder when there is
    no output folder yet); its name carries the process id, so the next streamed prune removes it."""
    import os
    import subprocess
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f".core-stream.{gone.pid}.0123456789ab.tmp"
    (left / "blocks").mkdir(parents=True)
    (left / "blocks" / "block-000000.safetensors").write_bytes(b"x" * 100)
    running = tmp_path / f".core-stream.{os.getppid()}.0123456789ab.tmp"  # a live process's: kept
    running.mkdir()
    result = core.run_recipe(Recipe(model=str(tiny_dir("llama")), method="maw", target=Target(ratio=0.5)))
    work = result.model.core_stream.work
    assert work.parent == tmp_path and work.name.startswith(f".core-stream.{os.getpid()}.")
    assert not left.exists() and running.is_dir()
    result.model.core_stream.close()
    assert not work.exists()
