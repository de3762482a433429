"""How much memory a prune needs, from the config and the recipe alone (no weights are read): for the README
table, the Space (shown before a run) and the bot (job resources).

The streamed path (core.streaming) holds one decoder block at a time, so its peak is about

    runtime + resident tensors + one block's working set + calibration hidden states (+ head and logits)

where the block's working set is the block in the compute dtype, the rebuilt block surgery makes next to it, its
copy in the source dtype while it is written, the float copies a score makes of the largest projections, one
batch's activations, the method's statistics and, for MLP pruning with data, the recordings of the calibration
forward that spare a second one (core.replay; at most the block's size). The in-memory path holds the whole model
in the compute dtype plus the same working set. Figures are estimates (within ~20% of the benchmarks in
bench/results); they are meant for planning, not as limits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .layer_config import head_dim, layer_shapes
from .replay import kept_bytes

GIB = 2**30
RUNTIME = {"cpu": int(0.7 * GIB), "cuda": int(0.6 * GIB)}  # Python + torch + transformers; CUDA context on GPU

_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a prune needs on its compute device (and in CPU memory for offloaded hidden states)."""

    device: str  # 'cpu' or 'cuda'
    compute_dtype: str
    source_dtype: str
    params: int
    model_bytes: int  # the whole model in the in-memory path's compute dtype (what --no-stream holds)
    block_bytes: int  # the largest decoder block in the compute dtype
    working_bytes: int  # one block's working set (see the module doc)
    hidden_bytes: int  # calibration hidden states between blocks
    logits_bytes: int  # output head and logits, for methods that need whole-model logits
    resident_bytes: int  # runtime, embedding rows, norms
    offload_hidden: bool
    disk_bytes: int  # the source checkpoint's size (the output is at most this)

    @property
    def streamed_bytes(self) -> int:
        """Peak on the compute device when streaming (hidden states excluded when offloaded to CPU)."""
        hidden = 0 if self.offload_hidden and self.device != "cpu" else self.hidden_bytes
        return self.resident_bytes + self.working_bytes + hidden + self.logits_bytes

    @property
    def in_memory_bytes(self) -> int:
        """Peak when the whole model is loaded (the in-memory path)."""
        return self.resident_bytes + self.model_bytes + self.working_bytes - self.block_bytes + self.hidden_bytes \
            + self.logits_bytes

    @property
    def cpu_bytes(self) -> int:
        """CPU memory besides the device's: offloaded hidden states (GPU runs) or everything (CPU runs)."""
        if self.device == "cpu":
            return self.streamed_bytes
        return RUNTIME["cpu"] + (self.hidden_bytes if self.offload_hidden else 0)

    def to_dict(self) -> dict:
        return dict(asdict(self), streamed_bytes=self.streamed_bytes, in_memory_bytes=self.in_memory_bytes,
                    cpu_bytes=self.cpu_bytes)

    def describe(self) -> str:
        where = "RAM" if self.device == "cpu" else "GPU memory"
        return (f"needs about {_size(self.streamed_bytes)} of {where} streamed ({self.compute_dtype}, one block of "
                f"{_size(self.block_bytes)} at a time; {_size(self.in_memory_bytes)} if loaded whole) and "
                f"{_size(self.disk_bytes)} of disk for the output")


def _size(n: int) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB else f"{n / 2**20:,.0f} MiB"


def _dtype_name(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).replace("torch.", "")
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(str(dtype), str(dtype))


def compute_dtype_name(dtype: str, device: str, config) -> str:
    """The dtype a prune computes in: as `model_io` chooses it ('auto': float32 on CPU, the checkpoint's on GPU)."""
    if dtype == "source":
        return _dtype_name(getattr(config, "dtype", None) or "float32")
    if dtype and dtype != "auto":
        return _dtype_name(dtype)
    if device.startswith("cpu"):
        return "float32"
    return _dtype_name(getattr(config, "dtype", None) or "bfloat16")


def _needs_data(recipe) -> bool:
    if recipe is None:
        return True
    from .methods import METHODS
    from .prune import normalize

    recipe = normalize(recipe)
    return METHODS.get(recipe.method).needs_data(recipe)


def _copies_nothing(recipe) -> bool:
    """Whether the recipe's score reads the weights in their stored dtype (no float32 copies)."""
    if recipe is None:
        return False
    from .prune import normalize
    from .scores.mlp import STORED_DTYPE_SCORES

    recipe = normalize(recipe)
    return recipe.method == "mlp_width" and recipe.score in STORED_DTYPE_SCORES


def _needs_logits(recipe) -> bool:
    if recipe is None or recipe.method != "depth":
        return False
    from .scores import DEPTH_SCORES
    from .scores.depth import RENAMED

    score = RENAMED.get(recipe.score, recipe.score) or "cosine"
    return score in DEPTH_SCORES and DEPTH_SCORES.get(score).kind == "subnetwork"


def _sparsegpt_bytes(recipe, d: int, m: int, q: int, kv: int) -> int:
    """What SparseGPT holds at the peak of a block (`core.methods.sparsity`, `core.scores.sparsity`): a branch's
    pass keeps the float32 Grams of its linears' inputs, and each group of linears that share an input then adds
    one Cholesky factor of its Gram and the float32 stacked weights with their Z = E R^-1. d: hidden size, m: MLP
    width, q / kv: the query / key-value projection widths. 0 unless a stage runs SparseGPT."""
    if recipe is None or not any(s.method == "sparsity" and s.score == "sparsegpt" for s in recipe.stages()):
        return 0
    attention = d * d + q * q + max(d * d + 2 * (q + 2 * kv) * d, q * q + 2 * d * q)  # q/k/v, then o
    mlp = d * d + m * m + max(d * d + 4 * m * d, m * m + 2 * d * m)  # gate/up, then down
    return 4 * max(attention, mlp)


def estimate_memory(config, recipe=None, device: str = "cpu", dtype: str = "auto",
                    offload_hidden: bool = False) -> MemoryEstimate:
    """The memory a prune of the model described by `config` needs with `recipe` (None: a data-driven score with
    the default calibration, 32 x 128 tokens in batches of 8) on `device` ('cpu' or 'cuda')."""
    from .architectures import spec_for_config
    from .model_io import build_empty
    from .params import count_parameters
    from .prune import normalize

    kind = "cpu" if str(device).startswith("cpu") else "cuda"
    source = _dtype_name(getattr(config, "dtype", None) or "bfloat16")
    data = _needs_data(recipe)
    compute = compute_dtype_name(dtype, kind, config) if data or dtype != "auto" else source  # as run_recipe does
    c, s = _BYTES.get(compute, 4), _BYTES.get(source, 2)
    counts = count_parameters(build_empty(config), spec_for_config(config))
    per_layer = [sum(entry.values()) for entry in counts["layers"]]
    block = max(per_layer) if per_layer else 0
    d = config.hidden_size
    shapes = layer_shapes(config)
    m = max((sh.intermediate_size for sh in shapes), default=0)
    heads = max((sh.num_attention_heads for sh in shapes), default=1)
    kv = max((sh.num_key_value_heads for sh in shapes), default=1)
    dh = head_dim(config)
    vocab = config.vocab_size

    calib = recipe.calibration if recipe is not None else None
    n, t = (calib.n_samples, calib.seq_len) if calib is not None else (32, 128)
    b = min(recipe.batch_size if recipe is not None else 8, n)
    tokens = n * t
    largest = max(d * m, heads * dh * d)  # the largest projection
    working = (2 * block * c + (block * s if c != s else 0)  # the block, its rebuilt copy, its copy to write
               + (0 if _copies_nothing(recipe) else 2 * largest * 4))  # float copies and temporaries of scores
    if data:  # one batch's activations and attention
        working += b * t * (3 * m + 6 * d) * c + b * heads * t * t * c
    method = normalize(recipe).method if recipe is not None else None
    if data and method in (None, "mlp_width", "slimllm"):  # the replay's recordings (core.replay)
        working += kept_bytes(tokens, d, m, c, block, outputs=method == "slimllm")
    working += _sparsegpt_bytes(recipe, d, m, heads * dh, kv * dh)
    if recipe is not None and recipe.method == "slimllm":
        units = heads if recipe.options.get("head_mode") == "query" else kv
        working += 2 * d * d * 8 + d * units * units * 8 + units * b * t * d * 4  # fp64 covariances, contributions
    # hidden states between blocks (and the next ones), attention masks
    hidden = 2 * tokens * d * c + 2 * (n // b + 1) * b * t * t * c if data else 0
    logits = 0
    if _needs_logits(recipe):
        logits = vocab * d * c + 2 * b * t * vocab * 4
        if recipe.options.get("utility") == "logit_distance":
            logits += tokens * vocab * 4  # the full model's logits, kept for the distance
    resident = RUNTIME[kind] + (min(vocab, tokens) * d * c if data else 0) + 4 * d * c
    return MemoryEstimate(
        device=kind, compute_dtype=compute, source_dtype=source, params=counts["total"],
        model_bytes=counts["total"] * _BYTES.get(compute_dtype_name(dtype, kind, config), 4), block_bytes=block * c, working_bytes=int(working), hidden_bytes=int(hidden),
        logits_bytes=int(logits), resident_bytes=int(resident), offload_hidden=offload_hidden,
        disk_bytes=counts["total"] * s)


def available_bytes(device: str = "cpu") -> int | None:
    """Memory free for a new job on `device` (None when unknown): MemAvailable on CPU, free memory on a GPU."""
    if not str(device).startswith("cpu"):
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device if ":" in str(device) else "cuda"))
        return free
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _too_big(params: int, compute: str, device: str) -> str | None:
    needed = params * _BYTES.get(compute, 4) + RUNTIME["cpu" if device.startswith("cpu") else "cuda"]
    free = available_bytes(device)
    if free is None or needed <= 0.9 * free:
        return None
    return f"the model needs {needed / GIB:,.1f} GiB in {compute} on {device}, {free / GIB:,.1f} GiB are free"


def model_too_big(model) -> str | None:
    """For a streamed model: None when it fits whole in its device's free memory, else why not."""
    store = model.core_stream
    params = sum(p.numel() for p in model.parameters())
    return _too_big(params, _dtype_name(store.dtype), str(store.device))


def too_big_for_memory(name: str, opts) -> str | None:
    """None when the whole model fits in the free memory of its device (with 10% to spare), else why not
    (a sentence naming the memory it needs and what is free)."""
    from .model_io import load_config, resolve_device

    if opts.device_map:
        return None  # accelerate places it
    device = resolve_device(opts.device)
    config = load_config(name, opts)
    kind = "cpu" if device.startswith("cpu") else "cuda"
    from .architectures import spec_for_config
    from .model_io import build_empty
    from .params import count_parameters

    compute = compute_dtype_name(opts.dtype, kind, config)
    return _too_big(count_parameters(build_empty(config), spec_for_config(config))["total"], compute, device)


MARGIN = 0.8  # estimates are within ~20%: refuse only when even 80% of one does not fit


def check_fits(config, recipe, device: str, dtype: str, streamed: bool, offload_hidden: bool = False) -> None:
    """Refuse a prune whose memory estimate clearly exceeds the free memory of its device (InsufficientMemoryError,
    naming what it needs and what would need less) instead of crashing or swapping part-way."""
    from .errors import InsufficientMemoryError

    kind = "cpu" if str(device).startswith("cpu") else "cuda"
    est = estimate_memory(config, recipe, kind, dtype, offload_hidden)
    free = available_bytes(device)
    need = est.streamed_bytes if streamed else est.in_memory_bytes
    if free is None or MARGIN * need <= free:
        return
    where = "RAM" if kind == "cpu" else f"memory on {device}"
    if not streamed and MARGIN * est.streamed_bytes <= free:
        raise InsufficientMemoryError(
            f"Loaded whole, this model needs about {_size(need)} of {where} and {_size(free)} are free. Let it "
            f"stream one decoder block at a time (the default: drop --no-stream / --device-map, or stream=True), "
            f"which needs about {_size(est.streamed_bytes)}.")
    parts = f"one block's working set {_size(est.working_bytes)}, calibration hidden states " \
            f"{_size(0 if offload_hidden and kind != 'cpu' else est.hidden_bytes)}"
    if est.logits_bytes:
        parts += f", output head and logits {_size(est.logits_bytes)}"
    raise InsufficientMemoryError(
        f"This prune needs about {_size(est.streamed_bytes)} of {where} even streamed one block at a time ({parts}) "
        f"and {_size(free)} are free. Use fewer calibration tokens (--calib-samples, --calib-seq-len) or a smaller "
        f"--batch-size{', keep hidden states in CPU memory (--offload-hidden)' if kind != 'cpu' else ''}, a score "
        "without whole-model logits (e.g. depth cosine instead of ppl_drop / Shapley), or free some memory.")
