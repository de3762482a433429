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


@dataclass
class HessianFactor:
    """The damped calibration Hessian H + lambda I = R R^T with R upper triangular, stored as `lower` = P R P (P the
    order reversal): the Cholesky factor of P (H + lambda I) P. The upper Cholesky factor of the inverse Hessian that
    SparseGPT works with is U = R^-1 (H^-1 = U^T U); it is never formed (see `sparsegpt`). `dead`: inputs with
    H_jj = 0. Linears that read the same input (q/k/v, gate/up) share one factor."""

    lower: torch.Tensor
    dead: torch.Tensor

    def r(self, rows: slice, cols: slice) -> torch.Tensor:
        """The block R[rows, cols] (a copy)."""
        n = self.lower.shape[0]
        return torch.flip(self.lower[n - rows.stop:n - rows.start, n - cols.stop:n - cols.start], (0, 1))


def hessian_factor(gram: torch.Tensor, damp: float = 0.01) -> HessianFactor:
    """Factor X^T X for SparseGPT: dead inputs (H_jj = 0) get H_jj = 1, lambda = damp * mean(diag H), one Cholesky
    (retried with 10x the dampening while H is not positive definite). Only the upper triangle of `gram` is read
    (the Cholesky factorisation reads the lower triangle of its reversed copy), so `core.stats.InputGram`
    accumulates only that. The factorisation overwrites that copy: one n x n buffer besides `gram`."""
    diag = gram.detach().diagonal().float()
    dead = diag == 0
    step = damp * torch.where(dead, 1.0, diag).mean()
    info = torch.empty((), dtype=torch.int32)
    for attempt in range(6):
        flipped = torch.flip(gram.detach().float(), (0, 1))  # a copy: P H P
        d = flipped.diagonal()
        d[torch.flip(dead, (0,))] = 1.0
        d += step * 10 ** attempt
        # its column-major view, factored as upper: LAPACK writes the factor in place (a row-major call would copy)
        _, info = torch.linalg.cholesky_ex(flipped.mT, upper=True, out=(flipped.mT, info))
        if info == 0 and torch.isfinite(flipped).all():
            return HessianFactor(flipped, dead)
        del flipped  # before the next copy: at most one n x n buffer besides `gram`
    raise torch.linalg.LinAlgError("the calibration Hessian is not positive definite even with 1e5x dampening")


def _group_pruned(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Prune all but the n highest of each column of scores [m, out] (ties: the lower index is kept), as `nm_mask`
    does, by counting for each entry the entries ranked above it, pair by pair (m small: faster than sorting one
    small group at a time). bool [m, out], True = prune."""
    m = scores.shape[0]
    if m > 255:
        return ~nm_mask(scores.T, n, m).T
    rank = torch.zeros(scores.shape, dtype=torch.uint8, device=scores.device)
    rows, ranks = scores.unbind(0), rank.unbind(0)
    for i in range(m):
        for j in range(i + 1, m):
            above = torch.lt(rows[i], rows[j])  # j ranks above i; on a tie i (the lower index) does
            ranks[i].add_(above.view(torch.uint8))
            ranks[j].add_(above.logical_not_().view(torch.uint8))
    return rank >= n


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k lowest entries of a 1-D tensor (ties: the lower index), as a stable argsort would pick
    them, by one selection instead of a sort."""
    threshold = scores.kthvalue(k).values
    low = scores < threshold
    ties = (scores == threshold).nonzero().flatten()[: k - int(low.sum())]
    low[ties] = True
    return low


def _block_quota(i1: int, i2: int, rows: int, ratio: float) -> int:
    """Weights to remove in columns [i1, i2) so that every prefix of blocks removes round(ratio * its size)."""
    return round(ratio * rows * i2) - round(ratio * rows * i1)


def _prune_block(w1t: torch.Tensor, u11: torch.Tensor, pattern: Pattern, quotas: list[tuple[int, int, int]],
                 sub: int = 32) -> torch.Tensor:
    """SparseGPT inside one column block, in place. w1t: the block's weights transposed, [block, out] (a column is a
    contiguous row); u11: the block's [block, block] part of U. Unstructured: in each (first, last, k) output-row
    range of `quotas` (one per weight), the k weights of the block with the lowest w^2 / U_jj^2 are pruned (chosen
    once); N:M: each group of m columns is masked when the loop reaches it, from the weights as updated so far.
    Each column's error e = w * pruned / U_jj is spread over the later columns (rank-1 updates inside sub-blocks of
    `sub` columns, one matmul per sub-block for the rest of the block), and the pruned weights are set to zero.
    Returns the errors e, [block, out]."""
    b = w1t.shape[0]
    d = u11.diagonal()
    err = torch.empty_like(w1t)
    pruned = torch.zeros_like(w1t)  # 1.0 where pruned
    for r1, r2, k in quotas:
        if k:  # ties ordered as in the [out, block] matrix
            flat = _lowest((w1t[:, r1:r2].pow(2) / d.pow(2)[:, None]).T.flatten(), k)
            pruned[:, r1:r2] = flat.view(r2 - r1, b).T
    m = pattern.m
    step = m * max(1, sub // m) if pattern.structured else sub
    w_rows, e_rows, p_rows, diag = w1t.unbind(0), err.unbind(0), pruned.unbind(0), d.tolist()
    for s1 in range(0, b, step):
        s2 = min(s1 + step, b)
        for j in range(s1, s2):
            if pattern.structured and j % m == 0:
                pruned[j:j + m] = _group_pruned(w1t[j:j + m].pow(2) / d[j:j + m, None].pow(2), pattern.n)
            e = torch.div(w_rows[j], diag[j], out=e_rows[j]).mul_(p_rows[j])
            w1t[j:s2].addr_(u11[j, j:s2], e, alpha=-1)  # pruned weights go to (about) zero, kept ones absorb it
        if s2 < b:
            w1t[s2:].addmm_(u11[s1:s2, s2:].T, err[s1:s2], alpha=-1)
    w1t.mul_(pruned.neg_().add_(1))
    return err


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, gram: torch.Tensor | None, pattern: Pattern, ratio: float, block_size: int = 128,
              damp: float = 0.01, factor: HessianFactor | None = None) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023): prune W with an OBS update of the kept weights.

    weight: [out, in]; gram: [in, in] = X^T X (the scale does not matter; only its upper triangle is read), or its
    `hessian_factor` given as `factor`.
    Columns are processed left to right in blocks of `block_size`: inside a block the mask keeps the weights with
    the largest w^2 / [H^-1]_jj^2 (per N:M group, or `ratio` of the block), each pruned weight's error
    w / [H^-1]_jj is spread over the block's later columns (`_prune_block`), and the errors E of all earlier
    blocks reach the block through the upper Cholesky factor U = R^-1 of H^-1: W_k -= (E U)_k. Instead of
    inverting R (n^3/3 flops for the intermediate projection's Hessian), Z = E R^-1 is extended block by block
    (blocked forward substitution): with T = Z_{<k} R_{<k,k}, W_k += T U_kk and Z_k = (E_k - T) U_kk, one matmul
    per block, and only the diagonal blocks U_kk = R_kk^-1 are ever inverted. Returns the new weight (float32,
    zeros where pruned)."""
    if factor is None:
        assert gram is not None, "sparsegpt needs the Gram matrix X^T X or its hessian_factor"
        factor = hessian_factor(gram.to(weight.device), damp)
    return sparsegpt_shared([weight], factor, pattern, ratio, block_size)[0]


@torch.no_grad()
def sparsegpt_shared(weights: list[torch.Tensor], factor: HessianFactor, pattern: Pattern, ratio: float,
                     block_size: int = 128) -> list[torch.Tensor]:
    """`sparsegpt` of several weights that read the same input (q/k/v, gate/up: one Hessian), in one pass over the
    columns: the result of each equals `sparsegpt` of it alone (rows are independent; the unstructured quota is
    counted per weight). One float32 copy of the stacked weights is updated in place; each column block is worked
    on transposed (a column is a contiguous row)."""
    sizes = [w.shape[0] for w in weights]
    w = torch.cat([w.detach().float() for w in weights])  # [sum of out, in]: a new tensor, the result
    rows, cols = w.shape
    if factor.dead.any():
        w[:, factor.dead.to(w.device)] = 0
    z = torch.empty_like(w)  # Z = E R^-1, filled block by block
    eye = torch.eye(block_size, dtype=w.dtype, device=w.device)
    edges = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = slice(i1, i2)
        u11 = torch.linalg.solve_triangular(factor.r(block, block), eye[:i2 - i1, :i2 - i1], upper=True)
        w1t = w[:, block].contiguous().T.contiguous()  # in two steps: several times faster than one strided copy
        v = None
        if i1:  # V = T U_kk with T = Z_<k R_<k,k: W_k += V, and Z_k = E_k U_kk - V below
            v = (z[:, :i1] @ factor.r(slice(0, i1), block)) @ u11
            w1t.add_(v.T)
        quotas = [] if pattern.structured else \
            [(r1, r2, _block_quota(i1, i2, r2 - r1, ratio)) for r1, r2 in zip(edges, edges[1:])]
        err = _prune_block(w1t, u11, pattern, quotas)
        w[:, block] = w1t.T.contiguous()
        zb = torch.mm(err.T, u11)
        z[:, block] = zb if v is None else zb.sub_(v)
    del z
    return list(w.split(sizes))


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
