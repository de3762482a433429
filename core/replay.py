"""A block whose MLP lost channels, recomputed without running its attention or its gate/up projections again.

The layer pipeline runs each block once to calibrate and once more, after pruning, for the next block's inputs. When
only the MLP's channels were removed, most of that second forward repeats the first: the attention sees the same
inputs and weights, and the kept channels' activations (the down projection's input) are the same numbers. So while
the block runs to calibrate, `MlpReplay` records, batch by batch, the attention branch's output and the down
projection's input; afterwards `outputs` runs the block's own forward with the attention module replaced by its
recorded output and the MLP module by the pruned down projection applied to the kept columns of the recorded input.
The block's norms, residual additions and any post-branch norms (Gemma) run as the family wrote them, so the result
equals a real forward of the pruned block up to the rounding of a matrix product over fewer columns.

The recordings take tokens x (intermediate + hidden) values; they are kept only when that is at most the block's
own weights in the compute dtype (`MlpReplay.start` returns None otherwise, and the caller runs the forward), so the
peak stays within one block's working set (core.memory counts them). Methods that prune the MLP of a block use it:
width pruning with data-driven scores and SlimLLM (which also reads the recorded inputs for its regression instead
of a third forward).
"""
from __future__ import annotations

import torch
from torch import nn

from .architectures import ArchSpec
from .layers import get_submodule, set_submodule
from .pipeline import LayerwiseRunner, _device_of, _first


def replay_bytes(tokens: int, hidden: int, intermediate: int, element: int, outputs: bool = False) -> int:
    """Bytes the recordings of one block take (`outputs`: the down projection's output recorded too)."""
    return tokens * ((2 if outputs else 1) * hidden + intermediate) * element


def kept_bytes(tokens: int, hidden: int, intermediate: int, element: int, block_params: int,
               outputs: bool = False) -> int:
    """Bytes of recordings a block of `block_params` parameters keeps: all of them when they take at most the
    block's own size, else none (the one rule `MlpReplay.start` and core.memory follow)."""
    recorded = replay_bytes(tokens, hidden, intermediate, element, outputs)
    return recorded if recorded <= block_params * element else 0


class _Recorded(nn.Module):
    """Takes the attention module's place: returns what it returned for this batch."""

    def __init__(self, output: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.output, self.as_tuple = output, as_tuple

    def forward(self, *args, **kwargs):
        device = _device_of_args(args, kwargs)
        out = self.output.to(device)
        return (out, None) if self.as_tuple else out


class _KeptChannels(nn.Module):
    """Takes the MLP module's place: the pruned down projection of the recorded input's kept columns."""

    def __init__(self, down: nn.Module, inputs: torch.Tensor) -> None:
        super().__init__()
        self.down, self.inputs = down, inputs

    def forward(self, *args, **kwargs):
        return self.down(self.inputs.to(_device_of(self.down)))


def _device_of_args(args, kwargs) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


class MlpReplay:
    """Records one calibration forward of a block (see the module doc); `hooks()` go into `stats.collect`."""

    def __init__(self, spec: ArchSpec, store: torch.device, outputs: bool = False) -> None:
        self.spec, self.store, self.keep_outputs = spec, store, outputs
        self.attention: list[torch.Tensor] = []
        self.down_inputs: list[torch.Tensor] = []
        self.down_outputs: list[torch.Tensor] = []
        self.as_tuple = True

    @classmethod
    def start(cls, runner: LayerwiseRunner, layer: nn.Module, spec: ArchSpec, intermediate: int,
              outputs: bool = False) -> "MlpReplay | None":
        """A recorder for block `layer`, or None when its recordings would take more than the block's weights.
        `outputs`: record the down projection's outputs too (SlimLLM's PCA and regression read them)."""
        element = next(layer.parameters()).element_size()
        block = sum(p.numel() for p in layer.parameters())
        if not kept_bytes(runner.num_tokens, runner.hidden[0].shape[-1], intermediate, element, block, outputs):
            return None
        return cls(spec, runner.store_device, outputs)

    def hooks(self, layer: nn.Module) -> dict:
        attention = get_submodule(layer, self.spec.attention.module)
        down = get_submodule(layer, f"{self.spec.mlp.module}.{self.spec.mlp.down}")
        return {"replay_attention": (attention, self._attention), "replay_down": (down, self._down)}

    def _attention(self, name, module, inputs, output) -> None:
        self.as_tuple = isinstance(output, (tuple, list))
        self.attention.append(_first(output).detach().to(self.store))

    def _down(self, name, module, inputs, output) -> None:
        self.down_inputs.append(inputs[0].detach().to(self.store))
        if self.keep_outputs:
            self.down_outputs.append(_first(output).detach().to(self.store))

    @torch.no_grad()
    def outputs(self, runner: LayerwiseRunner, layer_idx: int, kept: list[int]) -> list[torch.Tensor]:
        """Block `layer_idx`'s outputs for every stored batch, its MLP pruned to the channels `kept` (ascending, as
        surgery keeps them) and its attention unchanged since the recording."""
        if len(self.down_inputs) != len(runner.hidden) or len(self.attention) != len(runner.hidden):
            raise AssertionError("the replay recorded a different number of batches than the runner holds")
        layer = runner.layers[layer_idx]
        device = _device_of(layer)
        attention_path, mlp_path = self.spec.attention.module, self.spec.mlp.module
        attention, mlp = get_submodule(layer, attention_path), get_submodule(layer, mlp_path)
        down = get_submodule(mlp, self.spec.mlp.down)
        if down.in_features != len(kept):
            raise AssertionError("the block's down projection does not have the kept channels' width")
        index = torch.as_tensor(kept, dtype=torch.long)
        outputs = []
        try:
            for hidden, kwargs, recorded, inputs in zip(runner.hidden, runner.layer_kwargs, self.attention,
                                                        self.down_inputs):
                set_submodule(layer, attention_path, _Recorded(recorded, self.as_tuple))
                set_submodule(layer, mlp_path, _KeptChannels(down, inputs.index_select(-1, index.to(inputs.device))))
                out = _first(layer(hidden.to(device), **kwargs[layer_idx]))
                outputs.append(out.to(runner.store_device))
        finally:
            set_submodule(layer, attention_path, attention)
            set_submodule(layer, mlp_path, mlp)
        self.attention, self.down_inputs, self.down_outputs = [], [], []
        return outputs
