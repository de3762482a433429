"""Scores of gated-MLP neurons. Neuron j is (row j of W_gate, row j of W_up, column j of W_down).

Shapes: gate, up: [m, d]; down: [d, m]; input_norm: [d] (L2 norm over calibration tokens of the MLP input);
act_norm: [m] (L2 norm of the down_proj input, i.e. act(gate x) * up x). Every function returns a [m] tensor.
"""
from __future__ import annotations

import torch

from . import mlp_score


class MlpTensors:
    """One gated MLP's weights and the statistics its scores read.

    `gate`, `up`, `down` are the weights in float32, each cast on its first read: a model held in a narrower dtype
    (a bf16 checkpoint streamed in its own dtype) pays for the copies only of the matrices a score reads.
    `stored(name)` is a weight as the model holds it, for scores that are exact in any dtype (row maxima, minima).
    """

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 input_norm: torch.Tensor | None = None, act_norm: torch.Tensor | None = None, seed: int = 0) -> None:
        self._stored = {"gate": gate, "up": up, "down": down}
        self._float: dict[str, torch.Tensor] = {}
        self.input_norm, self.act_norm, self.seed = input_norm, act_norm, seed
        self.extra: dict = {}  # what a score's `stats` collected (e.g. gradients), set by the method

    def stored(self, name: str) -> torch.Tensor:
        return self._stored[name]

    def _as_float(self, name: str) -> torch.Tensor:
        if name not in self._float:
            self._float[name] = self._stored[name].float()
        return self._float[name]

    gate = property(lambda self: self._as_float("gate"))
    up = property(lambda self: self._as_float("up"))
    down = property(lambda self: self._as_float("down"))


STORED_DTYPE_SCORES = ("maw", "maw_range")  # scores that read no float32 copy (for core.memory's estimate)


def _row_extremes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and min of each row, in float32. Taken in the stored dtype: a maximum is one of the values, so it is
    exact in any dtype and equals the float32 computation bit for bit, without a float32 copy of the matrix."""
    return w.amax(dim=1).float(), w.amin(dim=1).float()


@mlp_score("maw")
def maw(t: MlpTensors) -> torch.Tensor:
    """Maximum absolute weight: max_i |W_g[j,i]| + max_i |W_u[j,i]|."""
    def max_abs(w: torch.Tensor) -> torch.Tensor:
        hi, lo = _row_extremes(w)
        return torch.maximum(hi, -lo)

    return max_abs(t.stored("gate")) + max_abs(t.stored("up"))


@mlp_score("maw_range")
def maw_range(t: MlpTensors) -> torch.Tensor:
    """Max plus |min| of each row: (max W_g[j] + |min W_g[j]|) + (same for W_u)."""
    def spread(w: torch.Tensor) -> torch.Tensor:
        hi, lo = _row_extremes(w)
        return hi + lo.abs()

    return spread(t.stored("gate")) + spread(t.stored("up"))


@mlp_score("vow")
def vow(t: MlpTensors) -> torch.Tensor:
    """Variance of weights: var(W_g[j,:]) + var(W_u[j,:])."""
    return t.gate.var(dim=1, unbiased=False) + t.up.var(dim=1, unbiased=False)


@mlp_score("pon")
def pon(t: MlpTensors) -> torch.Tensor:
    """Product of norms: ||W_g[j,:]||_1 * ||W_u[j,:]||_1."""
    return t.gate.abs().sum(dim=1) * t.up.abs().sum(dim=1)


@mlp_score("l2")
def l2(t: MlpTensors) -> torch.Tensor:
    """L2 norms of the neuron's three weight vectors: ||W_g[j]|| + ||W_u[j]|| + ||W_d[:,j]||."""
    return t.gate.norm(dim=1) + t.up.norm(dim=1) + t.down.norm(dim=0)


@mlp_score("random")
def random(t: MlpTensors) -> torch.Tensor:
    """Uniform random scores (seeded): the baseline every score should beat."""
    gen = torch.Generator().manual_seed(t.seed)
    return torch.rand(t.gate.shape[0], generator=gen).to(t.gate.device)


@mlp_score("activation", needs_data=True)
def activation(t: MlpTensors) -> torch.Tensor:
    """Wanda-style: sum over the three matrices of |W| weighted by the L2 norm of that matrix's input."""
    assert t.input_norm is not None and t.act_norm is not None, "activation score needs calibration statistics"
    inputs = (t.gate.abs() + t.up.abs()) @ t.input_norm
    return inputs + t.down.abs().sum(dim=0) * t.act_norm
