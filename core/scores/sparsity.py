"""Weight-level scores and masks for unstructured and N:M sparsity of one Linear weight.

Shapes: weight W: [out, in]; input_norm: [in], ||X_:,j||_2 over the calibration tokens of the Linear's input;
gram: [in, in], X^T X summed over those tokens; taylor_sq: [out, in], the mean squared first-order Taylor term
(w * dL/dw)^2 of the block's output error (see core/methods/sparsity.py). Scores return [out, in], higher = keep.
`sparsegpt` is not a score but a reconstruction: it returns the pruned *and updated* weight.

Masks are boolean [out, in] tensors, True = keep. N:M groups are M consecutive weights along the input dimension
(the layout sparse tensor cores expect); 2:4 keeps 2 of every 4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import sparsity_score


@dataclass
class LinearTensors:
    weight: torch.Tensor
    input_norm: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    taylor_sq: torch.Tensor | None = None
    seed: int = 0


@dataclass(frozen=True)
class Pattern:
    """Unstructured (n = m = 0) or N:M: keep n of every m consecutive input weights."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def ratio(self) -> float:
        return 1.0 - self.n / self.m if self.m else 0.0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.m else "unstructured"


@sparsity_score("magnitude")
def magnitude(t: LinearTensors) -> torch.Tensor:
    """|W_ij| (compared per layer, per output row, or against one global threshold)."""
    return t.weight.abs()


@sparsity_score("wanda", needs_data=True)
def wanda(t: LinearTensors) -> torch.Tensor:
    """Wanda: |W_ij| * ||X_:,j||_2, compared within each output row."""
    assert t.input_norm is not None, "wanda needs the input norms of the layer"
    return t.weight.abs() * t.input_norm.to(t.weight)[None, :]


@sparsity_score("taylor", needs_data=True)
def taylor(t: LinearTensors) -> torch.Tensor:
    """First-order Taylor |w * dL/dw| of the block's output error (root mean square over random output directions)."""
    assert t.taylor_sq is not None, "taylor needs the accumulated (w * grad)^2 of the layer"
    return t.taylor_sq.sqrt()


@sparsity_score("random")
def random(t: LinearTensors) -> torch.Tensor:
    """Uniform random scores (seeded): the baseline every score should beat."""
    gen = torch.Generator().manual_seed(t.seed)
    return torch.rand(t.weight.shape, generator=gen).to(t.weight.device)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores of every m consecutive inputs of each row (ties: the lower index is kept).

    scores: [out, in] with in % m == 0 -> bool [out, in]."""
    rows, cols = scores.shape
    assert cols % m == 0, f"{cols} inputs do not split into groups of {m}"
    groups = scores.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., :n], True)
    return mask.reshape(rows, cols)


def ratio_mask(scores: torch.Tensor, ratio: float, per_row: bool = False) -> torch.Tensor:
    """Remove the round(ratio * size) lowest scores of the whole matrix, or of each row (ties: lower index first).

    scores: [out, in] -> bool [out, in]."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = round(ratio * scores.shape[1])
        if k:
            order = torch.argsort(scores, dim=1, stable=True)
            mask.scatter_(1, order[:, :k], False)
        return mask
    k = round(ratio * scores.numel())
    if k:
        order = torch.argsort(scores.flatten(), stable=True)
        mask.view(-1)[order[:k]] = False
    return mask


def pattern_mask(scores: torch.Tensor, pattern: Pattern, ratio: float, per_row: bool = False) -> torch.Tensor:
    """The mask of a pattern: N:M groups, or `ratio` of the matrix (or of each row) removed."""
    if pattern.structured:
        return nm_mask(scores, pattern.n, pattern.m)
    return ratio_mask(scores, ratio, per_row)


def _lower_inverse(lower: torch.Tensor) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by 2x2 blocks (matrix products do the work: about 2n^3/3 flops at
    matmul speed, against n^3 for a triangular solve with an identity right-hand side)."""
    n = lower.shape[0]
    if n <= 512:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        return torch.linalg.solve_triangular(lower, eye, upper=False)
    k = n // 2
    a, c = _lower_inverse(lower[:k, :k]), _lower_inverse(lower[k:, k:])
    out = torch.zeros_like(lower)
    out[:k, :k], out[k:, k:] = a, c
    out[k:, :k] = -(c @ (lower[k:, :k] @ a))
    return out


def _inverse_hessian_factor(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + lambda I)^-1 = U^T U, lambda = damp * mean(diag H); dead inputs (H_jj = 0)
    get H_jj = 1. With P the order reversal and P H P = L L^T, U = P L^-1 P: one Cholesky and one triangular
    inverse. Retries with 10x the dampening while H is not positive definite. Returns (U, dead)."""
    h = gram.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.diag(h).mean()
    idx = torch.arange(h.shape[0], device=h.device)
    for attempt in range(6):
        damped = h.clone()
        damped[idx, idx] += damp * (10 ** attempt) * mean_diag
        lower, info = torch.linalg.cholesky_ex(torch.flip(damped, (0, 1)))
        if info == 0:
            upper = torch.flip(_lower_inverse(lower), (0, 1))
            if torch.isfinite(upper).all():
                return upper, dead
    raise torch.linalg.LinAlgError("the calibration Hessian is not positive definite even with 1e5x dampening")


def _block_quota(i1: int, i2: int, rows: int, ratio: float) -> int:
    """Weights to remove in columns [i1, i2) so that every prefix of blocks removes round(ratio * its size)."""
    return round(ratio * rows * i2) - round(ratio * rows * i1)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, gram: torch.Tensor, pattern: Pattern, ratio: float, block_size: int = 128,
              damp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): prune W with an OBS update of the kept weights.

    weight: [out, in]; gram: [in, in] = X^T X (the scale does not matter). Columns are processed left to right in
    blocks of `block_size`: inside a block the mask keeps the weights with the largest w^2 / [H^-1]_jj^2 (per N:M
    group, or `ratio` of the block), each pruned weight's error w / [H^-1]_jj is spread over the block's later
    columns, and the block's errors are propagated to all later columns. Returns the new weight (float32, zeros
    where pruned)."""
    w = weight.detach().float().clone()
    rows, cols = w.shape
    hinv, dead = _inverse_hessian_factor(gram.detach().float().to(w.device), damp)
    w[:, dead] = 0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d = torch.diag(h1)
        prune = torch.zeros_like(w1, dtype=torch.bool)
        k = 0 if pattern.structured else _block_quota(i1, i2, rows, ratio)
        if k:
            order = torch.argsort((w1.pow(2) / d.pow(2)[None, :]).flatten(), stable=True)
            prune.view(-1)[order[:k]] = True
        pruned = prune.to(w1.dtype)
        for j in range(i2 - i1):
            if pattern.structured and j % pattern.m == 0:
                group = w1[:, j:j + pattern.m].pow(2) / d[j:j + pattern.m].pow(2)[None, :]
                pruned[:, j:j + pattern.m] = (~nm_mask(group, pattern.n, pattern.m)).to(w1.dtype)
            e = w1[:, j] * pruned[:, j] / d[j]
            w1[:, j:].addr_(e, h1[j, j:], alpha=-1)  # pruned weights go to (about) zero, kept ones absorb the error
            err[:, j] = e
        w[:, i1:i2] = w1 * (1 - pruned)
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return w


sparsity_score("sparsegpt", needs_data=True, kind="reconstruction")(sparsegpt)


class GlobalThreshold:
    """The k-th smallest |w| over many tensors seen one at a time, exactly, from histograms only (no tensor is
    kept): |w| as float32 is ordered like its int32 bit pattern, so pass 1 counts the high 16 bits of every weight
    and pass 2 (skipped when no weight has low bits, e.g. bf16 checkpoints) the low 16 bits of the weights in the
    bin where the k-th smallest lies. Then `mask` removes every |w| below the threshold and, of the weights equal
    to it, as many as the quota still allows, in the order the tensors are given (lower index first)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.high = torch.zeros(1 << 15, dtype=torch.int64)
        self.low = torch.zeros(1 << 16, dtype=torch.int64)
        self.low_bits = False
        self.bin = -1
        self.value: float | None = None
        self.ties_left = 0

    @staticmethod
    def _bits(w: torch.Tensor) -> torch.Tensor:
        return w.detach().float().abs().flatten().contiguous().view(torch.int32).cpu()

    def count(self, w: torch.Tensor) -> None:
        """Pass 1."""
        bits = self._bits(w)
        self.high += torch.bincount(bits >> 16, minlength=1 << 15)
        self.low_bits = self.low_bits or bool((bits & 0xFFFF).any())

    def _choose_bin(self) -> int:
        if self.bin < 0:
            cum = self.high.cumsum(0)
            self.bin = int(torch.searchsorted(cum, torch.tensor(self.k)))
            self.below_bin = int(cum[self.bin - 1]) if self.bin > 0 else 0
        return self.bin

    @property
    def needs_refine(self) -> bool:
        return self.k > 0 and self.low_bits

    def refine(self, w: torch.Tensor) -> None:
        """Pass 2 (only when `needs_refine`)."""
        bits = self._bits(w)
        in_bin = bits[(bits >> 16) == self._choose_bin()]
        self.low += torch.bincount(in_bin & 0xFFFF, minlength=1 << 16)

    def finish(self) -> None:
        if self.k == 0:
            self.value, self.ties_left = float("-inf"), 0
            return
        b = self._choose_bin()
        if self.low_bits:
            cum = self.below_bin + self.low.cumsum(0)
            low = int(torch.searchsorted(cum, torch.tensor(self.k)))
            below = int(cum[low - 1]) if low > 0 else self.below_bin
        else:
            low, below = 0, self.below_bin
        self.value = float(torch.tensor([(b << 16) | low], dtype=torch.int32).view(torch.float32))
        self.ties_left = self.k - below

    def mask(self, w: torch.Tensor) -> torch.Tensor:
        """bool [w.shape], True = keep. Call on the tensors in the order of the passes."""
        assert self.value is not None, "finish() first"
        a = w.detach().float().abs()
        prune = a < self.value
        if self.ties_left:
            ties = (a == self.value).flatten().nonzero().flatten()[: self.ties_left]
            prune.view(-1)[ties] = True
            self.ties_left -= ties.numel()
        return ~prune
