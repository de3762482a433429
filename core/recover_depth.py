"""Learned recovery of depth pruning (Siddiqui et al. 2024 name both as alternatives to the mean update):

- `lowrank`: each removed unit becomes h <- h + B A x + c, where x is what the unit's stand-in receives (the
  branch's normed input: `mlp_in`-norm of the block input for a removed block), c starts at the mean update and
  B at zero, and A, B, c are trained with MSE against the removed unit's own update on the calibration tokens.
  Fitted unit by unit inside the layer-by-layer pass (block-local: one block's activations at a time); with
  `recovery_source: pruned` each unit sees the inputs of the already-pruned model.
- `learned_bias`: the mean-update constants are trained end to end (everything else frozen) so that the pruned
  model's final hidden states match the unpruned model's on the calibration tokens (relative MSE). This needs a
  backward pass through the whole model: use it where the model and one batch's activations fit.

Both are stored in the checkpoint (a constant in a bias, the low-rank map in the stand-in's `adapter_in` /
`adapter_out`, `skip_rank` in the per-layer config) and reload with `core.load_pruned`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .layers import StandIn, decoder_layers
from .stats import BranchOutputs, collect

logger = logging.getLogger(__name__)

LEARNED = ("learned_bias", "lowrank")


def _tokens(t: torch.Tensor, skip_first: bool) -> torch.Tensor:
    return (t[:, 1:] if skip_first else t).flatten(0, -2)


class _BranchInputs:
    """Keeps the input of a branch module (passed positionally or as `hidden_states=`) for each batch."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs) -> None:
        self.inputs.append((args[0] if args else kwargs["hidden_states"]).detach())


@torch.no_grad()
def unit_pairs(runner, spec, layer_idx: int, unit: str, skip_first: bool):
    """(stand-in inputs [N, d], unit updates [N, d], block outputs) of the unit at `layer_idx` on the runner's
    current hidden states. The block outputs let the caller advance the runner without a second pass."""
    layer = decoder_layers(runner.model, spec)[layer_idx]
    if unit == "block":
        outputs = runner.run_layer(layer_idx)
        norm = layer.get_submodule(spec.norms["mlp_in"])
        inputs = [_tokens(norm(x.to(o.device)), skip_first) for x, o in zip(runner.hidden, outputs)]
        targets = [_tokens(o - x.to(o.device), skip_first) for x, o in zip(runner.hidden, outputs)]
        return torch.cat(inputs), torch.cat(targets), outputs
    branch = layer.get_submodule(spec.attention.module if unit == "attention" else spec.mlp.module)
    captured = _BranchInputs()
    handle = branch.register_forward_pre_hook(captured, with_kwargs=True)
    try:
        out = BranchOutputs()
        outputs = collect(runner, layer_idx, {"out": (layer.get_submodule(spec.branch_module(unit)), out)})
    finally:
        handle.remove()
    inputs = torch.cat([_tokens(x, skip_first) for x in captured.inputs])
    return inputs, torch.cat([_tokens(o, skip_first) for o in out.outputs]), outputs


def fit_lowrank(inputs: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor, rank: int, steps: int,
                seed: int = 0, lr: float = 1e-2, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Train B A x + c ~ target (MSE) from c = mean, B = 0. inputs, targets: [N, d]; returns A [r, d], B [d, r],
    c [d] and the relative MSE before/after (1 - R^2-like: ||err||^2 / ||target - mean(target)||^2)."""
    x, y = inputs.float(), targets.float()
    d = x.shape[1]
    gen = torch.Generator().manual_seed(seed)
    a = nn.Parameter((torch.randn(rank, d, generator=gen) / d ** 0.5).to(x.device))
    b = nn.Parameter(torch.zeros(d, rank, device=x.device))
    c = nn.Parameter(mean.float().clone().to(x.device))
    scale = (y - y.mean(0)).pow(2).sum(1).mean().clamp_min(1e-12)

    def loss_of(xb, yb):
        return ((xb @ a.T) @ b.T + c - yb).pow(2).sum(1).mean() / scale

    with torch.no_grad():
        before = loss_of(x, y).item()
    optimizer = torch.optim.Adam([a, b, c], lr=lr)
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=gen).to(x.device)
        loss = loss_of(x[idx], y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_of(x, y).item()
    if after > before:  # never worse than the mean update it started from
        a.data.zero_(), b.data.zero_(), c.data.copy_(mean.float())
        after = before
    return a.detach(), b.detach(), c.detach(), {"relative_mse": [round(before, 5), round(after, 5)]}


def lowrank_pass(ctx, opts, units: list[int], install) -> tuple[dict[int, torch.Tensor], dict]:
    """Fit and install a low-rank stand-in for each unit, layer by layer. `install(ctx, opts, i, constant,
    adapter)` replaces unit i. Returns the constants (for the depth report) and each unit's fit."""
    runner = ctx.runner()
    n = ctx.model.config.num_hidden_layers
    progressive = opts.recovery_source == "pruned"
    constants, fits = {}, {}
    for i in range(n):
        if i not in units:
            runner.advance(i)
            continue
        inputs, targets, outputs = unit_pairs(runner, ctx.spec, i, opts.unit, opts.recovery_skip_first)
        dtype = targets.dtype
        a, b, c, fits[str(i)] = fit_lowrank(inputs, targets, targets.double().mean(0), opts.recovery_rank,
                                            opts.recovery_steps, seed=ctx.layer_seed(i))
        constants[i] = c.to(dtype)
        install(ctx, opts, i, constants[i], (a.to(dtype), b.to(dtype)))
        runner.advance(i, None if progressive else outputs)
        ctx.progress.update("depth: low-rank recovery", i + 1, n)
    return constants, fits


def folded_targets(blocks: list[int], folded: list[int], kept_as_constant: list[int]) -> list[int]:
    """Current index of each layer whose MLP output bias received a folded block (after the deletions)."""
    removed, deleted = set(blocks), set(blocks) - set(kept_as_constant)
    out = []
    for i in folded:
        pred = max(j for j in range(i) if j not in removed)
        out.append(pred - sum(1 for j in deleted if j < pred))
    return sorted(set(out))


def trainable_constants(model: nn.Module, spec, folded_into: list[int]) -> list[nn.Parameter]:
    """The constants depth recovery left in the model: biases of stand-ins, and MLP output biases of the layers
    (current indices `folded_into`) that received a folded mean update."""
    layers = decoder_layers(model, spec)
    params = [m.bias for m in model.modules() if isinstance(m, StandIn) and m.bias is not None]
    for i in folded_into:
        params.append(layers[i].get_submodule(f"{spec.mlp.module}.{spec.mlp.down}").bias)
    return params


def final_states(model: nn.Module, ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The model's final hidden states (after its final norm) per calibration batch, on CPU."""
    device = model.get_input_embeddings().weight.device
    with torch.no_grad():
        return [model.base_model(ids[s:s + batch_size].to(device), use_cache=False).last_hidden_state.float().cpu()
                for s in range(0, ids.shape[0], batch_size)]


def learn_constants(model: nn.Module, params: list[nn.Parameter], ids: torch.Tensor, reference: list[torch.Tensor],
                    batch_size: int, steps: int, lr: float = 1e-2, seed: int = 0) -> dict:
    """Train `params` (everything else frozen) so the final hidden states match `reference` (relative MSE)."""
    device = model.get_input_embeddings().weight.device
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    batches = list(range(0, ids.shape[0], batch_size))

    def loss_of(b: int) -> torch.Tensor:
        start = batches[b]
        out = model.base_model(ids[start:start + batch_size].to(device), use_cache=False).last_hidden_state.float()
        target = reference[b].to(device)
        return (out - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(loss_of(b).item() for b in range(len(batches))) / len(batches)

    originals = [p.detach().clone() for p in params]
    before = mean_loss()
    optimizer = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train()
    try:
        for _ in range(steps):
            loss = loss_of(int(torch.randint(0, len(batches), (1,), generator=gen)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finally:
        model.train(was_training)
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    after = mean_loss()
    if after > before:
        with torch.no_grad():
            for p, o in zip(params, originals):
                p.copy_(o)
        after = before
    logger.info("learned depth constants: final-state relative MSE %.5f -> %.5f", before, after)
    return {"final_state_relative_mse": [round(before, 6), round(after, 6)], "trained_constants": len(params)}

