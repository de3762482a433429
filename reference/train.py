"""Train the reference Llama-architecture causal LM from scratch on ``reference/corpus/train.txt``.

The run is bounded by wall-clock time (``--minutes``; the cosine schedule follows the elapsed
fraction of it) or, for an exactly reproducible run, by ``--steps``. Every
``--checkpoint-minutes`` it evaluates held-out perplexity on ``eval.txt`` and writes a
resumable checkpoint to ``reference/work/``. At the end it saves the model in bfloat16 with
the tokenizer, a generation config, ``training_metrics.json`` and a model card::

    python reference/train.py --minutes 75 --threads 1
    python reference/train.py --minutes 75 --threads 1 --resume   # after an interruption

For lottery-ticket experiments it also keeps the initialisation (``reference/work/init.pt``) and the weights at an
early rewind point (``reference/work/rewind.pt``, step ``--rewind-step``); neither changes the trained model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig,
                          LlamaForCausalLM)

from common import (CORPUS_DIR, MAX_POSITIONS, MODEL_DIR, SEQ_LEN, VOCAB_SIZE, WORK_DIR,
                    encode_file, perplexities, setup, unigram_log_probs)

log = logging.getLogger("train")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MIN_LR_RATIO = 0.1


def build_config(layers: int) -> LlamaConfig:
    """The reference architecture: GQA (8 query / 2 KV heads of 32), SwiGLU MLP, tied embeddings."""
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def learning_rate(args, step: int, progress: float) -> float:
    """Linear warmup over ``args.warmup`` steps, then cosine decay to MIN_LR_RATIO * peak."""
    warmup = min(1.0, (step + 1) / args.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warmup * (MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * cosine)


def sample_batch(ids: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random windows of SEQ_LEN consecutive tokens."""
    starts = torch.randint(0, len(ids) - SEQ_LEN + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s:s + SEQ_LEN] for s in starts.tolist()])


class Trainer:
    """Holds the model, optimizer, data and progress counters of one (resumable) run."""

    def __init__(self, args):
        self.args = args
        self.checkpoint_path = args.work / "checkpoint.pt"
        self.train_ids = encode_file(args.tokenizer, CORPUS_DIR / "train.txt")
        self.eval_ids = encode_file(args.tokenizer, CORPUS_DIR / "eval.txt")
        self.unigram_lp = unigram_log_probs(self.train_ids)
        log.info("train tokens %d, eval tokens %d", len(self.train_ids), len(self.eval_ids))
        torch.manual_seed(args.seed)
        self.model = LlamaForCausalLM(build_config(args.layers))
        self.optimizer = self._optimizer()
        self.generator = torch.Generator().manual_seed(args.seed)
        self.step = 0
        self.elapsed = 0.0  # seconds spent in the training loop, over all (resumed) runs
        self.history: list[dict] = []
        self.commands: list[str] = []
        if args.resume and self.checkpoint_path.exists():
            self._load()
        elif args.rewind_step:
            self.save_weights("init.pt")
        self.commands.append(" ".join(["python", "reference/train.py", *sys.argv[1:]]))

    def _optimizer(self) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices only (not on norms)."""
        params = list(self.model.parameters())
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.args.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.args.lr, betas=(0.9, 0.95), eps=1e-8)

    def progress(self) -> float:
        if self.args.steps:
            return self.step / self.args.steps
        return self.elapsed / (self.args.minutes * 60)

    def _load(self) -> None:
        state = torch.load(self.checkpoint_path, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.history, self.commands = state["history"], state["commands"]
        log.info("resumed from %s at step %d (%.1f min elapsed)", self.checkpoint_path, self.step,
                 self.elapsed / 60)

    def checkpoint(self, train_loss: float) -> None:
        """Evaluate, log, and atomically write the resumable checkpoint."""
        metrics = perplexities(self.model, self.eval_ids, self.unigram_lp)
        self.history.append({"step": self.step, "tokens": self.tokens_seen(),
                             "minutes": round(self.elapsed / 60, 2), "train_loss": train_loss,
                             "eval_perplexity": metrics["perplexity"],
                             "unigram_perplexity": metrics["unigram_perplexity"]})
        log.info("eval step %d: perplexity %.2f (unigram %.2f) on %d tokens", self.step,
                 metrics["perplexity"], metrics["unigram_perplexity"], metrics["eval_tokens"])
        self.args.work.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "generator": self.generator.get_state(), "rng": torch.get_rng_state(),
                 "step": self.step, "elapsed": self.elapsed, "history": self.history,
                 "commands": self.commands}
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def save_weights(self, name: str) -> None:
        """The model's weights (float32 state dict, with the step) in WORK/name, written atomically."""
        self.args.work.mkdir(parents=True, exist_ok=True)
        tmp = self.args.work / f"{name}.tmp"
        torch.save({"step": self.step, "model": self.model.state_dict()}, tmp)
        os.replace(tmp, self.args.work / name)
        log.info("saved the weights of step %d to %s", self.step, self.args.work / name)

    def tokens_seen(self) -> int:
        return self.step * self.args.batch_size * SEQ_LEN

    def train(self) -> float:
        """Run the training loop until the step or time budget is spent; return the last loss."""
        args = self.args
        self.model.train()
        last_checkpoint = self.elapsed
        window_loss, window_steps, window_start = 0.0, 0, time.monotonic()
        loss_value = float("nan")
        while self.progress() < 1.0:
            start = time.monotonic()
            lr = learning_rate(args, self.step, self.progress())
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            batch = sample_batch(self.train_ids, args.batch_size, self.generator)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
                loss = self.model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.step == args.rewind_step:
                self.save_weights("rewind.pt")
            loss_value = loss.item()
            window_loss, window_steps = window_loss + loss_value, window_steps + 1
            if self.step % args.log_every == 0:
                now = time.monotonic()
                log.info("step %d  loss %.4f  lr %.2e  %.0f tok/s  %.1f min  %.1f%% done",
                         self.step, window_loss / window_steps, lr,
                         window_steps * args.batch_size * SEQ_LEN / (now - window_start),
                         self.elapsed / 60, 100 * self.progress())
                window_start = now
                window_loss, window_steps = 0.0, 0
            self.elapsed += time.monotonic() - start
            if self.elapsed - last_checkpoint >= args.checkpoint_minutes * 60:
                eval_start = time.monotonic()
                self.checkpoint(loss_value)
                self.elapsed += time.monotonic() - eval_start
                last_checkpoint = self.elapsed
                window_loss, window_steps, window_start = 0.0, 0, time.monotonic()
        self.checkpoint(loss_value)
        return loss_value


def save_model(trainer: Trainer, out: Path) -> None:
    """Save the model in bfloat16 with tokenizer and generation config."""
    out.mkdir(parents=True, exist_ok=True)
    model = trainer.model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out)
    tokenizer_dir = trainer.args.tokenizer.resolve()
    if tokenizer_dir != out.resolve():
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer_dir / name, out / name)


def verify(trainer: Trainer, out: Path) -> tuple[dict, str]:
    """Reload ``out`` with the Auto classes; return its eval perplexities and a greedy sample."""
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    if model.dtype != torch.bfloat16:
        raise RuntimeError(f"reloaded model has dtype {model.dtype}, expected bfloat16")
    metrics = perplexities(model, trainer.eval_ids, trainer.unigram_lp)
    prompt = "Python Library Documentation: module"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=80, do_sample=False)
    return metrics, tokenizer.decode(generated[0])


def write_report(trainer: Trainer, out: Path, final: dict, fp32_perplexity: float, sample: str,
                 train_loss: float) -> None:
    """Write training_metrics.json and the model card README.md into ``out``."""
    args = trainer.args
    model = trainer.model
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    tokens = trainer.tokens_seen()
    metrics = {
        "parameters": params,
        "non_embedding_parameters": params - embedding,
        "steps": trainer.step,
        "batch_size": args.batch_size,
        "sequence_length": SEQ_LEN,
        "tokens_seen": tokens,
        "train_tokens": len(trainer.train_ids),
        "epochs": round(tokens / len(trainer.train_ids), 2),
        "train_minutes": round(trainer.elapsed / 60, 2),
        "tokens_per_second": round(tokens / trainer.elapsed, 1),
        "final_train_loss": round(train_loss, 4),
        "eval_perplexity": round(final["perplexity"], 3),
        "eval_perplexity_fp32": round(fp32_perplexity, 3),
        "unigram_perplexity": round(final["unigram_perplexity"], 3),
        "eval_tokens": final["eval_tokens"],
        "hyperparameters": {"lr": args.lr, "min_lr_ratio": MIN_LR_RATIO,
                            "warmup_steps": args.warmup, "weight_decay": args.weight_decay,
                            "betas": [0.9, 0.95], "grad_clip": 1.0, "bf16_autocast": args.amp,
                            "seed": args.seed, "threads": args.threads},
        "machine": "2-core CPU (1 training thread)" if args.threads == 1 else "2-core CPU",
        "torch": torch.__version__,
        "commands": trainer.commands,
        "history": trainer.history,
    }
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    resumed = len(trainer.commands) - 1
    card = MODEL_CARD.format(
        m=metrics, cfg=model.config, command="\n".join(trainer.commands), sample=sample.strip(),
        resumed=f"Resumed {resumed} time(s) from a checkpoint. " if resumed else "")
    (out / "README.md").write_text(card)


MODEL_CARD = """\
---
license: other
license_name: psf-2.0
license_link: https://docs.python.org/3/license.html
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- causal-lm
- tiny
- reference-model
- pruning
---

# Reference model: tiny Llama trained on Python's standard-library documentation

A {m[parameters]:,}-parameter Llama-architecture causal language model trained from scratch on
a 2-core CPU. It is the small reference model of this repository's structured-pruning tool:
fast enough for tests on a CPU, but a real trained model with a non-trivial perplexity.
It is not meant for any other use.

## Architecture

`LlamaForCausalLM`: {cfg.num_hidden_layers} layers, hidden size {cfg.hidden_size}, grouped-query
attention with {cfg.num_attention_heads} query heads and {cfg.num_key_value_heads} key/value heads
of dimension {cfg.head_dim}, gated SiLU (SwiGLU) MLP with intermediate size
{cfg.intermediate_size}, RMSNorm, rotary position embeddings (theta 10000), context
{cfg.max_position_embeddings}, tied input/output embeddings, vocabulary {cfg.vocab_size}
(byte-level BPE, `<|endoftext|>` = id 0 as bos/eos/pad). Parameters: {m[parameters]:,}
({m[non_embedding_parameters]:,} without the embedding). Weights are stored in bfloat16.

## Data and license

The training text is the plain-text `pydoc` rendering of the public Python 3.11.7 standard-library
modules plus the `help()` language-reference topics: the docstrings and documentation of
Python, licensed under the PSF License Agreement (version 2). See
`reference/corpus/README.md` for the exact build command and the module split; `eval.txt` and
`calibration.txt` come from modules that are not in the training text.

## Training

```
{command}
```

{resumed}AdamW (betas 0.9/0.95, weight decay {m[hyperparameters][weight_decay]}),
peak learning rate {m[hyperparameters][lr]}, {m[hyperparameters][warmup_steps]} warmup steps,
cosine decay to {m[hyperparameters][min_lr_ratio]} of the peak, gradient clipping 1.0,
bfloat16 autocast: {m[hyperparameters][bf16_autocast]}, seed {m[hyperparameters][seed]}.
Batches of {m[batch_size]} random windows of {m[sequence_length]} tokens.

- steps: {m[steps]:,}; tokens seen: {m[tokens_seen]:,}
  ({m[epochs]} passes over the {m[train_tokens]:,} training tokens)
- wall time: {m[train_minutes]} minutes on a {m[machine]}, {m[tokens_per_second]} tokens/s
- final training loss: {m[final_train_loss]}

## Evaluation

Held-out `reference/corpus/eval.txt` ({m[eval_tokens]:,} predicted tokens; non-overlapping
windows of 256 tokens, perplexity = exp(mean token negative log-likelihood)):

| model | perplexity |
|---|---|
| this model (bfloat16, as saved) | {m[eval_perplexity]} |
| this model (float32, before saving) | {m[eval_perplexity_fp32]} |
| unigram baseline (add-one smoothed, estimated on train.txt) | {m[unigram_perplexity]} |

Greedy sample for the prompt `Python Library Documentation: module`:

```
{sample}
```
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=75.0, help="training wall-clock budget")
    parser.add_argument("--steps", type=int, default=0,
                        help="train exactly this many steps instead of --minutes (reproducible)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--tokenizer", type=Path, default=MODEL_DIR,
                        help="directory with tokenizer.json (from train_tokenizer.py)")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="checkpoint directory")
    parser.add_argument("--resume", action="store_true", help="continue from WORK/checkpoint.pt")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--rewind-step", type=int, default=100,
                        help="save WORK/init.pt and the weights of this step to WORK/rewind.pt (lottery-ticket "
                             "rewinding; 0 = neither)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bfloat16 autocast for training steps (evaluation is float32)")
    args = parser.parse_args()
    setup(args.threads)
    trainer = Trainer(args)
    params = sum(p.numel() for p in trainer.model.parameters())
    log.info("model: %d parameters, %d layers", params, args.layers)
    train_loss = trainer.train()
    fp32 = trainer.history[-1]
    save_model(trainer, args.out)
    final, sample = verify(trainer, args.out)
    log.info("saved %s: eval perplexity %.2f (bf16) / %.2f (fp32), unigram %.2f", args.out,
             final["perplexity"], fp32["eval_perplexity"], final["unigram_perplexity"])
    log.info("sample: %r", sample)
    write_report(trainer, args.out, final, fp32["eval_perplexity"], sample, train_loss)


if __name__ == "__main__":
    main()
