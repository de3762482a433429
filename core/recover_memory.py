"""Will recovery training fit? An estimate of what teacher + student training needs on its device, checked before
the teacher is loaded so a run that cannot fit fails at once with the memory it needs.

The estimate: weights of both models, gradients and AdamW's two moments of the trainable parameters, a CPU copy of
the best trainable state, and activations (per token and layer about 16 d + 4 m values without gradient
checkpointing, 2 d with it) plus the logits of student and teacher (five [tokens, vocab] float32 buffers)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InsufficientMemoryError

GiB = 1024 ** 3


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    training_state: int  # gradients + optimizer moments (+ the best-state copy when it lives on the same device)
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.activations

    def describe(self) -> str:
        return (f"{self.total / GiB:.2f} GiB (weights {self.weights / GiB:.2f}, gradients and optimizer "
                f"{self.training_state / GiB:.2f}, activations {self.activations / GiB:.2f})")


def estimate(config, student_params: int, teacher_params: int, trainable_params: int, tokens: int,
             dtype_bytes: int, checkpointing: bool, device: str) -> MemoryEstimate:
    """Bytes needed on `device` for a step of `tokens` tokens (batch x sequence length)."""
    from .layer_config import layer_shapes

    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    m = max(s.intermediate_size for s in layer_shapes(config))
    per_token_layer = 2 * d if checkpointing else 16 * d + 4 * m
    activations = tokens * layers * per_token_layer * dtype_bytes + 5 * tokens * vocab * 4
    state = trainable_params * dtype_bytes * 3  # gradient + two AdamW moments, in the parameters' dtype
    if device.startswith("cpu"):
        state += trainable_params * dtype_bytes  # the best state is copied to CPU memory
    return MemoryEstimate((student_params + teacher_params) * dtype_bytes, state, activations)


def available_bytes(device: str) -> int:
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        import psutil
    except ImportError:  # the command line's own requirements (requirements/core.txt) do not include psutil
        return _available_without_psutil()
    return int(psutil.virtual_memory().available)


def _available_without_psutil() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the free pages the OS reports."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(need: MemoryEstimate, device: str, already_loaded: int = 0, hint: str = "") -> None:
    """Raise when `need` minus what is already loaded (`already_loaded` bytes) exceeds the free memory."""
    free = available_bytes(device)
    if need.total - already_loaded > free:
        raise InsufficientMemoryError(
            f"Recovery training needs about {need.describe()} on {device}, and {free / GiB:.2f} GiB are free "
            f"(besides the {already_loaded / GiB:.2f} GiB already loaded).{hint} Lower recover.batch_size or "
            "recover.seq_len, train LoRA adapters (trainable: lora), turn on gradient checkpointing, or use a "
            "device with more memory.")
