"""Recovery training after pruning: distil the unpruned teacher into the pruned student (all weights or LoRA
adapters merged back), keeping sparsity masks fixed, on a calibration source with a held-out split.

    model, report = recover(student, teacher, tokenizer, RecoverConfig(steps=200), progress=callback)

The budget is a number of optimizer steps (and optionally seconds); `progress(stage, done, total)` is called every
step and `on_event(dict)` at every evaluation (the loss curve), so a front end can show both; `should_stop()` ends
the run early and keeps the best state so far. With `checkpoint_dir` the state is saved every
`checkpoint_every` steps and when interrupted; `resume=True` continues from it.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import recover_state
from .architectures import spec_for_config
from .calibration import CalibrationConfig
from .errors import Interrupted, PruningError
from .progress import ProgressCallback
from .recover_config import RecoverConfig
from .recover_data import TokenSplit, heldout_batches, load_split, train_batch
from .recover_loss import Objective, layer_pairs, lm_loss, proportional_origin
from .recover_masks import MaskSet
from .recover_memory import check_fits, estimate

logger = logging.getLogger(__name__)

MIN_LR_RATIO = 0.1


def learning_rate(cfg: RecoverConfig, peak: float, step: int) -> float:
    """Linear warmup, then cosine decay to MIN_LR_RATIO of the `peak` at the end of the step budget."""
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return peak * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def training_dtype(cfg: RecoverConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy of `model` on the held-out windows."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = count = 0.0
    for batch in batches:
        batch = batch.to(device)
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += lm_loss(model(input_ids=batch, use_cache=False).logits, batch).item() * n
        count += n
    model.train(was_training)
    return total / count


class _Bar:
    """A tqdm bar over steps showing the running loss, plus the front end's callback."""

    def __init__(self, callback: ProgressCallback | None, bars: bool, stage: str, total: int, start: int) -> None:
        self.callback, self.stage, self.total = callback, stage, total
        self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", leave=True) if bars else None

    def update(self, step: int, loss: float) -> None:
        if self.callback is not None:
            self.callback(self.stage, step, self.total)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Recovery:
    """One recovery run; `run()` trains and returns the (merged) student and the report."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, tokenizer, cfg: RecoverConfig, *,
                 origin: list[int] | None = None, masks: dict[str, torch.Tensor] | None = None,
                 data: CalibrationConfig | None = None, split: TokenSplit | None = None,
                 progress: ProgressCallback | None = None, bars: bool = False, stage: str = "recover",
                 on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 checkpoint_dir: str | Path | None = None, resume: bool = False) -> None:
        self.cfg = cfg
        self.student, self.teacher = student, teacher
        self.spec = spec_for_config(student.config)
        self.device = next(student.parameters()).device
        self.dtype = training_dtype(cfg, self.device)
        self.lr = cfg.learning_rate(student.config.hidden_size)
        self.checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else (
            self.device.type == "cuda")
        n_student = student.config.num_hidden_layers
        self.objective = self._objective(origin or proportional_origin(n_student, self._teacher_layers()))
        if self.objective.needs_teacher and teacher is None:
            raise PruningError("This recovery objective distils from a teacher (kd or hidden > 0), but none was "
                               "given. Pass the unpruned model as teacher, or use only the LM loss (kd: 0, lm: 1).")
        self.split = split or load_split(tokenizer, data or cfg.data or CalibrationConfig(), cfg.data_tokens,
                                         cfg.holdout, cfg.seq_len)
        self.heldout = heldout_batches(self.split, cfg.seq_len, cfg.batch_size, cfg.eval_tokens)
        self.masks = MaskSet.from_model(student, masks)
        self.callback, self.bars, self.stage = progress, bars, stage
        self.on_event, self.should_stop = on_event, should_stop
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.resume = resume

    def _teacher_layers(self) -> int:
        return self.teacher.config.num_hidden_layers if self.teacher is not None else 0

    def _objective(self, origin: list[int]) -> Objective:
        cfg = self.cfg
        pairs: list[tuple[int, int]] = []
        if cfg.hidden > 0 and self.teacher is not None:
            n = self.student.config.num_hidden_layers
            bad = [i for i in cfg.hidden_layers or () if not 0 <= i < n]
            if bad:
                raise PruningError(f"recover.hidden_layers {bad} do not exist: the pruned model has layers "
                                   f"0..{n - 1}.")
            pairs = layer_pairs(origin, self._teacher_layers(), list(cfg.hidden_layers) if cfg.hidden_layers else None)
            if not pairs:
                raise PruningError("No student layer is aligned with a teacher layer for the hidden-state loss; "
                                   "choose other recover.hidden_layers or set hidden: 0.")
        return Objective(cfg.kd, cfg.lm, cfg.hidden, cfg.temperature, tuple(pairs))

    # -- set-up -------------------------------------------------------------------------------------------------

    def _prepare(self) -> nn.Module:
        student = self.student.to(self.dtype)
        if self.teacher is not None:
            self.teacher.to(self.device, self.dtype).eval()
            self.teacher.requires_grad_(False)
        student.config.use_cache = False
        if self.checkpointing:
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        student.train()
        if self.cfg.trainable == "lora":
            from .recover_lora import wrap

            student.requires_grad_(False)
            return wrap(student, self.spec, self.cfg.lora_rank, self.cfg.lora_alpha)
        student.requires_grad_(True)
        return student

    def memory_estimate(self, trainable: int):
        config = self.student.config
        teacher = sum(p.numel() for p in self.teacher.parameters()) if self.teacher is not None else 0
        student = sum(p.numel() for p in self.student.parameters())
        return estimate(config, student, teacher, trainable, self.cfg.batch_size * self.cfg.seq_len,
                        torch.finfo(self.dtype).bits // 8, self.checkpointing, str(self.device))

    # -- training -----------------------------------------------------------------------------------------------

    def _step(self, model: nn.Module, params: list[nn.Parameter], optimizer, step: int) -> tuple[float, dict]:
        cfg = self.cfg
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, self.lr, step)
        batch = train_batch(self.split, step, cfg.batch_size, cfg.seq_len, cfg.seed).to(self.device)
        hidden = self.objective.hidden > 0
        teacher_out = None
        if self.objective.needs_teacher:
            with torch.no_grad():
                teacher_out = self.teacher(input_ids=batch, output_hidden_states=hidden, use_cache=False)
        student_out = model(input_ids=batch, output_hidden_states=hidden, use_cache=False)
        loss, parts = self.objective(batch, student_out, teacher_out)
        if not torch.isfinite(loss):
            raise PruningError(f"Recovery training diverged at step {step} (loss {loss.item()}). Lower recover.lr.")
        loss.backward()
        if cfg.trainable == "all":
            self.masks.mask_grads_()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.trainable == "all":
            self.masks.apply_()
        return loss.item(), parts

    def _evaluate(self, model: nn.Module, state: recover_state.TrainState, train_loss: float | None) -> bool:
        """Held-out loss; keeps the best state. Returns True when early stopping says to stop."""
        loss = heldout_loss(model, self.heldout)
        entry = {"step": state.step, "tokens": state.tokens, "seconds": round(state.seconds, 1),
                 "train_loss": None if train_loss is None else round(train_loss, 5),
                 "heldout_loss": round(loss, 5), "heldout_perplexity": round(math.exp(loss), 4)}
        state.history.append(entry)
        if self.on_event is not None:
            self.on_event(dict(entry, stage=self.stage))
        logger.info("%s step %d: held-out loss %.4f (perplexity %.3f)%s", self.stage, state.step, loss,
                    math.exp(loss), "" if train_loss is None else f", training loss {train_loss:.4f}")
        if loss < state.best_loss:
            state.best_loss, state.best_step, state.bad_evals = loss, state.step, 0
            state.best = recover_state.trainable_state(model)
            return False
        state.bad_evals += 1
        return self.cfg.patience > 0 and state.bad_evals >= self.cfg.patience

    def run(self) -> tuple[nn.Module, dict]:
        cfg = self.cfg
        model = self._prepare()
        params = [p for p in model.parameters() if p.requires_grad]
        need = self.memory_estimate(sum(p.numel() for p in params))
        check_fits(need, str(self.device), already_loaded=need.weights)
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=(0.9, 0.95),
                                      weight_decay=cfg.weight_decay)
        run_id = recover_state.fingerprint(cfg, model)
        state = None
        if self.resume and self.checkpoint_dir is not None:
            state = recover_state.load(self.checkpoint_dir, run_id, model, optimizer)
        state = state or recover_state.TrainState()
        if state.stopped != "early stopping":  # a larger budget or a resumed interruption continues training
            state.stopped = ""
        if not state.history:
            self._evaluate(model, state, None)
        bar = _Bar(self.callback, self.bars, self.stage, cfg.steps, state.step)
        window: list[float] = []
        stopped = state.stopped or "budget"
        started = time.perf_counter() - state.seconds
        try:
            while not state.stopped and state.step < cfg.steps:
                if self.should_stop is not None and self.should_stop():
                    stopped = "stopped by the caller"
                    break
                if cfg.max_seconds is not None and state.seconds >= cfg.max_seconds:
                    stopped = "time budget"
                    break
                loss, _ = self._step(model, params, optimizer, state.step)
                state.step += 1
                state.tokens += cfg.batch_size * cfg.seq_len
                state.seconds = time.perf_counter() - started
                window.append(loss)
                bar.update(state.step, loss)
                if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                    if self._evaluate(model, state, sum(window) / len(window)):
                        stopped = "early stopping"
                        break
                    window = []
                if self.checkpoint_dir is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    recover_state.save(self.checkpoint_dir, run_id, state, model, optimizer)
        except (KeyboardInterrupt, Interrupted):  # Ctrl-C, or SIGINT / SIGTERM under the command line
            if self.checkpoint_dir is not None:
                recover_state.save(self.checkpoint_dir, run_id, state, model, optimizer)
            raise
        finally:
            bar.close()
        if window and state.history[-1]["step"] != state.step:
            self._evaluate(model, state, sum(window) / len(window))
        state.stopped = stopped
        if self.checkpoint_dir is not None and state.step:  # a finished round is resumed without retraining
            recover_state.save(self.checkpoint_dir, run_id, state, model, optimizer)
        if state.best is not None and state.best_step != state.step:
            recover_state.load_trainable(model, state.best)
        student = self._finish(model)
        return student, self.report(state, stopped, sum(p.numel() for p in params))

    def _finish(self, model: nn.Module) -> nn.Module:
        if self.cfg.trainable == "lora":
            from .recover_lora import merge

            model = merge(model)
        self.masks.apply_()  # a merged LoRA update is dense: the masked entries go back to zero
        if self.checkpointing:
            model.activation_checkpointing_disable()
        model.requires_grad_(False)
        model.config.use_cache = True
        return model.eval()

    def report(self, state: recover_state.TrainState, stopped: str, trainable: int) -> dict:
        cfg = self.cfg
        first = state.history[0]
        best = next(h for h in state.history if h["step"] == state.best_step)
        report = {
            "objective": cfg.objective(),
            "trainable": "all weights" if cfg.trainable == "all" else
            f"LoRA rank {cfg.lora_rank} (alpha {cfg.lora_alpha:g}) on every projection, merged into the weights",
            "trainable_parameters": trainable,
            "steps": state.step, "steps_budget": cfg.steps, "stopped": stopped,
            "tokens": state.tokens, "batch": [cfg.batch_size, cfg.seq_len], "lr": self.lr,
            "data": self.split.describe(),
            "kept_step": state.best_step,
            "heldout_loss": [first["heldout_loss"], best["heldout_loss"]],
            "heldout_perplexity": [first["heldout_perplexity"], best["heldout_perplexity"]],
            "seconds": round(state.seconds, 1),
            "tokens_per_second": round(state.tokens / state.seconds, 1) if state.seconds else None,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "gradient_checkpointing": self.checkpointing,
            "loss_curve": state.history,
        }
        if self.objective.pairs:
            report["hidden_layer_pairs"] = [list(p) for p in self.objective.pairs]
        if self.masks:
            report["fixed_masks"] = self.masks.describe()
        return report


def recover(student: nn.Module, teacher: nn.Module | None, tokenizer, cfg: RecoverConfig,
            **kwargs) -> tuple[nn.Module, dict]:
    """Train `student` towards `teacher` as `cfg` says. Returns the trained model (LoRA merged) and the report
    stored in the recipe's result. Keyword arguments: see `Recovery`."""
    return Recovery(student, teacher, tokenizer, cfg, **kwargs).run()
