"""What one job needs from a Ray worker, from the source's config.json and the recipe (no weights are read), and
which worker can give it.

Parameters and layer shapes are counted as `python -m core inspect` counts them (`core.params.count_parameters`
on the model built on the meta device). The memory follows what the bot's build does today: `core.load_model`
loads the whole model in the compute dtype on the CPU and moves it to the job's device, `core.prune` prunes it in
place (one rebuilt block at a time, calibration activations beside it), and the evaluation runs the model once
more. `build_memory` is the one function to swap for the core's estimate of a streamed prune
(`core.memory.estimate_memory`) once the build streams: then a 70B job needs one block's memory, not the model's.

    needs = build_memory(config, recipe, device="cuda", eval_length=256)
    resources = plan(needs, settings, nodes)   # PermanentJobError when no worker can take the job
    task.options(**resources.options())
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from core.layer_config import head_dim, layer_shapes

from .errors import PermanentJobError

GIB = 2**30
RUNTIME = {"cpu": int(0.7 * GIB), "cuda": int(0.6 * GIB)}  # Python + torch + transformers; the CUDA context
MARGIN = 1.1  # allocator slack and what the estimate leaves out
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Needs:
    """Bytes one job needs: on its compute device, and in the worker's RAM."""

    device: str  # 'cpu' or 'cuda'
    dtype: str  # the compute dtype
    params: int
    device_bytes: int
    host_bytes: int  # RAM (the same as device_bytes for CPU jobs)

    def describe(self) -> str:
        where = "RAM" if self.device == "cpu" else "GPU memory"
        extra = "" if self.device == "cpu" else f" and {self.host_bytes / GIB:,.1f} GiB of RAM"
        count = f"{self.params / 1e9:,.2f}B" if self.params >= 1e8 else f"{self.params / 1e6:,.2f}M"
        return f"{count} parameters in {self.dtype}: about {self.device_bytes / GIB:,.1f} GiB of {where}{extra}"


def compute_dtype(config, recipe, device: str) -> str:
    """The dtype the build computes in, as core.model_io picks it ('auto': float32 on CPU, the checkpoint's on GPU)."""
    wanted = _ALIASES.get(recipe.load.dtype, recipe.load.dtype)
    if wanted in _BYTES:
        return wanted
    if device == "cpu":
        return "float32"
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
    return stored.replace("torch.", "") if stored.replace("torch.", "") in _BYTES else "bfloat16"


def build_memory(config, recipe, device: str, eval_length: int = 256) -> Needs:
    """The memory the bot's build of `recipe` on the model of `config` (a transformers config) needs on `device`
    ('cpu' or 'cuda'): the model in the compute dtype, a rebuilt block, the calibration hidden states and one
    batch's activations, the evaluation's logits, the runtime; times a small margin."""
    from core.architectures import spec_for_config
    from core.model_io import build_empty
    from core.params import count_parameters

    kind = "cpu" if device.startswith("cpu") else "cuda"
    dtype = compute_dtype(config, recipe, kind)
    c = _BYTES[dtype]
    counts = count_parameters(build_empty(config), spec_for_config(config))
    block = max((sum(layer.values()) for layer in counts["layers"]), default=0)
    shapes = layer_shapes(config)
    d, vocab = config.hidden_size, config.vocab_size
    m = max((s.intermediate_size for s in shapes), default=0)
    heads = max((s.num_attention_heads for s in shapes), default=1)
    n, t = recipe.calibration.n_samples, recipe.calibration.seq_len
    b = min(recipe.batch_size, n)
    model = counts["total"] * c
    working = 2 * block * c + 2 * max(d * m, heads * head_dim(config) * d) * 4  # a rebuilt block; float scores
    activations = b * t * (3 * m + 6 * d) * c + b * heads * t * t * c + 2 * n * t * d * c  # + hidden states
    evaluation = 3 * eval_length * vocab * 4  # logits of one window, in float32
    device_bytes = int(RUNTIME[kind] + MARGIN * (model + working + activations + evaluation))
    host_bytes = device_bytes if kind == "cpu" else int(RUNTIME["cpu"] + MARGIN * model)  # loaded on CPU first
    return Needs(device=kind, dtype=dtype, params=counts["total"], device_bytes=device_bytes, host_bytes=host_bytes)


@dataclass(frozen=True)
class Resources:
    """What one job's Ray task asks for."""

    num_cpus: float
    num_gpus: float
    memory: int  # bytes of RAM (Ray's `memory` resource)
    accelerator_type: str | None
    needs: Needs

    def options(self) -> dict:
        out = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "memory": self.memory}
        if self.accelerator_type:
            out["accelerator_type"] = self.accelerator_type
        return out

    def to_dict(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "memory_gib": round(self.memory / GIB, 2),
                "accelerator_type": self.accelerator_type,
                "gpu_memory_gib": round(self.needs.device_bytes / GIB, 2) if self.num_gpus else None}


def plan(needs: Needs, settings, nodes: list[dict] | None) -> Resources:
    """The resources to ask for (`settings`: config.RaySettings), or PermanentJobError naming what is missing when
    no worker can take the job: more than `memory_gb` of RAM, more GPU memory than the (largest) GPU type gives,
    or, unless the cluster autoscales, no live node with enough CPUs, GPUs, RAM and the GPU type (`nodes`: the
    `Resources` of Ray's live nodes)."""
    accelerator = None
    if settings.num_gpus > 0:
        kinds = settings.gpu_types or (("", settings.gpu_memory_gb),)
        fitting = [name for name, gb in kinds if needs.device_bytes <= settings.num_gpus * gb * GIB]
        if not fitting:
            name, gb = kinds[-1]
            raise PermanentJobError(
                f"The job fits no worker: it needs {needs.describe()}; the largest GPU "
                f"({name + ', ' if name else ''}{gb:g} GB x {settings.num_gpus:g} per job) is too small. Raise "
                "executor.ray.gpu_memory_gb / gpu_types, or prune this model with a streaming build.")
        accelerator = fitting[0] or None
    memory = max(needs.host_bytes, GIB // 2)
    if settings.memory_gb and memory > settings.memory_gb * GIB:
        raise PermanentJobError(f"The job fits no worker: it needs {needs.describe()}, more than the "
                                f"{settings.memory_gb:g} GiB of RAM a job may get (executor.ray.memory_gb).")
    resources = Resources(num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, memory=memory,
                          accelerator_type=accelerator, needs=needs)
    if nodes is not None and not settings.autoscaling and not any(_fits(resources, node) for node in nodes):
        largest = max(nodes, key=lambda node: node.get("memory", 0), default={})
        raise PermanentJobError(
            f"The job fits no worker of the Ray cluster: it needs {needs.describe()} ({_asked(resources)}); the "
            f"largest node offers {_offered(largest)}. Add a bigger node, or set executor.ray.autoscaling: true "
            "if the cluster starts nodes on demand.")
    return resources


def _fits(resources: Resources, node: dict) -> bool:
    return (node.get("CPU", 0) >= resources.num_cpus and node.get("GPU", 0) >= resources.num_gpus
            and node.get("memory", 0) >= resources.memory
            and (resources.accelerator_type is None
                 or node.get(f"accelerator_type:{resources.accelerator_type}", 0) > 0))


def _asked(resources: Resources) -> str:
    gpu = f", {resources.num_gpus:g} GPU" + (f" {resources.accelerator_type}" if resources.accelerator_type else "") \
        if resources.num_gpus else ""
    return f"{resources.num_cpus:g} CPU{gpu}, {math.ceil(resources.memory / GIB * 10) / 10:g} GiB RAM"


def _offered(node: dict) -> str:
    if not node:
        return "nothing (no live node)"
    types = [k.split(":", 1)[1] for k in node if k.startswith("accelerator_type:")]
    gpu = f", {node.get('GPU', 0):g} GPU" + (f" {'/'.join(types)}" if types else "") if node.get("GPU") else ""
    return f"{node.get('CPU', 0):g} CPU{gpu}, {node.get('memory', 0) / GIB:,.1f} GiB RAM"
