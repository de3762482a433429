"""The newcomer probe (issue 11): bad inputs, damaged files, a full disk and signals, each through `python -m core`
as a real subprocess. Every case must end with the expected exit status and one `error:` line (or one
`interrupted` line), no traceback, nothing on stdout, and nothing left in its folder or next to the inputs.

The cases run a few at a time; each takes one interpreter start (torch and transformers imports), so the module
is marked slow (CI runs it in its slow step). `test_cli_errors.py` covers the same items in-process.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import ROOT, save_tiny, tiny_model

pytestmark = pytest.mark.slow

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))


@dataclass
class Case:
    name: str
    argv: list[str]  # {w} = the shared inputs folder, {d} = this case's own folder
    code: int = 2
    expect: str = ""  # a substring of the error line
    setup: str = ""  # what to put into the case folder first: 'out' (an existing output), 'model' (a model copy)
    limit_file_size: int | None = None  # RLIMIT_FSIZE in bytes: writing more fails like a full disk
    keep: list[str] = field(default_factory=list)  # names the case folder may hold afterwards


P = ["prune", "{w}/src", "--out", "{d}/out"]


def option_case(method: str, option: str, expect: str) -> Case:
    return Case(f"option {option}", P + ["--method", method, "--ratio", "0.25", "--option", option], expect=expect)


def calib_case(name: str, source: str, expect: str) -> Case:
    return Case(name, P + ["--method", "mlp_width", "--score", "activation", "--ratio", "0.5", "--calib", source],
                expect=expect)


CASES = [
    Case("unknown method", P + ["--method", "mlp_widht", "--ratio", "0.5"], expect="Did you mean 'mlp_width'?"),
    Case("no method", P + ["--ratio", "0.5"], expect="No method given"),
    Case("no target", P + ["--method", "maw"], expect="No target given"),
    Case("ratio above 1", P + ["--method", "maw", "--ratio", "1.5"], expect="ratio must be in [0, 1)"),
    Case("ratio 0", P + ["--method", "maw", "--ratio", "0"], expect="removes nothing"),
    Case("ratio not a number", P + ["--method", "maw", "--ratio", "abc"], expect="invalid float value: 'abc'"),
    Case("heads ratio that rounds to nothing", P + ["--method", "attention_heads", "--ratio", "0.25"],
         expect="Nearest achievable ratios of the KV groups: 0.5"),
    Case("depth ratio below one block", P + ["--method", "depth", "--ratio", "0.05"], expect="0.25 (1 of 4)"),
    Case("width of the whole MLP", P + ["--method", "maw", "--width", "96"], expect="removes nothing"),
    Case("bad target count", P + ["--method", "maw", "--target-params", "lots"], expect="not a parameter count"),
    option_case("depth", "samples=abc", "Option samples must be integer >= 2"),
    option_case("depth", "iterative=maybe", "Option iterative must be true/false"),
    option_case("slimllm", "alpha=abc", "Option alpha must be number or null > 0"),
    option_case("depth", "layers=abc", "Option layers must be list of int"),
    Case("layers flag not a list", P + ["--method", "depth", "--ratio", "0.25", "--layers", "a,b"],
         expect="expected whole numbers separated by commas"),
    Case("unknown option", P + ["--method", "attention_heads", "--ratio", "0.5", "--option", "mdoe=query"],
         expect="Did you mean 'mode'?"),
    Case("shard size", P + ["--method", "maw", "--ratio", "0.5", "--max-shard-size", "abc"],
         expect="Not a shard size"),
    Case("unknown device", P + ["--method", "maw", "--ratio", "0.5", "--device", "foo"], expect="Unknown device"),
    Case("unknown dtype", P + ["--method", "maw", "--ratio", "0.5", "--dtype", "float64"], expect="Unknown dtype"),
    Case("missing local model", ["prune", "./no/such/model", "--method", "maw", "--ratio", "0.5", "--out",
                                 "{d}/out"], expect="No folder './no/such/model'"),
    Case("empty model folder", ["prune", "{w}/empty", "--method", "maw", "--ratio", "0.5", "--out", "{d}/out"],
         expect="has no config.json"),
    Case("model is a file", ["prune", "{w}/src/config.json", "--method", "maw", "--ratio", "0.5", "--out",
                             "{d}/out"], expect="is a file"),
    Case("unsupported architecture", ["prune", "{w}/gpt2", "--method", "maw", "--ratio", "0.5", "--out", "{d}/out"],
         expect="'gpt2' is not supported"),
    Case("pickle weights", ["prune", "{w}/pickled", "--method", "maw", "--ratio", "0.5", "--out", "{d}/out"],
         expect="--allow-pickle"),
    Case("truncated weights", ["prune", "{w}/truncated", "--method", "maw", "--ratio", "0.5", "--out", "{d}/out"],
         expect="damaged, truncated or not safetensors"),
    Case("random bytes as weights", ["prune", "{w}/random", "--method", "maw", "--ratio", "0.5", "--out",
                                     "{d}/out"], expect="damaged, truncated or not safetensors"),
    Case("config and weights disagree", ["prune", "{w}/mismatch", "--method", "maw", "--ratio", "0.5", "--out",
                                         "{d}/out"], expect="do not have the shapes"),
    Case("malformed recipe", ["prune", "--recipe", "{w}/malformed.yaml", "--out", "{d}/out"],
         expect="is not valid YAML"),
    Case("binary recipe", ["prune", "--recipe", "{w}/binary.yaml", "--out", "{d}/out"], expect="not a UTF-8 text"),
    Case("missing recipe", ["prune", "--recipe", "{w}/none.yaml", "--out", "{d}/out"], expect="Cannot read recipe"),
    Case("recipe is a folder", ["prune", "--recipe", "{w}/src", "--out", "{d}/out"], expect="is a folder"),
    calib_case("missing calibration", "{w}/none.txt", "does not exist"),
    calib_case("calibration folder", "{w}", "is a folder"),
    calib_case("calibration not UTF-8", "{w}/latin1.jsonl", "not UTF-8"),
    calib_case("calibration bad JSON", "{w}/bad.jsonl", "is not valid JSON"),
    calib_case("calibration empty", "{w}/empty.txt", "has 0 tokens"),
    Case("existing output", P + ["--method", "maw", "--ratio", "0.5"], setup="out", keep=["out"],
         expect="already exists"),
    Case("overwrite the input model", ["prune", "{d}/model", "--method", "maw", "--ratio", "0.5", "--out",
                                       "{d}/model", "--overwrite"], setup="model", keep=["model"],
         expect="overwriting it would delete it"),
    Case("unwritable output", ["prune", "{w}/src", "--method", "maw", "--ratio", "0.5", "--out", "/sys/pruned"],
         code=1, expect="Cannot write into /sys"),
    Case("output under a file", ["prune", "{w}/src", "--method", "maw", "--ratio", "0.5", "--out",
                                 "{w}/empty.txt/out"], code=1, expect="is not a folder"),
    Case("disk full while writing", P + ["--method", "maw", "--ratio", "0.5"], code=1, limit_file_size=300_000,
         expect="Ran out of disk space"),
    Case("eval window 0", ["eval", "{w}/src", "--max-length", "0"], expect="--max-length must be at least 2"),
    Case("eval stride too long", ["eval", "{w}/src", "--max-length", "32", "--stride", "64"],
         expect="--stride 64 is larger than --max-length 32"),
    Case("eval batch 0", ["eval", "{w}/src", "--batch-size", "0"], expect="--batch-size must be at least 1"),
    Case("eval repeats 0", ["eval", "{w}/src", "--speed", "--repeats", "0"], expect="--repeats must be at least 1"),
    Case("eval text not UTF-8", ["eval", "{w}/src", "--ppl", "{w}/latin1.txt"], expect="is not UTF-8 text"),
    Case("eval text missing", ["eval", "{w}/src", "--ppl", "{w}/none.txt"], expect="does not exist"),
    Case("eval compare missing", ["eval", "{w}/src", "--compare", "./gone/model"], expect="No folder"),
    Case("inspect empty folder", ["inspect", "{w}/empty"], expect="has no config.json"),
    Case("unknown command", ["prnue"], expect="invalid choice"),
]
if not torch.cuda.is_available():
    CASES.append(Case("cuda without a GPU", P + ["--method", "maw", "--ratio", "0.5", "--device", "cuda"], code=1,
                      expect="no CUDA GPU is available"))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """The inputs every case reads: a tiny model, damaged copies of it, bad recipe and text files."""
    from transformers import AutoModelForCausalLM, GPT2Config

    w = tmp_path_factory.mktemp("probe-inputs")
    src = save_tiny(tiny_model("llama"), w / "src")
    (w / "empty").mkdir()
    for name in ("truncated", "random", "mismatch"):
        shutil.copytree(src, w / name)
    weights = (src / "model.safetensors").read_bytes()
    (w / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    (w / "random" / "model.safetensors").write_bytes(os.urandom(50_000))
    config = json.loads((src / "config.json").read_text())
    (w / "mismatch" / "config.json").write_text(json.dumps(dict(config, intermediate_size=80)))
    pickled = w / "pickled"
    tiny_model("llama").config.save_pretrained(pickled)
    torch.save(tiny_model("llama").state_dict(), pickled / "pytorch_model.bin")
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
                                     ).save_pretrained(w / "gpt2")
    (w / "malformed.yaml").write_text("method: [maw\ntarget: {ratio: 0.5\n")
    (w / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00")
    (w / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (w / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (w / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (w / "empty.txt").write_text("  \n")
    return w


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run(case: Case, world: Path, folder: Path) -> str | None:
    """None if the case behaves, else what went wrong."""
    folder.mkdir()
    if case.setup == "out":
        (folder / "out").mkdir()
        (folder / "out" / "keep.txt").write_text("an earlier output")
    if case.setup == "model":
        shutil.copytree(world / "src", folder / "model")
    before = _listing(folder)
    argv = [a.format(w=world, d=folder) for a in case.argv]

    def limits() -> None:
        if case.limit_file_size:
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.limit_file_size, case.limit_file_size))

    proc = subprocess.run([sys.executable, "-m", "core", *argv], cwd=folder, env=ENV, capture_output=True, text=True,
                          timeout=600, preexec_fn=limits)
    problems = []
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    if proc.returncode != case.code:
        problems.append(f"exit {proc.returncode}, expected {case.code}")
    if "Traceback" in proc.stderr:
        problems.append("a traceback")
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    elif case.expect not in errors[0]:
        problems.append(f"message {errors[0]!r} lacks {case.expect!r}")
    if proc.stdout:
        problems.append(f"stdout {proc.stdout[:200]!r}")
    if _listing(folder) != before:
        problems.append(f"left behind {sorted(set(_listing(folder)) - set(before))}")
    return f"{case.name}: {'; '.join(problems)}\n  stderr: {proc.stderr[-800:]}" if problems else None


def test_every_bad_input_is_one_clear_line_and_leaves_nothing(world, tmp_path):
    inputs = _listing(world)
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(lambda ic: _run(ic[1], world, tmp_path / f"case{ic[0]}"), enumerate(CASES)))
    failures = [o for o in outcomes if o]
    assert not failures, f"{len(failures)} of {len(CASES)} cases misbehave:\n" + "\n".join(failures)
    assert _listing(world) == inputs  # nothing written next to the inputs either


# -- signals --------------------------------------------------------------------------------------------------------

# Runs the CLI with one seam: after the output is fully written into its temporary folder (or at the first
# progress update of pruning), the process announces it in a file and sleeps, so the test can signal it there.
PAUSE = """
import os, sys, time, pathlib
import core.export, core.progress
where = os.environ["PAUSE_AT"]
def pause():
    pathlib.Path(os.environ["PAUSE_READY"]).write_text("ready")
    time.sleep(300)
if where == "write":
    real = core.export._write
    def write(*args, **kwargs):
        real(*args, **kwargs)
        pause()
    core.export._write = write
else:
    real_update = core.progress.Progress.update
    def update(self, *args):
        real_update(self, *args)
        pause()
    core.progress.Progress.update = update
from core.cli import main
sys.exit(main())
"""


def _paused(argv: list[str], where: str, ready: Path, cwd: Path) -> subprocess.Popen:
    env = dict(ENV, PAUSE_AT=where, PAUSE_READY=str(ready))
    proc = subprocess.Popen([sys.executable, "-c", PAUSE, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached its pause"
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("sig,code,where", [(signal.SIGTERM, 143, "write"), (signal.SIGINT, 130, "write"),
                                            (signal.SIGINT, 130, "prune"), (signal.SIGTERM, 143, "prune")])
def test_interrupts_clean_up_and_say_one_line(world, tmp_path, sig, code, where):
    work = tmp_path / "work"
    work.mkdir()
    proc = _paused(["prune", str(world / "src"), "--method", "maw", "--ratio", "0.5", "--out", str(work / "out")],
                   where, tmp_path / "ready", work)
    if where == "write":
        assert any(p.name.endswith(".tmp") for p in work.iterdir())  # caught mid-write: the temporary folder exists
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()][-1] == (
        f"interrupted ({sig.name}): stopped; nothing half-written was left behind")
    assert out == ""
    assert list(work.iterdir()) == []


def test_interrupted_overwrite_keeps_the_previous_output(world, tmp_path):
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "model.txt").write_text("the previous output")
    proc = _paused(["prune", str(world / "src"), "--method", "maw", "--ratio", "0.5", "--out", str(work / "out"),
                    "--overwrite"], "write", tmp_path / "ready", work)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert [p.name for p in work.iterdir()] == ["out"]
    assert [p.name for p in (work / "out").iterdir()] == ["model.txt"]


def test_a_killed_run_leaves_a_temporary_folder_that_the_next_run_removes(world, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = _paused(["prune", str(world / "src"), "--method", "maw", "--ratio", "0.5", "--out", str(work / "out")],
                   "write", tmp_path / "ready", work)
    proc.send_signal(signal.SIGKILL)  # cannot be caught: the partial output stays for now
    proc.communicate(timeout=120)
    left = [p.name for p in work.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".out.{proc.pid}.") and left[0].endswith(".tmp")
    assert (work / left[0] / "model.safetensors").is_file()
    done = subprocess.run([sys.executable, "-m", "core", "prune", str(world / "src"), "--method", "maw", "--ratio",
                           "0.5", "--out", str(work / "other"), "-q"], cwd=work, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # -q: nothing but errors
    assert sorted(p.name for p in work.iterdir()) == ["other"]


def test_a_normal_run_shows_no_library_noise(world, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "core", "prune", str(world / "src"), "--method", "maw", "--ratio",
                           "0.5", "--layer-ratios", "0,0.5,0.25,0", "--out", str(tmp_path / "o")], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    noise = [line for line in lines if not (line.startswith("INFO core") or "|" in line)]  # our log + progress bars
    assert not noise, noise
    assert "per-layer" in proc.stdout
