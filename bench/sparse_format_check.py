"""Conformance of our compressed sparse checkpoints with compressed-tensors' own sparse compressors.

compressed-tensors dropped its sparse compressors after 0.14 (transformers 5 needs >= 0.15), so this check runs in
a separate virtual environment that has compressed-tensors 0.14.0.1 next to our pinned packages:

    python -m venv --system-site-packages /work/venvs/ct014
    /work/venvs/ct014/bin/pip install --no-deps compressed-tensors==0.14.0.1
    /work/venvs/ct014/bin/python bench/sparse_format_check.py

For 2:4 (sparse-24-bitmask) and 60% unstructured (sparse-bitmask) magnitude sparsity of the reference model it
writes our compressed checkpoint, then (1) decompresses it with compressed-tensors' compressor and compares every
weight with ours, and (2) compresses our dense weights with compressed-tensors and compares every stored tensor
(names, dtypes, shapes, values) with the file we wrote. Results: bench/results/sparse_format_ct014.{json,md}.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core  # noqa: E402
from core.sparse_format import sparsity_config  # noqa: E402


def check(pattern: str, ratio: float, tmp: Path) -> dict:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from safetensors import safe_open

    model, tok = core.load_model(None, core.LoadOptions(dtype="bfloat16", device="cpu"))
    result = core.prune(model, tok, core.Recipe(method="sparsity", score="magnitude", target=core.Target(ratio=ratio),
                                                options={"pattern": pattern}))
    out = core.save_pruned(result, tmp / pattern.replace(":", ""), sparse_format="compressed")
    sc = sparsity_config(json.loads((out / "config.json").read_text()))
    config = SparsityCompressionConfig.load_from_registry(sc["format"], **{k: v for k, v in sc.items() if k != "format"})
    compressor = BaseCompressor.load_from_registry(sc["format"], config=config)
    dense = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    theirs = dict(compressor.decompress(str(out)))
    mismatched = [k for k, v in dense.items() if k not in theirs or not torch.equal(theirs[k].to(v.dtype), v)]
    targets = {k[: -len(".weight")] for k in dense if k.endswith(".weight") and ".layers." in k and dense[k].dim() == 2}
    recompressed = compressor.compress(dense, compression_targets=targets)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
    differing = sorted(k for k in set(ours) | set(recompressed)
                       if k not in ours or k not in recompressed or ours[k].dtype != recompressed[k].dtype
                       or not torch.equal(ours[k], recompressed[k]))
    return {"pattern": pattern, "ratio": ratio, "format": sc["format"], "sparsity_config": sc,
            "weights_decompressed_by_compressed_tensors": len(theirs), "weights_differing_after_decompression":
            mismatched, "stored_tensors": len(ours), "stored_tensors_differing_from_compressed_tensors": differing,
            "disk_bytes": (out / "model.safetensors").stat().st_size}


def main() -> None:
    import compressed_tensors

    with tempfile.TemporaryDirectory() as tmp:
        rows = [check("2:4", 0.5, Path(tmp)), check("unstructured", 0.6, Path(tmp))]
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
           "torch": torch.__version__, "compressed_tensors": compressed_tensors.__version__,
           "command": "/work/venvs/ct014/bin/python bench/sparse_format_check.py", "results": rows}
    results = ROOT / "bench" / "results"
    (results / "sparse_format_ct014.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Compressed sparse checkpoints vs compressed-tensors {compressed_tensors.__version__}", "",
             f"{doc['date']}, torch {doc['torch']}, command `{doc['command']}`", "",
             "| pattern | format | weights decompressed by compressed-tensors | differing from ours | stored tensors "
             "| differing from compressed-tensors' own compression |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['pattern']} | {r['format']} | {r['weights_decompressed_by_compressed_tensors']} | "
              f"{len(r['weights_differing_after_decompression'])} | {r['stored_tensors']} | "
              f"{len(r['stored_tensors_differing_from_compressed_tensors'])} |" for r in rows]
    (results / "sparse_format_ct014.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
