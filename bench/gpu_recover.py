"""Recovery training on a GPU at the 8B shape (Llama-3-8B: hidden 4096, 32 layers, MLP 14336, 32/8 heads, vocab
128256), random weights built on the device (no download): the teacher, a student with 20% of its MLP width
removed, and recovery steps with LoRA adapters and with all weights, in bfloat16 with gradient checkpointing.
Measures tokens/s (teacher forward + student forward/backward + optimizer step, after one warm-up step) and the
peak GPU memory, next to the core's memory estimate (core/recover_memory.py).

    python bench/gpu_recover.py                      # both, 10 timed steps of 4 x 1024 tokens
    python bench/gpu_recover.py --trainables lora --steps 20 --seq-len 2048

Writes bench/results/recover_8b_gpu.{json,md}. Needs one GPU with ~100 GB (all weights) or ~45 GB (LoRA).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core  # noqa: E402
from core.recover import Recovery  # noqa: E402
from core.recover_config import RecoverConfig  # noqa: E402
from core.recover_memory import GiB  # noqa: E402

logger = logging.getLogger("bench.gpu_recover")
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
             tie_word_embeddings=False)


def build(config, device: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.eval()


def run_case(teacher, student_state, student_config, tokenizer, trainable: str, args) -> dict:
    from transformers import LlamaForCausalLM

    with torch.device(args.device):
        student = LlamaForCausalLM(student_config).to(torch.bfloat16)
    student.load_state_dict(student_state)
    cfg = RecoverConfig(steps=args.steps + 1, batch_size=args.batch, seq_len=args.seq_len, trainable=trainable,
                        eval_every=10 ** 6, eval_tokens=args.seq_len, patience=0, warmup=1, data_tokens=400_000,
                        gradient_checkpointing=True, dtype="bfloat16")
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(stage, done, total):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run = Recovery(student, teacher, tokenizer, cfg, progress=tick)
    estimate = run.memory_estimate(sum(p.numel() for p in student.parameters()) if trainable == "all" else 0)
    last[0] = time.perf_counter()
    _, report = run.run()
    timed = times[1:]  # the first step includes allocation and kernel selection
    tokens = args.batch * args.seq_len * len(timed)
    row = {"trainable": trainable, "trainable_parameters": report["trainable_parameters"],
           "tokens_per_second": round(tokens / sum(timed), 1), "seconds_per_step": round(sum(timed) / len(timed), 3),
           "peak_gib": round(torch.cuda.max_memory_allocated() / GiB, 1) if args.device.startswith("cuda") else None,
           "estimate_gib": round(estimate.total / GiB, 1), "steps_timed": len(timed),
           "heldout_perplexity": report["heldout_perplexity"]}
    logger.info("%s", row)
    del student, run
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    from transformers import AutoTokenizer, LlamaConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--trainables", default="lora,all")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    shape = SHAPE
    if args.smoke:
        args.device = "cpu"
        shape = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=4096)
    elif not torch.cuda.is_available():
        sys.stderr.write("error: this benchmark needs a CUDA GPU (--smoke checks the script on the CPU)\n")
        return 2
    config = LlamaConfig(**shape)
    teacher = build(config, args.device)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "reference" / "model")  # ids < 4096 fit the vocabulary
    student = build(config, args.device)
    student.load_state_dict(teacher.state_dict())
    core.prune(student, tokenizer, core.Recipe(method="mlp_width", score="maw", target=core.Target(ratio=0.2)))
    student_state = {k: v.cpu() for k, v in student.state_dict().items()}  # one student on the device at a time
    student_config = student.config
    del student
    rows = [run_case(teacher, student_state, student_config, tokenizer, t, args) for t in args.trainables.split(",")]
    doc = {"command": "python bench/gpu_recover.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.datetime.now(datetime.UTC).isoformat(),
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (smoke run)",
           "torch": torch.__version__, "shape": "Llama-3-8B (random weights)", "batch": [args.batch, args.seq_len],
           "rows": rows}
    out = ROOT / "bench" / ("results/recover_8b_gpu" if not args.smoke else ".cache/recover_smoke_cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Recovery training at the 8B shape (GPU)", "", f"`{doc['command']}` on {doc['gpu']}, {doc['date'][:10]}",
             "", f"Llama-3-8B shape with random weights; student: MLP width -20%; bf16, gradient checkpointing; batch "
             f"{args.batch} x {args.seq_len} tokens; teacher forward + student forward/backward + AdamW per step.", "",
             "| trained | trainable parameters | tokens/s | s/step | peak GPU memory (GiB) | core's estimate (GiB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['trainable']} | {r['trainable_parameters']:,} | {r['tokens_per_second']} | "
              f"{r['seconds_per_step']} | {r['peak_gib']} | {r['estimate_gib']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    logger.info("wrote %s.{json,md}", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
