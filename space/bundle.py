"""Assemble a folder that can be uploaded as a Hugging Face Space: this folder's README.md (the Space front matter)
and an `app.py` at the root, the `space` and `core` packages, the reference model and its texts.

    python -m space.bundle out/space
"""
from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "screenshot.png")
REFERENCE = ("model", "corpus/calibration.txt", "corpus/eval.txt", "corpus/README.md", "tasks/pydoc_cloze.yaml",
             "tasks/pydoc_cloze.jsonl")
# requirements lines left out: tests, benchmarks and comments (the Space SDK installs gradio itself)
NOT_ON_SPACE = ("pytest", "playwright", "fastapi", "uvicorn", "gradio", "psutil", "matplotlib", "optipfair", "# ")
APP = '"""Entry point of the Space (see space/app.py)."""\nfrom space.app import main\n\nmain()\n'

logger = logging.getLogger(__name__)


def bundle(out: Path) -> Path:
    if out.exists():
        raise SystemExit(f"{out} already exists; give a new folder.")
    if not (ROOT / "reference" / "model" / "config.json").is_file():
        raise SystemExit("reference/model has no config.json: train or restore the reference model first.")
    out.mkdir(parents=True)
    shutil.copytree(ROOT / "core", out / "core", ignore=SKIP)
    shutil.copytree(ROOT / "space", out / "space", ignore=SKIP)
    for rel in REFERENCE:
        src, dst = ROOT / "reference" / rel, out / "reference" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=SKIP) if src.is_dir() else shutil.copyfile(src, dst))
    shutil.copyfile(ROOT / "space" / "README.md", out / "README.md")
    (out / "app.py").write_text(APP, encoding="utf-8")
    lines = (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()
    keep = [line for line in lines if not line.strip().lower().startswith(NOT_ON_SPACE)]
    keep += ["# Sign in with Hugging Face (gradio[oauth])", "authlib", "itsdangerous",
             "# ZeroGPU hardware (a no-op on any other hardware)", "spaces"]
    (out / "requirements.txt").write_text("\n".join(keep) + "\n", encoding="utf-8")
    logger.info("wrote %s", out)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m space.bundle", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="new folder to write the Space into")
    bundle(parser.parse_args().out)


if __name__ == "__main__":
    main()
