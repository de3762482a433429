"""`python -m hub_bot demo` end to end (about a minute on CPU). Marked slow: the default run leaves it out and
.ci/run runs it in its slow step (`python -m pytest -q -m slow -n 2 --dist loadfile`)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_publishes_and_loads_two_variants(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    proc = subprocess.run([sys.executable, "-m", "hub_bot", "demo", "--workdir", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| pruners/")]
    assert len(lines) == 2 and all("core.load_pruned" in ln for ln in lines)
    assert "equal logits" in proc.stdout
    assert "2 variant(s) published and loaded by name" in proc.stdout
    assert not re.search(r"hf_[A-Za-z0-9]{34}", proc.stdout + proc.stderr)  # the demo's tokens are never logged


@pytest.mark.slow
def test_demo_on_ray_publishes_every_variant_once(tmp_path):
    """`demo --executor ray`: two sources x two recipes as Ray tasks on a local Ray instance of two workers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env["RAY_memory_monitor_refresh_ms"] = "0"  # Ray's OOM killer counts the shared test machine's memory
    proc = subprocess.run([sys.executable, "-m", "hub_bot", "demo", "--executor", "ray", "--workdir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("| pruners/")]) == 4
    assert "4 variant(s) published and loaded by name" in proc.stdout
    assert "bot commits per variant: [1, 1, 1, 1]" in proc.stdout
    assert not re.search(r"hf_[A-Za-z0-9]{34}", proc.stdout + proc.stderr)
