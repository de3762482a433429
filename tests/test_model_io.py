"""Loading options: models in a repo subfolder, and private Hub repos with an explicit token."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from huggingface_hub import HfApi

import core
from conftest import ROOT, hub_client_online, logits
from core import LayerSelection, Recipe, Target
from hub_bot.local_hub import start_local_hub


def test_per_layer_checkpoint_in_a_subfolder_reloads(tiny_dir, tmp_path, tokens):
    src = tiny_dir("llama")
    result = core.run_recipe(Recipe(model=str(src), method="mlp_width", target=Target(ratio=0.25),
                                    layers=LayerSelection(protect_first=1)))
    core.save_pruned(result, tmp_path / "repo" / "pruned" / "maw")
    reloaded = core.load_pruned(str(tmp_path / "repo"), subfolder="pruned/maw", device="cpu")
    torch.testing.assert_close(logits(reloaded, tokens), logits(result.model, tokens), atol=1e-5, rtol=0)


def test_private_repo_loads_with_an_explicit_token_only(tiny_dir, tmp_path):
    token = "hf_owner_write_token_for_test"
    hub = start_local_hub(tmp_path / "hub", {"tokens": {token: {"user": "owner", "role": "write"}}})
    try:
        with hub_client_online():
            api = HfApi(endpoint=hub.url, token=token)
            api.create_repo("owner/secret-tiny", private=True)
            api.upload_folder(repo_id="owner/secret-tiny", folder_path=str(tiny_dir("llama")))
        script = textwrap.dedent(f"""
            import json, sys
            sys.path.insert(0, {str(ROOT)!r})
            import core
            out = {{}}
            try:
                core.load_model("owner/secret-tiny", core.LoadOptions(device="cpu"))
                out["anonymous"] = "loaded"
            except core.PruningError as err:
                out["anonymous"] = type(err).__name__
            model, tok = core.load_model("owner/secret-tiny", core.LoadOptions(device="cpu", token={token!r}))
            out["with_token"] = sum(p.numel() for p in model.parameters())
            out["tokenizer"] = tok is not None
            out["repr_hides_token"] = {token!r} not in repr(core.LoadOptions(token={token!r}))
            print("RESULT " + json.dumps(out))
        """)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"))
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
        out = json.loads(line[len("RESULT "):])
    finally:
        hub.stop()
    assert out["anonymous"] == "ModelLoadError"
    assert out["with_token"] > 0 and out["tokenizer"] and out["repr_hides_token"]
    assert token not in proc.stderr
