"""SlimLLM mathematics (Guo et al., ICML 2025), as pure functions of streamed statistics.

Heads are scored from per-column moments of their contributions C_u = Z_u W_O^u^T (N x d):
M1[u, k] = sum_t C_u[t, k], M2[k, u, v] = sum_t C_u[t, k] C_v[t, k], n = number of tokens. The Pearson similarity
of X = sum_u a_u C_u and Y = sum_u C_u is then sum_k |a^T Cov_k 1| / sqrt(a^T Cov_k a * 1^T Cov_k 1) with
Cov_k = M2[k]/n - M1[:, k] M1[:, k]^T / n^2, which equals the definition on the explicit matrices (population
moments) without ever storing N x d activations per head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12


@dataclass
class ContributionMoments:
    """Per-column first and second moments of U unit contributions over n tokens (float64)."""

    m1: torch.Tensor  # [U, d]
    m2: torch.Tensor  # [d, U, U]
    n: int

    def covariance(self) -> torch.Tensor:
        """Cov_k for every column k: [d, U, U] (population)."""
        mean = self.m1.T / self.n  # [d, U]
        return self.m2 / self.n - mean[:, :, None] * mean[:, None, :]


def contribution_moments(contributions: torch.Tensor) -> ContributionMoments:
    """Moments of explicit contributions [U, N, d] (used on one calibration batch; batches add up)."""
    c = contributions.double()
    units = c.shape[0]
    m2 = c.new_empty(c.shape[2], units, units)
    for u in range(units):  # one product per pair: several times faster than einsum's batched [U, N] @ [N, U]
        for v in range(u, units):
            m2[:, u, v] = m2[:, v, u] = (c[u] * c[v]).sum(dim=0)
    return ContributionMoments(c.sum(dim=1), m2, c.shape[1])


def pearson_from_cov(cxy: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor) -> torch.Tensor:
    """sum_k |rho_k| from per-column covariance and variances (last dim = columns); dead columns count 0."""
    denom = (vx.clamp_min(0) * vy.clamp_min(0)).sqrt()
    rho = torch.where(denom > _EPS, cxy / denom.clamp_min(_EPS), torch.zeros_like(cxy))
    return rho.abs().sum(dim=-1)


def pearson_similarity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """P(X, Y) = sum over columns of |Pearson correlation over rows| for explicit [N, d] matrices."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return pearson_from_cov((x * y).mean(0), (x * x).mean(0), (y * y).mean(0))


def subset_similarity(cov: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """P(sum_{u in keep} C_u, Y) for a 0/1 (or weight) vector `keep` [U] from Cov [d, U, U]."""
    keep = keep.to(cov.dtype)
    col = cov.sum(dim=-1)  # Cov_k 1: [d, U]
    cxy = col @ keep
    vx = torch.einsum("u,duv,v->d", keep, cov, keep)
    return pearson_from_cov(cxy, vx, col.sum(dim=-1))


def leave_one_out(cov: torch.Tensor) -> torch.Tensor:
    """s_u = P(Y - C_u, Y) for every unit: [U]. High = the unit is unimportant."""
    col = cov.sum(dim=-1)  # [d, U]
    vy = col.sum(dim=-1)  # [d]
    diag = torch.diagonal(cov, dim1=1, dim2=2)  # [d, U]
    cxy = vy[:, None] - col
    vx = vy[:, None] - 2 * col + diag
    return pearson_from_cov(cxy.T, vx.T, vy[None, :])


def greedy_search(cov: torch.Tensor, scores: torch.Tensor, k: int, groups: torch.Tensor | None = None,
                  greedy: bool = True) -> tuple[list[int], float, float]:
    """SlimLLM Algorithm 1. Returns (kept units, similarity of the plain ranking, similarity after the search).

    Candidates to prune are the k units with the highest leave-one-out similarity `scores`; each candidate p in
    turn tries to replace each kept unit j (all trials from the same kept set; the best improving swap wins; a
    swapped-out unit is dropped). With `groups` [U], candidates are chosen per group (same count in each) and
    swaps stay inside a group. Each trial costs O(d): the sums are updated incrementally.
    """
    n_units = cov.shape[-1]
    if groups is None:
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        candidates, kept = order[:k], order[k:]
    else:
        candidates, kept = [], []
        per_group = k // int(groups.max().item() + 1)
        for g in groups.unique().tolist():
            members = [u for u in torch.argsort(scores, descending=True, stable=True).tolist() if groups[u] == g]
            candidates += members[:per_group]
            kept += members[per_group:]
    col = cov.sum(dim=-1)  # [d, U]
    vy = col.sum(dim=-1)
    diag = torch.diagonal(cov, dim1=1, dim2=2)
    keep = torch.zeros(n_units, dtype=cov.dtype)
    keep[kept] = 1
    cxy = col @ keep
    ca = torch.einsum("duv,v->du", cov, keep)  # Cov_k a
    vx = (ca * keep).sum(dim=-1)
    start = best = pearson_from_cov(cxy, vx, vy).item()
    if not greedy:
        return sorted(kept), start, start
    for p in candidates:
        slots = [j for j in range(len(kept)) if groups is None or groups[kept[j]] == groups[p]]
        if not slots:
            continue
        js = torch.tensor([kept[j] for j in slots])
        t_cxy = cxy[None, :] - col[:, js].T + col[:, p][None, :]
        t_vx = (vx[None, :] - 2 * ca[:, js].T + 2 * ca[:, p][None, :] + diag[:, js].T + diag[:, p][None, :]
                - 2 * cov[:, js, p].T)
        values = pearson_from_cov(t_cxy, t_vx, vy[None, :])
        idx = int(torch.argmax(values))
        if values[idx].item() > best:
            j = js[idx].item()
            best = values[idx].item()
            cxy, vx = t_cxy[idx], t_vx[idx]
            ca = ca - cov[:, :, j] + cov[:, :, p]
            kept[slots[idx]] = p
    return sorted(kept), start, best


def feature_space_importance(w_down: torch.Tensor, act_norm: torch.Tensor, output_cov: torch.Tensor | None,
                             smooth: bool = True) -> torch.Tensor:
    """Id_j = ||A_j|| * ||D[j, :]||, D_jk = |w_j^T v_k| s_k (eqs. 5-7), computed as ||A_j|| sqrt(w_j^T M w_j).

    w_down: [d, m] (column j = w_j); act_norm: [m]; output_cov: [d, d] centred F^T F of the MLP output (unused, may
    be None, when `smooth=False`: that drops the PCA weighting (M = I), the ablation 'w/o feature space').
    """
    if smooth:
        lam, vecs = torch.linalg.eigh(output_cov.double())
        lam = lam.clamp_min(0)
        s = torch.sigmoid(lam / lam.mean().clamp_min(_EPS))
        quad = _sum_of_squares(vecs.T * s[:, None], w_down)  # ||diag(s) V^T w_j||^2
    else:
        quad = w_down.double().pow(2).sum(dim=0)
    return (act_norm.double() * quad.sqrt()).to(torch.float32)


def _sum_of_squares(rows: torch.Tensor, w: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """sum_r (rows[r] . w[:, j])^2 for every column j: the projections in float32 (the largest product of the
    method; the eigenvectors come from a float64 eigh), their squares summed in float64, `chunk` columns at a time."""
    left = rows.float()
    out = torch.empty(w.shape[1], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[1], chunk):
        out[start:start + chunk] = (left @ w[:, start:start + chunk].float()).double().pow(2).sum(dim=0)
    return out


def feature_space_importance_from_outputs(w_down: torch.Tensor, act_norm: torch.Tensor,
                                         outputs: torch.Tensor) -> torch.Tensor:
    """`feature_space_importance` from the MLP outputs themselves (F: [N, d], bias excluded), for N <= d tokens.

    The centred covariance F~^T F~ then has rank < N: its non-zero eigenvalues are those of the N x N Gram F~ F~^T
    (eigh in fp64, N^3 instead of d^3), every other eigenvalue is 0 with weight s = sigmoid(0) = 1/2, so
    M = I/4 + sum_r (s_r^2 - 1/4) v_r v_r^T with v_r = F~^T u_r / sqrt(lambda_r), and
    w^T M w = ||w||^2 / 4 + sum_r g_r (u_r^T F~ w)^2, g_r = (s_r^2 - 1/4) / lambda_r (-> 1/(4 mu) as lambda_r -> 0,
    so no vector of a vanishing eigenvalue is ever formed). The eigenvalues' mean mu runs over all d of them.
    """
    w = w_down.double()
    f = outputs.double()
    f = f - f.mean(dim=0)
    n, d = f.shape
    if n > d:
        raise ValueError(f"{n} tokens > hidden size {d}: use feature_space_importance with the covariance")
    lam, u = torch.linalg.eigh(f @ f.T)
    lam = lam.clamp_min(0)
    mu = (lam.sum() / d).clamp_min(_EPS)
    x = lam / mu
    small = x < 1e-4  # (sigmoid(x)^2 - 1/4) / x = 1/4 + x/16 + O(x^2): no cancellation near 0
    g = torch.where(small, (0.25 + x / 16) / mu, (torch.sigmoid(x).pow(2) - 0.25) / lam.clamp_min(_EPS))
    quad = 0.25 * w.pow(2).sum(dim=0) + _sum_of_squares((u * g.sqrt()).T @ f, w_down)  # g >= 0: s_r >= 1/2
    return (act_norm.double() * quad.clamp_min(0).sqrt()).to(torch.float32)


def input_terms(w_gate: torch.Tensor, w_up: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Ig_j + Iu_j with Ig_j = ||W_g[j, :] * n||_2 (eq. 8); n = per-feature L2 norm of the MLP input."""
    n2 = input_norm.double().pow(2)
    return ((w_gate.double().pow(2) @ n2).sqrt() + (w_up.double().pow(2) @ n2).sqrt()).to(torch.float32)


def channels_to_prune(scores: torch.Tensor, count: int, keep_lowest: bool = True) -> list[int]:
    """Ranks M0 .. M0+count-1 of the ascending order, M0 = round(1% of m) when keep_lowest (LoRAP's rule)."""
    m = scores.numel()
    offset = round(0.01 * m) if keep_lowest else 0
    offset = min(offset, m - count)
    order = torch.argsort(scores, stable=True).tolist()
    return sorted(order[offset:offset + count])


def eq11_ratios(similarity: torch.Tensor, r0: float, n_pruned: int, alpha: float, clip: float = 0.9) -> torch.Tensor:
    """Per-layer ratios (eq. 11): the n_pruned most input/output-similar layers get r0 * N_p * softmax(alpha*c);
    the others 0. Ratios above `clip` are clipped and the excess is spread over the rest in proportion."""
    n_layers = similarity.numel()
    if not 0 < n_pruned <= n_layers:
        raise ValueError(f"n_pruned must be in 1..{n_layers}")
    chosen = torch.argsort(similarity.double(), descending=True, stable=True)[:n_pruned]
    weights = torch.softmax(alpha * similarity.double()[chosen], dim=0)
    total = r0 * n_pruned
    if total > clip * n_pruned + 1e-9:
        raise ValueError(f"average ratio {r0:.3f} over {n_pruned} layers exceeds the clip {clip}")
    ratios = torch.zeros(n_layers, dtype=torch.float64)
    free = torch.ones(n_pruned, dtype=torch.bool)
    values = torch.zeros(n_pruned, dtype=torch.float64)
    remaining = total
    while True:
        share = remaining * weights * free / (weights * free).sum()
        over = free & (share > clip)
        if not over.any():
            values[free] = share[free]
            break
        values[over] = clip
        free &= ~over
        remaining = total - values[~free].sum().item()
    ratios[chosen] = values
    return ratios


def regression_fit(sx: torch.Tensor, sy: torch.Tensor, sxx: torch.Tensor, sxy: torch.Tensor, n: int,
                   with_bias: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column least squares y_k ~ a_k x_k (+ b_k) from sums over n tokens (eqs. 9-10). Var 0 -> a=1, b=0.

    Without a bias (families whose projection cannot hold one) the no-intercept fit a = sum xy / sum xx is used.
    """
    sx, sy, sxx, sxy = (t.double() for t in (sx, sy, sxx, sxy))
    if with_bias:
        mx, my = sx / n, sy / n
        var = sxx / n - mx * mx
        ok = var > _EPS * (sxx / n).clamp_min(_EPS)
        a = torch.where(ok, (sxy / n - mx * my) / var.clamp_min(_EPS), torch.ones_like(var))
        b = torch.where(ok, my - a * mx, torch.zeros_like(var))
        return a, b
    ok = sxx > _EPS
    a = torch.where(ok, sxy / sxx.clamp_min(_EPS), torch.ones_like(sxx))
    return a, torch.zeros_like(a)
