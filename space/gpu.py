"""GPUs for the Space: ZeroGPU (a GPU lent per call by the `spaces` package) and dedicated GPUs (device choice).

On ZeroGPU hardware the work that needs the GPU runs inside a function decorated with `spaces.GPU(duration=...)`:
the platform forks a process that holds a GPU for at most that many seconds (only the time used counts against
the user's quota). `gpu_task` applies the decorator there and nowhere else: without the `spaces` package, or off
ZeroGPU, the function is returned unchanged and runs on the Space's own device (a dedicated GPU when it has one,
else the CPU; `SPACE_DEVICE` picks one explicitly).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, TypeVar

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable)

# a rough budget of GPU seconds per job (an H200 slice, bf16): loading, measuring, pruning and saving grow with the
# weights; the speed measurement and lm-eval add a fixed share. ZeroGPU charges only the time used.
BASE_SECONDS = 30
SECONDS_PER_GB = 6
SPEED_SECONDS = 40
LM_EVAL_SECONDS = 60
RECOVER_SECONDS_PER_GB_STEP = 0.02  # a distillation step of 8 x 128 tokens: teacher forward + student training


def on_zerogpu() -> bool:
    """True on ZeroGPU hardware (the platform sets SPACES_ZERO_GPU, as the `spaces` package reads it)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def has_gpu(device: str | None = None) -> bool:
    """Whether jobs run on a GPU: the chosen device, or (None) ZeroGPU or a visible CUDA device."""
    if device is not None:
        return not device.startswith("cpu")
    if on_zerogpu():
        return True
    import torch

    return torch.cuda.is_available()


def job_seconds(params: int, speed: bool, lm_eval: bool, max_seconds: int, recover_steps: int = 0,
                recover_seconds: float | None = None) -> int:
    """GPU seconds to ask ZeroGPU for one job on a model of `params` parameters (bf16 weights), with
    `recover_steps` recovery steps after pruning (at most `recover_seconds` of them, when given)."""
    gigabytes = 2 * params / 1e9
    recover = RECOVER_SECONDS_PER_GB_STEP * gigabytes * recover_steps
    if recover_seconds is not None:
        recover = min(recover, recover_seconds)
    wanted = BASE_SECONDS + SECONDS_PER_GB * gigabytes + (SPEED_SECONDS if speed else 0) + (
        LM_EVAL_SECONDS if lm_eval else 0) + recover
    if wanted > max_seconds:
        logger.warning("the job may need %.0f s of GPU time; ZeroGPU is asked for the maximum, %d s", wanted,
                       max_seconds)
    return int(min(wanted, max_seconds))


def gpu_task(fn: F, duration: Callable[..., int] | int) -> F:
    """`fn` decorated with `spaces.GPU(duration=duration)` on ZeroGPU; `fn` itself anywhere else.

    `duration` is a number of seconds or a function of `fn`'s arguments. On ZeroGPU, `fn` runs in another
    process: its arguments and what it returns or yields must pickle.
    """
    if not on_zerogpu():
        return fn
    try:
        import spaces
    except ImportError:
        logger.warning("SPACES_ZERO_GPU is set but the `spaces` package is missing: running without ZeroGPU")
        return fn
    return spaces.GPU(duration=duration)(fn)
