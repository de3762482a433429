"""Statistics collected on one decoder layer during a calibration forward (hooks live only on that layer)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .architectures import ArchSpec
from .pipeline import LayerwiseRunner, _first, forward_hooks


class InputNorms:
    """Accumulates the squared L2 norm over tokens of each input feature of some Linear modules."""

    def __init__(self) -> None:
        self.sq: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0].detach().flatten(0, -2).float()
        acc = x.pow(2).sum(dim=0)
        self.sq[name] = self.sq[name] + acc if name in self.sq else acc

    def norm(self, name: str) -> torch.Tensor:
        return self.sq[name].sqrt()


class InputGram:
    """Accumulates X^T X ([in, in], float32) over the calibration tokens of each watched Linear's input: its upper
    triangle only (the blocks on and above the diagonal; below them stays zero), which is all that SparseGPT's
    factorisation reads."""

    def __init__(self) -> None:
        self.gram: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, module: nn.Module, inputs: tuple, output) -> None:
        x = inputs[0].detach().flatten(0, -2).float()
        if name not in self.gram:
            self.gram[name] = x.new_zeros(x.shape[1], x.shape[1])
        add_upper_gram_(self.gram[name], x)


def add_upper_gram_(acc: torch.Tensor, x: torch.Tensor, width: int = 512) -> None:
    """acc += X^T X on the blocks (of `width` columns) on and above the diagonal: about half the products of the
    full matrix for wide inputs; the blocks below the diagonal are not touched."""
    n = x.shape[1]
    edges = list(range(0, n, width)) + [n]
    for a in range(len(edges) - 1):
        ra = slice(edges[a], edges[a + 1])
        acc[ra, edges[a]:].addmm_(x[:, ra].T, x[:, edges[a]:])


class TaylorSquares:
    """On a decoder block: accumulates (w * dL/dw)^2 of the watched Linears' weights, with L = <r, f(x)> for random
    Gaussian directions r over the block output f(x) (`probes` per batch). In expectation over r this is
    sum over tokens and output features of (w * df/dw)^2: the squared first-order change of the block's output
    when w is removed. Use as `collect(runner, i, {"block": (layer, stats)})` inside `with stats.watching(layer)`.
    """

    def __init__(self, modules: dict[str, nn.Module], probes: int = 8, seed: int = 0) -> None:
        self.modules, self.probes = modules, probes
        self.gen = torch.Generator().manual_seed(seed)
        self.sq: dict[str, torch.Tensor] = {}
        self.samples = 0

    @contextmanager
    def watching(self, block: nn.Module) -> Iterator[None]:
        """Gradients only for the watched weights; the block's forward runs with autograd on (calibration passes
        run under no_grad, so a pre-hook switches it on and the forward hook switches it off again)."""
        saved = [(p, p.requires_grad) for p in block.parameters()]
        for p, _ in saved:
            p.requires_grad_(False)
        for m in self.modules.values():
            m.weight.requires_grad_(True)
        def grad_on(mod, args) -> None:  # a pre-hook's return value would replace the block's inputs
            torch.set_grad_enabled(True)

        handle = block.register_forward_pre_hook(grad_on)
        try:
            yield
        finally:
            handle.remove()
            for p, flag in saved:
                p.requires_grad_(flag)

    def __call__(self, name: str, module: nn.Module, inputs: tuple, output):
        out = _first(output)
        weights = [m.weight for m in self.modules.values()]
        try:
            for k in range(self.probes):
                r = torch.randn(out.shape, generator=self.gen).to(out)
                grads = torch.autograd.grad((out * r).sum(), weights, retain_graph=k < self.probes - 1)
                for key, w, g in zip(self.modules, weights, grads):
                    term = (w.detach().float() * g.float()).pow(2)
                    self.sq[key] = self.sq[key] + term if key in self.sq else term
            self.samples += self.probes
        finally:
            torch.set_grad_enabled(False)
        if isinstance(output, tuple):
            return (out.detach(), *output[1:])
        return out.detach()

    def mean(self, key: str) -> torch.Tensor:
        return self.sq[key] / max(self.samples, 1)


class HeadContributions:
    """Accumulates ||Z_i W_O^i^T||_F^2 per query head i from the input of o_proj (Z: [N, H*dh])."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        self.num_heads, self.head_dim = num_heads, head_dim
        self.sq = torch.zeros(num_heads)

    def __call__(self, name: str, module: nn.Module, inputs: tuple, output) -> None:
        z = inputs[0].detach().flatten(0, -2).float()
        w = module.weight.detach().float()
        dh = self.head_dim
        for h in range(self.num_heads):
            contrib = z[:, h * dh:(h + 1) * dh] @ w[:, h * dh:(h + 1) * dh].T
            self.sq[h] += contrib.pow(2).sum().cpu()

    def norm(self) -> torch.Tensor:
        return self.sq.sqrt()


class BranchOutputs:
    """Keeps the output of a branch module (attention or MLP, after its output norm) for each batch."""

    def __init__(self) -> None:
        self.outputs: list[torch.Tensor] = []

    def __call__(self, name: str, module: nn.Module, inputs: tuple, output) -> None:
        self.outputs.append(_first(output).detach())


def collect(runner: LayerwiseRunner, layer_idx: int, hooks: dict[str, tuple[nn.Module, object]],
            stop_after: nn.Module | None = None) -> list[torch.Tensor] | None:
    """Run block `layer_idx` once with `hooks` ({name: (module, collector)}) attached; returns its outputs.
    With `stop_after` (the last module the hooks need, e.g. o_proj) the forward ends there and returns None."""
    modules = {name: module for name, (module, _) in hooks.items()}
    collectors = {name: collector for name, (_, collector) in hooks.items()}
    with forward_hooks(modules, lambda name, mod, inp, out: collectors[name](name, mod, inp, out)):
        if stop_after is not None:
            return runner.feed(layer_idx, stop_after)
        return runner.run_layer(layer_idx)


def linear(layer: nn.Module, spec: ArchSpec, branch: str, role: str) -> nn.Module:
    """The Linear module of `role` ('q', 'o', 'gate', 'gate_up', 'down', ...) in a decoder layer."""
    part = spec.attention if branch == "attention" else spec.mlp
    return layer.get_submodule(f"{part.module}.{getattr(part, role)}")


class ContributionStats:
    """Streams the moments of unit contributions C_u = Z_u W_O^u^T from the input Z of o_proj.

    units: the query heads of each unit (one head, or the query heads of a KV group).
    """

    def __init__(self, units: list[list[int]], head_dim: int) -> None:
        self.units, self.head_dim = units, head_dim
        self.moments = None

    def __call__(self, name: str, module: nn.Module, inputs: tuple, output) -> None:
        from .scores.slimllm import contribution_moments

        z = inputs[0].detach().flatten(0, -2).float()
        w = module.weight.detach().float()
        dh = self.head_dim
        contribs = []
        for heads in self.units:
            cols = torch.cat([torch.arange(h * dh, (h + 1) * dh) for h in heads]).to(z.device)
            contribs.append(z[:, cols] @ w[:, cols].T)
        batch = contribution_moments(torch.stack(contribs))
        if self.moments is None:
            self.moments = batch
        else:
            self.moments.m1 += batch.m1
            self.moments.m2 += batch.m2
            self.moments.n += batch.n


class OutputCovariance:
    """Streams sum F and F^T F of a module's output (float64) to form the centred covariance F~^T F~."""

    def __init__(self) -> None:
        self.s1 = self.s2 = None
        self.n = 0

    def __call__(self, name: str, module: nn.Module, inputs: tuple, output) -> None:
        f = _first(output).detach().flatten(0, -2).double()
        if module.bias is not None:
            f = f - module.bias.detach().double()
        s1, s2 = f.sum(0), f.T @ f
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += f.shape[0]

    def centred(self) -> torch.Tensor:
        return self.s2 - torch.outer(self.s1, self.s1) / self.n


class PairSums:
    """Per-column sums of x, y, x^2, x*y over tokens, for a least-squares fit y ~ a x + b."""

    def __init__(self) -> None:
        self.sx = self.sy = self.sxx = self.sxy = None
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        parts = (x.sum(0), y.sum(0), (x * x).sum(0), (x * y).sum(0))
        if self.sx is None:
            self.sx, self.sy, self.sxx, self.sxy = parts
        else:
            self.sx, self.sy, self.sxx, self.sxy = (a + b for a, b in zip((self.sx, self.sy, self.sxx, self.sxy), parts))
        self.n += x.shape[0]


class KeptOutputSums(PairSums):
    """On a down projection: x = output of the kept input channels only, y = full output (bias excluded)."""

    def __init__(self, kept: list[int]) -> None:
        super().__init__()
        self.kept = torch.as_tensor(kept)

    def __call__(self, name: str, module: nn.Module, inputs: tuple, output) -> None:
        a = inputs[0].detach().flatten(0, -2).float()
        w = module.weight.detach().float()
        kept = self.kept.to(a.device)
        self.add(a[:, kept] @ w[:, kept].T, a @ w.T)

    def add_recorded(self, inputs: torch.Tensor, outputs: torch.Tensor, module: nn.Module) -> None:
        """The same from a recorded input and output of `module` (core.replay): y = the output without its bias
        (recomputed in float32 when it was recorded in a lower precision), x = y minus the pruned channels' part,
        a product over the pruned channels instead of two over all of them."""
        w = module.weight.detach().float()
        a = inputs.flatten(0, -2).to(w.device).float()
        if outputs.dtype == torch.float32:
            y = outputs.flatten(0, -2).to(w.device)
            if module.bias is not None:
                y = y - module.bias.detach().float()
        else:
            y = a @ w.T
        pruned = torch.ones(w.shape[1], dtype=torch.bool)
        pruned[self.kept] = False
        index = pruned.nonzero().flatten().to(w.device)
        self.add(y - a[:, index] @ w[:, index].T, y)
