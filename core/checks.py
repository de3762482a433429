"""Checks of user input that can be made before any model is loaded: devices, sizes, files, model names.

Each raises a `PruningError` whose message says what to pass instead; front ends call them where input enters.
"""
from __future__ import annotations

import codecs
import re
from pathlib import Path

from .errors import CalibrationError, EnvironmentFailure, ModelLoadError, RecipeError

_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT][bB])?\s*")
_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
DTYPES = ("auto", "checkpoint", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def at_least(value: int | float | None, minimum: int | float, flag: str) -> None:
    """`value` (when given) must be >= minimum."""
    if value is not None and value < minimum:
        raise RecipeError(f"{flag} must be at least {minimum} (got {value}).")


def shard_size(text: str | int) -> int:
    """Bytes of a safetensors shard size such as '2GB', '500MB' or 1000000."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise RecipeError(f"Not a shard size: {text!r}. Use e.g. 2GB, 500MB or a number of bytes.")
    size = int(float(match.group(1)) * _UNITS.get((match.group(2) or "").lower(), 1))
    if size < 1:
        raise RecipeError(f"The shard size must be positive (got {text!r}). Use e.g. 2GB.")
    return size


def device(name: str | None) -> str | None:
    """A device this machine has: cpu, cuda, cuda:N, mps (or auto / None for the default)."""
    if name is None or name == "auto":
        return name
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise RecipeError(f"Unknown device {name!r}. Use cpu, cuda, cuda:N (e.g. cuda:1) or mps.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnvironmentFailure(f"--device {name}: no CUDA GPU is available here (torch "
                                     f"{torch.__version__}{'' if torch.version.cuda else ', built without CUDA'}). "
                                     "Use --device cpu, or install a CUDA build of torch on a machine with a GPU.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EnvironmentFailure(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                     f"numbered 0..{torch.cuda.device_count() - 1}.")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise EnvironmentFailure(f"--device {name}: Apple's MPS backend is not available here. Use --device cpu.")
    elif dev.type != "cpu":
        raise RecipeError(f"Device {name!r} is not supported. Use cpu, cuda, cuda:N or mps.")
    return name


def dtype(name: str | None) -> str | None:
    if name is not None and name not in DTYPES:
        raise RecipeError(f"Unknown dtype {name!r}. Use one of {', '.join(DTYPES)}.")
    return name


def looks_like_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is 'name' or 'org/name')."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def model_name(name: str | None) -> None:
    """A local model folder must exist and hold config.json; a Hub id is left to the loader."""
    if not name:
        return
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelLoadError(f"{name} is a file; give the model's folder (the one with config.json and "
                             "*.safetensors) or a Hub id.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            inner = sorted(p.parent.name for p in path.glob("*/config.json"))[:3]
            hint = f" It has model folders inside: {', '.join(inner)}." if inner else ""
            raise ModelLoadError(f"{name} has no config.json, so it is not a model folder.{hint} Give the folder "
                                 "that holds config.json and *.safetensors.")
        return
    if looks_like_path(name):
        raise ModelLoadError(f"No folder {name!r}. Check the path (it is not a Hub id either).")


def text_file(path: str | Path, what: str) -> Path:
    """An existing UTF-8 text file (read once, in pieces, to check the encoding)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CalibrationError(f"{what} {str(p)!r} is a folder; give a text file.")
    if not p.is_file():
        raise CalibrationError(f"{what} {str(p)!r} does not exist.")
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with p.open("rb") as fh:
            while block := fh.read(1 << 20):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CalibrationError(f"{what} {str(p)!r} is not UTF-8 text; convert it to UTF-8.") from None
    except OSError as err:
        raise CalibrationError(f"Cannot read {what.lower()} {str(p)!r}: {err.strerror}.") from None
    return p
