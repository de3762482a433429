"""Train the reference byte-level BPE tokenizer on ``reference/corpus/train.txt``.

Writes ``tokenizer.json`` and ``tokenizer_config.json`` to ``--out`` (default
``reference/model``) so that ``AutoTokenizer.from_pretrained`` loads it as a fast tokenizer,
then checks that it loads and round-trips the calibration text::

    python reference/train_tokenizer.py
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from common import CORPUS_DIR, EOS_TOKEN, MAX_POSITIONS, MODEL_DIR, VOCAB_SIZE, setup

log = logging.getLogger("train_tokenizer")


def train(train_file: Path, vocab_size: int) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE with ``EOS_TOKEN`` as its only special token (id 0)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(train_file)], trainer)
    return tokenizer


def save(tokenizer: Tokenizer, out: Path) -> None:
    """Save as a transformers fast tokenizer (bos = eos = unk = pad = ``EOS_TOKEN``)."""
    out.mkdir(parents=True, exist_ok=True)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    wrapped.save_pretrained(out)
    # transformers 5 writes its internal class name; the public alias also loads in 4.x.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check(out: Path, text: str) -> None:
    """Load ``out`` with AutoTokenizer and verify an exact encode/decode round trip of ``text``."""
    loaded = AutoTokenizer.from_pretrained(out)
    if not loaded.is_fast:
        raise RuntimeError(f"{out} did not load as a fast tokenizer")
    ids = loaded(text, add_special_tokens=False, verbose=False)["input_ids"]
    if loaded.decode(ids) != text:
        raise RuntimeError("encode/decode round trip failed")
    log.info("loaded %s (vocab %d, eos %r = %d); round trip of %d chars -> %d tokens OK "
             "(%.2f chars/token)", type(loaded).__name__, len(loaded), loaded.eos_token,
             loaded.eos_token_id, len(text), len(ids), len(text) / len(ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-file", type=Path, default=CORPUS_DIR / "train.txt")
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    setup(args.threads)
    tokenizer = train(args.train_file, args.vocab_size)
    log.info("trained vocab of %d tokens on %s", tokenizer.get_vocab_size(), args.train_file)
    save(tokenizer, args.out)
    check(args.out, (CORPUS_DIR / "calibration.txt").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
