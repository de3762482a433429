"""Settings of the Space, read once from the environment (tests build them directly)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from core.model_io import REFERENCE_MODEL

ROOT = Path(__file__).resolve().parent.parent
EVAL_TEXT = ROOT / "reference" / "corpus" / "eval.txt"


def on_space() -> bool:
    """True when running on Hugging Face Spaces (the platform's variables, read the way Gradio reads them)."""
    return os.environ.get("SYSTEM") == "spaces" and bool(os.environ.get("SPACE_ID"))


@dataclass(frozen=True)
class Settings:
    """What the Space runs with.

    default_model: the folder pruned when the model box is empty (SPACE_DEFAULT_MODEL, default: reference model).
    eval_tokens / eval_length: perplexity on the first N tokens of the held-out text, in windows of this length.
    speed_*: `core.speed.measure_speed` settings; small, since only base/pruned ratios are shown; each model is
        measured `speed_rounds` times in alternation with the other and keeps its best round.
    measure_speed: whether the speed measurement is on by default (None: on with a GPU, off on a CPU, where it
        takes most of a job's time).
    device: where models run ('cpu', 'cuda', 'cuda:1'; None: a GPU when there is one).
    ppl_warn_ratio: a loud warning when the pruned model's perplexity is more than this many times the base's.
    gpu_max_seconds: the longest GPU time one job asks ZeroGPU for.
    allow_local_paths: accept server folders in the model box (never on a Space: it would expose the disk).
    endpoint: Hub URL (None: huggingface_hub's default, i.e. HF_ENDPOINT).
    work_dir: parent of the per-job temporary folders (None: the system temp folder).
    """

    default_model: Path = REFERENCE_MODEL
    default_model_label: str = "reference model (shipped with the tool)"
    eval_text: Path = EVAL_TEXT
    eval_tokens: int = 4096
    eval_length: int = 256
    speed_prompt_tokens: int = 128
    speed_new_tokens: int = 32
    speed_batch_sizes: tuple[int, ...] = (1,)
    speed_repeats: int = 3
    speed_rounds: int = 2
    generation_tokens: int = 40
    max_upload_mb: int = 50
    keep_results: int = 2
    queue_size: int = 8
    measure_speed: bool | None = None
    device: str | None = None
    ppl_warn_ratio: float = 2.0
    gpu_max_seconds: int = 300
    allow_local_paths: bool = field(default_factory=lambda: not on_space())
    on_space: bool = field(default_factory=on_space)
    endpoint: str | None = None
    work_dir: Path | None = None

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        kwargs: dict = {}
        if env.get("SPACE_DEFAULT_MODEL"):
            kwargs["default_model"] = Path(env["SPACE_DEFAULT_MODEL"]).resolve()
            kwargs["default_model_label"] = f"default model ({Path(env['SPACE_DEFAULT_MODEL']).name})"
        for key, name in (("eval_tokens", "SPACE_EVAL_TOKENS"), ("speed_repeats", "SPACE_SPEED_REPEATS"),
                          ("speed_rounds", "SPACE_SPEED_ROUNDS"),
                          ("speed_prompt_tokens", "SPACE_SPEED_PROMPT_TOKENS"),
                          ("speed_new_tokens", "SPACE_SPEED_NEW_TOKENS"), ("queue_size", "SPACE_QUEUE_SIZE")):
            if env.get(name):
                kwargs[key] = int(env[name])
        if env.get("SPACE_WORK_DIR"):
            kwargs["work_dir"] = Path(env["SPACE_WORK_DIR"])
        if env.get("SPACE_MEASURE_SPEED"):
            kwargs["measure_speed"] = env["SPACE_MEASURE_SPEED"].lower() in ("1", "true", "yes", "on")
        if env.get("SPACE_DEVICE") and env["SPACE_DEVICE"] != "auto":
            kwargs["device"] = env["SPACE_DEVICE"]
        if env.get("SPACE_PPL_WARN"):
            kwargs["ppl_warn_ratio"] = float(env["SPACE_PPL_WARN"])
        if env.get("SPACE_GPU_MAX_SECONDS"):
            kwargs["gpu_max_seconds"] = int(env["SPACE_GPU_MAX_SECONDS"])
        return cls(**kwargs)

    def speed_by_default(self) -> bool:
        """The speed checkbox's initial state: measured by default only where it is quick (a GPU)."""
        if self.measure_speed is not None:
            return self.measure_speed
        from .gpu import has_gpu

        return has_gpu(self.device)
