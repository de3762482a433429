"""The layer-by-layer pipeline shared by every data-driven method.

Capture the hidden states entering block 0 (and the keyword arguments every block receives), then for each block:
calibrate (hooks on that block only) -> score -> slice -> recompute its outputs, which become the next block's
inputs. Only one block's activations exist at a time, so peak memory is the weights plus one layer's activations.
For a streamed model (core.streaming) indexing block i loads it, so only one block's weights exist at a time too.

`model_logits` is the one whole-model forward for methods that need logits (sub-network utilities, evaluation):
batch by batch in memory, layer by layer (every batch through block i, then block i + 1) when streamed, so a
streamed model is read once per call, not once per batch.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .architectures import ArchSpec
from .layers import PassThrough, decoder_layers

logger = logging.getLogger(__name__)


class _Catcher(nn.Module):
    """Takes a decoder layer's place for one forward: records its inputs and passes hidden states through."""

    def __init__(self, record: Callable[[torch.Tensor, dict], None]) -> None:
        super().__init__()
        self.record = record

    def forward(self, hidden_states, *args, **kwargs):
        assert not args, "decoder layers are expected to take everything but hidden_states by keyword"
        self.record(hidden_states, kwargs)
        return hidden_states


class _StopForward(Exception):
    """Ends a block's forward from a hook (LayerwiseRunner.feed)."""


def _stop_forward(module, inputs, output):
    raise _StopForward


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the compute device of a streamed model (its embedding stays on disk), else the
    embedding's device."""
    stream = getattr(model, "core_stream", None)
    return stream.device if stream is not None else _device_of(model.get_input_embeddings())


class LayerwiseRunner:
    """Feeds calibration batches through a model's decoder one block at a time.

    input_ids: [n, T] calibration tokens; batches of `batch_size` rows. `store_device` holds the hidden states
    between blocks (default: the device of block 0; 'cpu' to offload them).
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, batch_size: int = 8,
                 store_device: str | torch.device | None = None) -> None:
        self.model = model
        self.spec = spec
        self.layers = decoder_layers(model, spec)
        stream = getattr(model, "core_stream", None)
        home = stream.device if stream is not None else _device_of(self.layers[0])
        self.store_device = torch.device(store_device) if store_device else home
        self.hidden: list[torch.Tensor] = []
        self.layer_kwargs: list[list[dict]] = []  # [batch][layer] -> kwargs
        self._capture(input_ids, batch_size)

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    @torch.no_grad()
    def _capture(self, input_ids: torch.Tensor, batch_size: int) -> None:
        parent_path = self.spec.layers.rpartition(".")[0]
        decoder = self.model.get_submodule(parent_path)
        originals = list(self.layers)
        device = input_device(self.model)
        try:
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start:start + batch_size].to(device)
                per_layer: list[dict] = []

                def record(hidden, kwargs, per_layer=per_layer):
                    if not per_layer:
                        self.hidden.append(hidden.to(self.store_device))
                    per_layer.append(kwargs)

                for i in range(len(originals)):
                    self.layers[i] = _Catcher(record)
                decoder(input_ids=batch, use_cache=False)
                self.layer_kwargs.append(per_layer)
        finally:
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    @torch.no_grad()
    def run_layer(self, layer_idx: int) -> list[torch.Tensor]:
        """Outputs of block `layer_idx` (as it is now) for every stored batch."""
        layer = self.layers[layer_idx]
        device = _device_of(layer)
        outputs = []
        for hidden, kwargs in zip(self.hidden, self.layer_kwargs):
            out = _first(layer(hidden.to(device), **kwargs[layer_idx]))
            outputs.append(out.to(self.store_device))
        return outputs

    @torch.no_grad()
    def feed(self, layer_idx: int, stop_after: nn.Module) -> None:
        """Run every stored batch through block `layer_idx` only until `stop_after` (a module of it) has run: its
        hooks and those of the modules before it fire, the rest of the block does not run (statistics of the
        attention need no MLP forward). Nothing is returned."""
        layer = self.layers[layer_idx]
        device = _device_of(layer)
        handle = stop_after.register_forward_hook(_stop_forward)  # after the hooks registered before it
        try:
            for hidden, kwargs in zip(self.hidden, self.layer_kwargs):
                try:
                    layer(hidden.to(device), **kwargs[layer_idx])
                except _StopForward:
                    pass
                else:
                    raise AssertionError("the module to stop after did not run in the block's forward")
        finally:
            handle.remove()

    def advance(self, layer_idx: int, outputs: list[torch.Tensor] | None = None) -> None:
        """Make the outputs of block `layer_idx` the stored hidden states (recomputed unless given)."""
        self.hidden = outputs if outputs is not None else self.run_layer(layer_idx)

    def drop_layers(self, removed: list[int]) -> None:
        """Keep the per-layer keyword arguments in step after blocks were removed from the model."""
        keep = [i for i in range(len(self.layer_kwargs[0])) if i not in set(removed)]
        self.layer_kwargs = [[kw[i] for i in keep] for kw in self.layer_kwargs]


@contextmanager
def forward_hooks(modules: dict[str, nn.Module], fn: Callable[[str, nn.Module, tuple, object], None]) -> Iterator[None]:
    """Register `fn(name, module, inputs, output)` as a forward hook on each module while the block is active."""
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: fn(name, mod, inp, out))
               for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Replay(nn.Module):
    """Takes block 0's place for one forward: outputs precomputed final hidden states (the model's own code then
    applies its final norm, head and logit soft-capping)."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden.to(hidden_states.device)


@torch.no_grad()
def model_logits(model: nn.Module, spec: ArchSpec, input_ids: torch.Tensor, batch_size: int = 8,
                 store_device: str | torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(batch ids [b, T], logits [b, T, vocab]) for `input_ids` [n, T] in batches of `batch_size` rows."""
    device = input_device(model)
    batches = [input_ids[s:s + batch_size] for s in range(0, input_ids.shape[0], batch_size)]
    if getattr(model, "core_stream", None) is None:
        for batch in batches:
            batch = batch.to(device)
            yield batch, model(batch, use_cache=False).logits
        return
    runner = LayerwiseRunner(model, spec, input_ids, batch_size, store_device)
    for i in range(len(runner.layers)):
        runner.advance(i)
    layers = runner.layers
    originals = list(layers)
    try:
        for batch, hidden in zip(batches, runner.hidden):
            layers[0] = _Replay(hidden)
            for i in range(1, len(originals)):
                layers[i] = PassThrough()
            batch = batch.to(device)
            yield batch, model(batch, use_cache=False).logits
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
