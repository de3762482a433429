"""Statistics collected on one decoder layer during a calibration forward (hooks live only on that layer)."""
from __future__ import annotations

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


def collect(runner: LayerwiseRunner, layer_idx: int, hooks: dict[str, tuple[nn.Module, object]]) -> list[torch.Tensor]:
    """Run block `layer_idx` once with `hooks` ({name: (module, collector)}) attached; returns its outputs."""
    modules = {name: module for name, (module, _) in hooks.items()}
    collectors = {name: collector for name, (_, collector) in hooks.items()}
    with forward_hooks(modules, lambda name, mod, inp, out: collectors[name](name, mod, inp, out)):
        return runner.run_layer(layer_idx)


def linear(layer: nn.Module, spec: ArchSpec, branch: str, role: str) -> nn.Module:
    """The Linear module of `role` ('q', 'o', 'gate', 'gate_up', 'down', ...) in a decoder layer."""
    part = spec.attention if branch == "attention" else spec.mlp
    return layer.get_submodule(f"{part.module}.{getattr(part, role)}")
