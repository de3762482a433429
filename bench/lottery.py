"""The lottery ticket (Frankle & Carbin 2019; with rewinding, Frankle et al. 2020) on a CPU-sized model of the
reference family, against its controls:

- IMP with rewinding: train; prune `--prune` of the surviving decoder weights by global magnitude; rewind the
  survivors to their values at step `--rewind`; retrain (the same data order and learning-rate schedule from that
  step on, masks fixed); repeat for `--rounds` rounds;
- random re-initialisation: the same masks on a fresh random initialisation, trained from step 0;
- one-shot magnitude pruning of the dense model to the same sparsity, without and with recovery training
  (core.recover: distillation from the dense model, masks fixed, the token budget of one IMP retraining).

Every run trains for a fixed number of steps (not minutes), so the numbers do not depend on the machine's load.
Perplexity on the first `--eval-tokens` tokens of the held-out `reference/corpus/eval.txt`.

    python bench/lottery.py                       # default (the committed run): a 0.9M-parameter Llama, 3 rounds
    python bench/lottery.py --steps 40 --rounds 2 # a smoke run

`reference/train.py --rewind-step K` keeps the reference model's own initialisation and rewind point
(reference/work/init.pt, rewind.pt); `--arch reference --init ... --rewind ... --dense reference/model` runs the same
procedure on the reference architecture (its retraining rounds are far beyond a CPU budget).
Writes bench/results/lottery_<arch>_cpu.{json,md,png}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.calibration import CalibrationConfig  # noqa: E402
from core.evaluate import perplexity_of_ids  # noqa: E402
from core.recover import recover  # noqa: E402
from core.recover_config import RecoverConfig  # noqa: E402
from core.recover_data import TokenSplit, token_stream  # noqa: E402
from core.recover_masks import MaskSet  # noqa: E402

logger = logging.getLogger("bench.lottery")
CORPUS = ROOT / "reference" / "corpus"
PRUNABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_model(arch: str, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2) if arch == "small" else dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=6)
    config = LlamaConfig(vocab_size=4096, num_attention_heads=4 if arch == "small" else 8, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0, **shape)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def prunable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] in PRUNABLE}


def global_magnitude_masks(model, masks: dict[str, torch.Tensor] | None, fraction: float) -> dict[str, torch.Tensor]:
    """Remove `fraction` of the surviving prunable weights with the smallest |w| over the whole decoder."""
    weights = prunable(model)
    masks = masks or {n: torch.ones_like(p, dtype=torch.bool) for n, p in weights.items()}
    alive = torch.cat([p.detach().abs()[masks[n]].flatten() for n, p in weights.items()])
    k = int(fraction * alive.numel())
    threshold = alive.kthvalue(k).values if k else torch.tensor(-1.0)
    return {n: masks[n] & (p.detach().abs() > threshold) for n, p in weights.items()}


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    return 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


@dataclass
class Budget:
    steps: int
    rewind: int
    batch: int
    seq_len: int
    lr: float
    warmup: int
    seed: int

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup)
        return self.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / self.steps)))


def train(model, ids: torch.Tensor, budget: Budget, start: int, end: int, masks: dict | None = None,
          snapshot_at: int | None = None):
    """Train from step `start` to `end` of the schedule (data order and learning rate depend on the step only).
    Returns the weights at `snapshot_at` (if reached)."""
    maskset = MaskSet.from_model(model, masks) if masks else None
    if maskset:
        maskset.apply_()
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=(0.9, 0.95), weight_decay=0.1)
    snapshot = None
    model.train()
    for step in range(start, end):
        if step == snapshot_at:
            snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for group in optimizer.param_groups:
            group["lr"] = budget.lr_at(step)
        gen = torch.Generator().manual_seed(budget.seed * 1_000_003 + step)
        starts = torch.randint(0, ids.numel() - budget.seq_len, (budget.batch,), generator=gen)
        batch = torch.stack([ids[s:s + budget.seq_len] for s in starts.tolist()])
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        if maskset:
            maskset.mask_grads_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if maskset:
            maskset.apply_()
    model.eval()
    return snapshot


def evaluate(model, eval_ids: torch.Tensor) -> float:
    return perplexity_of_ids(model, eval_ids, max_length=128, batch_size=16).perplexity


def run(args, on_round=None) -> dict:
    """The runs; `on_round(partial result)` after every round (the results so far are written as they come)."""
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "reference" / "model")
    source = CORPUS / "train.txt"
    if not source.is_file():
        logger.warning("reference/corpus/train.txt is missing (python reference/build_corpus.py builds it); "
                       "training on calibration.txt instead")
        source = CORPUS / "calibration.txt"
    train_ids = token_stream(tokenizer, CalibrationConfig(source=str(source)), args.train_tokens)
    eval_ids = torch.tensor(tokenizer((CORPUS / "eval.txt").read_text(encoding="utf-8"),
                                      add_special_tokens=False)["input_ids"][:args.eval_tokens])
    budget = Budget(args.steps, args.rewind, args.batch, args.seq_len, args.lr, args.warmup, args.seed)
    clock = time.perf_counter()

    dense = build_model(args.arch, args.seed)
    init = {k: v.clone() for k, v in dense.state_dict().items()}
    if args.init:
        init = torch.load(args.init, weights_only=True)["model"]
        dense.load_state_dict(init)
    if args.dense:
        from core.model_io import load_pruned

        dense = load_pruned(args.dense, dtype="float32", device="cpu")
        if not args.rewind_path:
            raise SystemExit("--dense needs --rewind-weights (and --init) from reference/train.py --rewind-step")
        rewind = torch.load(args.rewind_path, weights_only=True)["model"]
    else:
        rewind = train(dense, train_ids, budget, 0, args.steps, snapshot_at=args.rewind)
    dense_ppl = evaluate(dense, eval_ids)
    logger.info("dense: perplexity %.3f", dense_ppl)
    teacher = dense
    split = TokenSplit(train_ids[:-20_000], train_ids[-20_000:], str(source.name))
    rows = []
    masks = None
    previous = dense
    for r in range(1, args.rounds + 1):
        masks = global_magnitude_masks(previous, masks, args.prune)
        s = sparsity(masks)
        # IMP with rewinding: survivors back to their step-`rewind` values, retrain from there
        ticket = build_model(args.arch, args.seed)
        ticket.load_state_dict(rewind)
        train(ticket, train_ids, budget, args.rewind, args.steps, masks)
        # control: the same masks on a fresh random initialisation, trained from scratch
        control = build_model(args.arch, args.seed + 1000 + r)
        train(control, train_ids, budget, 0, args.steps, masks)
        # one-shot magnitude pruning of the dense model to the same sparsity, then recovery
        one_shot = build_model(args.arch, args.seed)
        one_shot.load_state_dict(dense.state_dict())
        one_masks = global_magnitude_masks(one_shot, None, s)
        with torch.no_grad():
            for name, p in prunable(one_shot).items():
                p.mul_(one_masks[name])
        one_shot_ppl = evaluate(one_shot, eval_ids)
        cfg = RecoverConfig(steps=args.steps - args.rewind, batch_size=args.batch, seq_len=args.seq_len,
                            lr=args.recover_lr, warmup=args.warmup, eval_every=max(1, (args.steps - args.rewind) // 2),
                            eval_tokens=4096, patience=0, seed=args.seed)
        recovered, report = recover(one_shot, teacher, tokenizer, cfg, split=split)
        row = {"round": r, "sparsity": round(s, 4), "imp_rewind": evaluate(ticket, eval_ids),
               "random_reinit": evaluate(control, eval_ids), "one_shot": one_shot_ppl,
               "one_shot_recovered": evaluate(recovered, eval_ids), "minutes": round((time.perf_counter() - clock) / 60, 1)}
        logger.info("round %d, sparsity %.3f: %s", r, s, {k: round(v, 3) for k, v in row.items() if k != "round"})
        rows.append(row)
        previous = ticket
        if on_round is not None and r < args.rounds:
            on_round({"dense_perplexity": dense_ppl, "rows": rows, "init": "given" if args.init else
                      f"seed {args.seed}", "seconds": round(time.perf_counter() - clock, 1),
                      "partial": f"{r} of {args.rounds} rounds"})
    return {"dense_perplexity": dense_ppl, "rows": rows, "init": "given" if args.init else f"seed {args.seed}",
            "seconds": round(time.perf_counter() - clock, 1)}


def write(result: dict, args, out: Path) -> None:
    meta = {
        "command": " ".join(["python", "bench/lottery.py", *sys.argv[1:]]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor() or
        platform.machine(), "threads": args.threads, "torch": torch.__version__,
        "note": "2-core CPU shared with other jobs while it ran: budgets are in steps; the minutes are not a speed "
                "measurement",
        "budget": {"steps": args.steps, "rewind_step": args.rewind, "batch": args.batch, "seq_len": args.seq_len,
                   "tokens_per_training": args.steps * args.batch * args.seq_len, "prune_per_round": args.prune,
                   "lr": args.lr, "recover_lr": args.recover_lr, "arch": args.arch},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".json")).write_text(json.dumps({**meta, **result}, indent=2) + "\n")
    lines = [f"# Lottery ticket, {args.arch} Llama ({args.arch} config in bench/lottery.py), CPU", "",
             f"`{meta['command']}` on {meta['date']}; {meta['note']}.", "",
             *([f"**Partial: {result['partial']} finished when this was written.**", ""] if "partial" in result
               else []),
             f"Dense model: perplexity **{result['dense_perplexity']:.2f}** after {args.steps} steps of "
             f"{args.batch} x {args.seq_len} tokens. Each round removes {args.prune:.0%} of the surviving decoder "
             "weights (global magnitude); embeddings and norms are never pruned.", "",
             "| round | sparsity of decoder weights | IMP + rewind to step "
             f"{args.rewind} | same masks, random re-init | one-shot magnitude | one-shot + recovery |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['round']} | {row['sparsity']:.1%} | {row['imp_rewind']:.2f} | "
                     f"{row['random_reinit']:.2f} | {row['one_shot']:.2f} | {row['one_shot_recovered']:.2f} |")
    lines += ["", "Perplexity on the first "
              f"{args.eval_tokens:,} tokens of reference/corpus/eval.txt (lower is better). Retraining budgets: IMP "
              f"retrains {args.steps - args.rewind} steps per round (cumulative: round x that), the random re-init "
              f"trains {args.steps} steps, one-shot + recovery distils {args.steps - args.rewind} steps from the dense "
              "model.", ""]
    (out.with_suffix(".md")).write_text("\n".join(lines))
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [r["sparsity"] * 100 for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, style in (("imp_rewind", "IMP + rewind", "o-"), ("random_reinit", "same masks, random init", "s--"),
                              ("one_shot", "one-shot magnitude", "x:"),
                              ("one_shot_recovered", "one-shot + recovery", "d-.")):
        ax.plot(x, [r[key] for r in rows], style, label=label)
    ax.axhline(result["dense_perplexity"], color="grey", lw=0.8, label="dense")
    ax.set_xlabel("sparsity of the decoder weights (%)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Lottery ticket on a small Llama (CPU budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=["small", "reference"], default="small")
    p.add_argument("--steps", type=int, default=200, help="training steps of the dense model and of each control")
    p.add_argument("--rewind", type=int, default=20, help="rewind point (step)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prune", type=float, default=0.2, help="fraction of surviving weights removed per round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--recover-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--train-tokens", type=int, default=1_000_000)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="initial weights saved by reference/train.py (WORK/init.pt)")
    p.add_argument("--rewind-weights", dest="rewind_path", help="rewind weights saved by reference/train.py")
    p.add_argument("--dense", help="the trained dense model (with --init and --rewind-weights)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = args.out or ROOT / "bench" / "results" / f"lottery_{args.arch}_cpu"
    result = run(args, on_round=lambda partial: write(partial, args, out))
    write(result, args, out)


if __name__ == "__main__":
    main()
