"""2:4 sparse linears on GPUs through torch's semi-structured sparse tensors (`to_sparse_semi_structured`:
CUTLASS / cuSPARSELt kernels on the sparse tensor cores of compute capability 8.0+, float16 / bfloat16).

Zeros alone make nothing faster: dense kernels multiply them like any other value. This module is the one path in
the tool that turns 2:4 sparsity into speed; on CPU there is none, and `sparse_kernel_speed` says so. The
decision which linears can be converted (`ineligible_reason`, `conversion_plan`) is plain Python, tested on CPU.
"""
from __future__ import annotations

import statistics

import torch
from torch import nn

CPU_NOTE = ("no speed-up on CPU: unstructured and 2:4 sparsity only zero weights, and dense CPU kernels multiply "
            "the zeros like any other value. 2:4 needs a GPU with sparse tensor cores (compute capability 8.0+).")
MIN_ROWS, MIN_COLS = 32, 64  # the stricter (CUTLASS) float16/bfloat16 bounds, which also satisfy cuSPARSELt


def is_24(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 consecutive input weights."""
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def ineligible_reason(shape: tuple[int, int], dtype: torch.dtype, device_type: str,
                      capability: tuple[int, int] | None, two_four: bool) -> str | None:
    """Why a Linear weight cannot run on 2:4 sparse kernels (None: it can)."""
    if device_type != "cuda":
        return f"on {device_type}, not a CUDA device"
    if capability is None or tuple(capability) < (8, 0):
        return f"compute capability {capability} is below 8.0 (no sparse tensor cores)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {str(dtype).replace('torch.', '')} (the kernels take float16 or bfloat16)"
    rows, cols = shape
    if rows % MIN_ROWS or cols % MIN_COLS:
        return f"shape {rows}x{cols} is not a multiple of {MIN_ROWS}x{MIN_COLS}"
    if not two_four:
        return "not 2:4 sparse"
    return None


def conversion_plan(model: nn.Module, capability: tuple[int, int] | None = None) -> list[dict]:
    """Every Linear of the model but the output head: {name, shape, reason (None = convertible)}."""
    head = model.get_output_embeddings()
    if capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    plan = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        w = module.weight
        reason = ineligible_reason(tuple(w.shape), w.dtype, w.device.type, capability, is_24(w.detach()))
        plan.append({"name": name, "shape": list(w.shape), "reason": reason})
    return plan


class KernelSwap:
    """Keeps each eligible Linear's dense weight and its semi-structured twin, to switch between them."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        from torch.sparse import to_sparse_semi_structured

        self.modules = [model.get_submodule(n) for n in names]
        self.dense = [m.weight for m in self.modules]
        self.sparse = [nn.Parameter(to_sparse_semi_structured(w.detach().contiguous()), requires_grad=False)
                       for w in self.dense]

    def use(self, sparse: bool) -> None:
        for module, d, s in zip(self.modules, self.dense, self.sparse):
            module.weight = s if sparse else d


def sparse_kernel_speed(model: nn.Module, measure, rounds: int = 3) -> dict:
    """Speed of the model with its eligible 2:4 linears on sparse kernels against the same weights on dense ones,
    interleaved (`rounds` x dense then sparse); `measure(model) -> core.speed.measure_speed`-like dict."""
    from .speed import speed_ratios

    device = next(model.parameters()).device
    if device.type != "cuda":
        return {"converted": 0, "note": CPU_NOTE}
    plan = conversion_plan(model)
    names = [p["name"] for p in plan if p["reason"] is None]
    if not names:
        reasons = sorted({p["reason"] for p in plan})
        return {"converted": 0, "linears": len(plan), "note": "no linear can use 2:4 kernels: " + "; ".join(reasons)}
    swap = KernelSwap(model, names)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        swap.use(False)
        dense_logits = model(prompt).logits.float()
        swap.use(True)
        sparse_logits = model(prompt).logits.float()
    runs = []
    try:
        for _ in range(rounds):
            swap.use(False)
            dense = measure(model)
            swap.use(True)
            runs.append(speed_ratios(dense, measure(model)))
    finally:
        swap.use(False)
    ratios = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in runs[0]}
    return {"converted": len(names), "linears": len(plan), "rounds": rounds, "speedup_median": ratios,
            "speedup_range": spread, "max_logit_difference": float((dense_logits - sparse_logits).abs().max())}
