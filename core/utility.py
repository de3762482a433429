"""Whole-model utilities of a (sub-)network, for the sub-network scores of depth pruning (Shapley and friends).

Higher = better: minus the LM loss on the calibration tokens, minus the mean logit distance to the full model, or
the accuracy on a multiple-choice task (lm-eval's definition of `acc`). Every whole-model forward pass goes through
`forward_logits`, the one place that runs a model end to end; a block-streaming forward replaces it there without
touching the utilities.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

from .architectures import ArchSpec
from .errors import PruningError

logger = logging.getLogger(__name__)

UTILITIES = ("loss", "logit_distance", "task")
TASK_BATCH = 32  # sequences per forward for task items (short: a context and one choice)


@torch.no_grad()
def forward_logits(model: nn.Module, spec: ArchSpec, batches: Sequence[torch.Tensor],
                   consume: Callable[[int, torch.Tensor], None]) -> None:
    """Run the whole model on each batch of token ids [b, T] (right-padded rows are fine: attention is causal) and
    hand `consume(batch_index, logits [b, T, V] float32)` each batch's logits, on the model's device.

    A streamed model (core.streaming) is read block by block once for all batches of one length, not once per
    batch (`core.pipeline.model_logits`)."""
    from .pipeline import model_logits

    batches = list(batches)
    if getattr(model, "core_stream", None) is not None and batches and len({b.shape for b in batches}) == 1:
        for i, (_, logits) in enumerate(model_logits(model, spec, torch.cat(batches), batches[0].shape[0])):
            consume(i, logits.float())
        return
    for i, ids in enumerate(batches):
        for _, logits in model_logits(model, spec, ids, ids.shape[0]):
            consume(i, logits.float())


def _batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[s:s + batch_size] for s in range(0, ids.shape[0], batch_size)]


class LossUtility:
    """Minus the mean next-token NLL on calibration ids [n, T]."""

    def __init__(self, ids: torch.Tensor, batch_size: int) -> None:
        self.batches = _batches(ids, batch_size)

    def __call__(self, model: nn.Module, spec: ArchSpec) -> float:
        total = count = 0.0

        def consume(i: int, logits: torch.Tensor) -> None:
            nonlocal total, count
            target = self.batches[i][:, 1:].to(logits.device)
            total += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="sum").item()
            count += target.numel()

        forward_logits(model, spec, self.batches, consume)
        return -total / count


class LogitDistanceUtility:
    """Minus the mean L2 distance between the logits and those of the model at construction (the full model)."""

    def __init__(self, model: nn.Module, spec: ArchSpec, ids: torch.Tensor, batch_size: int) -> None:
        self.batches = _batches(ids, batch_size)
        self.reference: list[torch.Tensor] = [torch.empty(0)] * len(self.batches)

        def keep(i: int, logits: torch.Tensor) -> None:
            self.reference[i] = logits.cpu()

        forward_logits(model, spec, self.batches, keep)

    def __call__(self, model: nn.Module, spec: ArchSpec) -> float:
        total = count = 0.0

        def consume(i: int, logits: torch.Tensor) -> None:
            nonlocal total, count
            total += (logits - self.reference[i].to(logits.device)).norm(dim=-1).sum().item()
            count += logits.shape[0] * logits.shape[1]

        forward_logits(model, spec, self.batches, consume)
        return -total / count


def encode_pair(tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """Token ids of a context and its continuation as lm-eval encodes them: trailing spaces of the context move to
    the continuation, the continuation is what the whole string adds to the context's tokens, and an empty context
    becomes `prefix_id` (end-of-text)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx):]
    return (ctx or [prefix_id]), cont


class TaskUtility:
    """Accuracy on a multiple-choice task: each choice scored by its summed log-likelihood after the context."""

    def __init__(self, task, tokenizer, max_length: int, batch_size: int = TASK_BATCH) -> None:
        self.task = task
        prefix = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id or 0
        self.shape = [len(choices) for choices in task.requests]
        rows, spans = [], []
        for choices in task.requests:
            for context, continuation in choices:
                ctx, cont = encode_pair(tokenizer, context, continuation, prefix)
                if not cont:
                    raise PruningError(f"Task {task.name!r} has an empty answer choice after tokenisation.")
                seq = (ctx + cont)[-(max_length + 1):]  # left-truncate like lm-eval
                rows.append(seq[:-1])
                spans.append((len(seq) - 1 - len(cont), cont))
        self.batches, self.spans = [], []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            width = max(len(r) for r in chunk)
            self.batches.append(torch.tensor([r + [prefix] * (width - len(r)) for r in chunk]))
            self.spans.append(spans[s:s + batch_size])

    def loglikelihoods(self, model: nn.Module, spec: ArchSpec) -> list[list[float]]:
        """Summed log-likelihood of every choice, per document."""
        flat: list[float] = []

        def consume(i: int, logits: torch.Tensor) -> None:
            logp = logits.log_softmax(-1)
            for row, (start, cont) in enumerate(self.spans[i]):
                positions = torch.arange(start, start + len(cont), device=logp.device)
                flat.append(logp[row, positions, torch.tensor(cont, device=logp.device)].sum().item())

        forward_logits(model, spec, self.batches, consume)
        out, k = [], 0
        for n in self.shape:
            out.append(flat[k:k + n])
            k += n
        return out

    def __call__(self, model: nn.Module, spec: ArchSpec) -> float:
        return self.task.accuracy(self.loglikelihoods(model, spec))


def make_utility(name: str, model: nn.Module, spec: ArchSpec, calibration: Callable[[], torch.Tensor],
                 batch_size: int, tokenizer=None, task: str = "pydoc_cloze", task_docs: int = 0,
                 task_dirs: Sequence[str] = ()):
    """The utility `name` ('loss', 'logit_distance' on the calibration ids, or 'task' on the first `task_docs`
    documents of `task`; 0 = all). Built on the model as it is now (the reference of logit_distance)."""
    if name == "loss":
        return LossUtility(calibration(), batch_size)
    if name == "logit_distance":
        return LogitDistanceUtility(model, spec, calibration(), batch_size)
    if name == "task":
        from .harness import choice_task

        if tokenizer is None:
            raise PruningError("A task utility needs the model's tokenizer.")
        docs = slice(0, task_docs) if task_docs else slice(None)
        length = getattr(model.config, "max_position_embeddings", 2048)
        return TaskUtility(choice_task(task, list(task_dirs), docs), tokenizer, length)
    raise PruningError(f"Unknown utility {name!r}; use one of {', '.join(UTILITIES)}.")
