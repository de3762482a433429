"""The `recover:` section of a recipe: recovery training after pruning (distillation from the unpruned model, LoRA
or all weights), its budget, data and the prune -> recover round schedule. Typed and validated here so the CLI,
the Space and the bot share one definition."""
from __future__ import annotations

from dataclasses import dataclass

from .calibration import CalibrationConfig
from .errors import RecipeError

TRAINABLE = ("all", "lora")
SCHEDULES = ("linear", "cubic")
DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery training. The budget is `steps` optimizer steps of `batch_size` x `seq_len` tokens (optionally
    capped by `max_seconds`); a front end passes the budget and gets progress callbacks.

    Objective: kd * T^2 KL(teacher || student at temperature T) + lm * cross-entropy + hidden * relative MSE of
    aligned hidden states (student layer -> the teacher layer it came from).
    Data: `data` (default: the recipe's calibration source) split into a training part and a held-out part
    (`holdout` fraction, disjoint tokens) used for evaluation, early stopping and keeping the best state.
    Rounds: with `rounds` > 1, `prune` reaches its target in that many prune -> recover rounds (the target follows
    a linear or cubic schedule); `steps` is the total over all rounds, split evenly.
    """

    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    lr: float | None = None  # default: from the model width (see `learning_rate`)
    warmup: int = 10
    weight_decay: float = 0.0
    kd: float = 1.0
    lm: float = 0.0
    hidden: float = 0.0
    temperature: float = 2.0
    hidden_layers: tuple[int, ...] | None = None  # student layers in the hidden-state loss (default: all)
    trainable: str = "all"  # 'all' weights or 'lora' adapters (merged back before export)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    data: CalibrationConfig | None = None  # default: the recipe's calibration source
    data_tokens: int = 2_000_000  # at most this many tokens are read from the data source
    holdout: float = 0.1
    eval_every: int = 50
    eval_tokens: int = 16_384
    patience: int = 4  # stop after this many evaluations without a better held-out loss (0: never)
    checkpoint_every: int = 100
    max_seconds: float | None = None
    dtype: str = "auto"  # 'auto': bfloat16 on GPUs, float32 on CPUs
    gradient_checkpointing: bool | None = None  # default: on when training on a GPU
    seed: int = 0
    teacher: str | None = None  # default: the unpruned model the recipe starts from
    rounds: int = 1
    schedule: str = "linear"

    def __post_init__(self) -> None:
        for name in ("steps", "warmup", "patience", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise RecipeError(f"recover.{name} must be >= 0 (got {getattr(self, name)}).")
        for name in ("batch_size", "lora_rank", "eval_every", "rounds"):
            if getattr(self, name) < 1:
                raise RecipeError(f"recover.{name} must be >= 1 (got {getattr(self, name)}).")
        if self.seq_len < 2:
            raise RecipeError(f"recover.seq_len must be >= 2 (got {self.seq_len}).")
        if min(self.kd, self.lm, self.hidden) < 0 or self.kd + self.lm + self.hidden <= 0:
            raise RecipeError("recover: the loss weights kd, lm and hidden must be >= 0 and not all zero.")
        if self.temperature <= 0:
            raise RecipeError(f"recover.temperature must be positive (got {self.temperature}).")
        if self.lr is not None and self.lr <= 0:
            raise RecipeError(f"recover.lr must be positive (got {self.lr}).")
        if not 0 < self.holdout < 1:
            raise RecipeError(f"recover.holdout is the held-out fraction of the data, in (0, 1) (got {self.holdout}).")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise RecipeError(f"recover.max_seconds must be positive (got {self.max_seconds}).")
        for value, allowed, what in ((self.trainable, TRAINABLE, "trainable"), (self.schedule, SCHEDULES, "schedule"),
                                     (self.dtype, DTYPES, "dtype")):
            if value not in allowed:
                raise RecipeError(f"recover.{what} must be one of {', '.join(allowed)} (got {value!r}).")
        if self.hidden_layers is not None:
            object.__setattr__(self, "hidden_layers", tuple(int(i) for i in self.hidden_layers))

    def learning_rate(self, hidden_size: int) -> float:
        """`lr`, or a default that shrinks with the width (as learning rates do across model sizes): all weights
        2.5e-4 x 1024 / hidden (1e-3 for the 256-wide reference model, 6e-5 at 4096 as in Minitron's
        distillation), LoRA adapters four times that, clamped to [1e-4, 2e-3]."""
        if self.lr is not None:
            return self.lr
        full = min(1e-3, max(1e-5, 2.5e-4 * 1024 / hidden_size))
        return full if self.trainable == "all" else min(2e-3, max(1e-4, 4 * full))

    @property
    def uses_teacher(self) -> bool:
        return self.steps > 0 and (self.kd > 0 or self.hidden > 0)

    def objective(self) -> str:
        parts = [f"{w:g} x {name}" for w, name in ((self.kd, f"logit KD (T={self.temperature:g})"),
                                                   (self.lm, "LM cross-entropy"),
                                                   (self.hidden, "hidden-state MSE")) if w > 0]
        return " + ".join(parts)
