"""The bot's typed configuration (YAML): Hub endpoint, token and secret by environment variable name, target
organization, limits, evaluation settings, triggers and watch entries with their recipes.

```yaml
hub:
  endpoint: https://huggingface.co
  token_env: HF_BOT_TOKEN            # the NAME of the variable holding the token; never the token itself
  disable_xet: false                 # true for Hub-compatible servers without Xet (the local Hub)
target_org: pruners
database: bot.sqlite                 # relative paths are relative to this file
limits: {max_params: 3e9, max_attempts: 4, backoff_s: 30, backoff_max_s: 3600, retry_after_max_s: 900,
         inline_wait_max_s: 10, lease_s: 300}
visibility: {private_sources: private, gated_sources: gated}   # or `refuse`: no variant of such sources
evaluation:
  text: reference/corpus/eval.txt    # perplexity text (default: the shipped held-out text)
  max_tokens: 4096
  speed: {prompt_tokens: 128, new_tokens: 32, batch_sizes: [1], repeats: 3}   # or `speed: false`
  tasks: [pydoc_cloze]               # optional lm-eval tasks
server: {host: 127.0.0.1, port: 8080, status_token_env: HF_BOT_STATUS_TOKEN}  # /status, / (HTML), the webhook
webhook: {path: /webhook, secret_env: HF_BOT_WEBHOOK_SECRET, max_body_bytes: 1000000}   # Hub webhooks (needs server:)
polling: {interval_s: 300}           # polling model_info / list_models; 0 or absent = no polling
device: cpu                          # where pruning and evaluation run
publish_dtype: source                # weights are published in the source's dtype (or float32/bfloat16/float16)
torch_threads: null                  # CPU threads for torch; 1 helps on busy shared machines
watch:
  - repo: alice/tiny-llama           # or `author: alice` (every model of a user or organization)
    publish: repo                    # repo: {target_org}/{model}-{method}-{pct}pct ; pr: a PR on the source repo
    recipes:                         # core.Recipe dicts without `model`
      - {method: maw_range, target: {ratio: 0.3}}
      - {method: slimllm, target: {ratio: 0.2}, calibration: {n_samples: 16, seq_len: 128}}
```
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .errors import ConfigError
from .recipes import RecipeEntry, recipe_entry

DEFAULT_EVAL_TEXT = Path(__file__).resolve().parent.parent / "reference" / "corpus" / "eval.txt"


@dataclass(frozen=True)
class HubSettings:
    endpoint: str = "https://huggingface.co"
    token_env: str = "HF_BOT_TOKEN"
    disable_xet: bool = False

    def token(self) -> str:
        """The bot's token, read from the environment variable named by `token_env`."""
        value = os.environ.get(self.token_env, "").strip()
        if not value:
            raise ConfigError(f"The bot's Hub token is missing: set the environment variable {self.token_env} "
                              "(the config names the variable, it never holds the token).")
        return value


@dataclass(frozen=True)
class Limits:
    max_params: float = 3e9  # refuse sources larger than this (parameters, from the safetensors headers)
    max_attempts: int = 4  # transient failures are retried this many times in all
    backoff_s: float = 30.0  # first retry delay; doubles per attempt
    backoff_max_s: float = 3600.0
    retry_after_max_s: float = 900.0  # the Hub's Retry-After is honoured up to this (the job is requeued, not slept on)
    inline_wait_max_s: float = 10.0  # longer waits end the attempt: the job goes back to the queue with its due time
    lease_s: float = 300.0  # a running job's lease (renewed while the worker is alive; recovered after it expires)


@dataclass(frozen=True)
class SpeedSettings:
    prompt_tokens: int = 128
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1,)
    repeats: int = 3


@dataclass(frozen=True)
class EvalSettings:
    text: str | None = None  # None: the shipped held-out text
    text_label: str | None = None  # how cards name the text (default: the file name)
    max_tokens: int | None = 4096
    max_length: int = 256
    speed: SpeedSettings | None = field(default_factory=SpeedSettings)
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    task_dirs: tuple[str, ...] = ()

    @property
    def text_path(self) -> Path:
        return Path(self.text) if self.text else DEFAULT_EVAL_TEXT

    def to_core(self):
        """The same settings as core.compare.EvalSettings (one way to measure for every front end)."""
        from core.compare import EvalSettings as CoreSettings

        label = self.text_label or (CoreSettings.text_label if not self.text else self.text_path.name)
        speed = self.speed or SpeedSettings()
        return CoreSettings(text=self.text_path, text_label=label, max_tokens=self.max_tokens,
                            max_length=self.max_length, speed=self.speed is not None,
                            prompt_tokens=speed.prompt_tokens, new_tokens=speed.new_tokens,
                            batch_sizes=tuple(speed.batch_sizes), repeats=speed.repeats, tasks=self.tasks,
                            task_dirs=self.task_dirs, task_limit=self.task_limit)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    status_token_env: str = "HF_BOT_STATUS_TOKEN"  # operators see private jobs on /status with this bearer token

    def status_token(self) -> str | None:
        return os.environ.get(self.status_token_env, "").strip() or None


@dataclass(frozen=True)
class VisibilitySettings:
    private_sources: str = "private"  # private: their variants are private; refuse: no variant at all
    gated_sources: str = "gated"  # gated: their variants are gated alike; refuse: no variant at all


@dataclass(frozen=True)
class WebhookSettings:
    path: str = "/webhook"
    secret_env: str = "HF_BOT_WEBHOOK_SECRET"
    max_body_bytes: int = 1_000_000  # the Hub's payloads are a few KB

    def secret(self) -> str:
        value = os.environ.get(self.secret_env, "")
        if not value:
            raise ConfigError(f"The webhook secret is missing: set the environment variable {self.secret_env} "
                              "to the secret configured on the Hub webhook.")
        return value


@dataclass(frozen=True)
class WatchEntry:
    repo: str | None
    author: str | None
    recipes: tuple[RecipeEntry, ...]
    publish: str = "repo"  # repo | pr
    target_org: str | None = None  # overrides the global target_org
    private: bool = False

    def matches(self, repo_id: str) -> bool:
        if self.repo:
            return self.repo.lower() == repo_id.lower()
        return repo_id.split("/")[0].lower() == (self.author or "").lower()


@dataclass(frozen=True)
class BotConfig:
    hub: HubSettings
    target_org: str | None
    database: Path
    watch: tuple[WatchEntry, ...]
    limits: Limits = field(default_factory=Limits)
    visibility: VisibilitySettings = field(default_factory=VisibilitySettings)
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    server: ServerSettings | None = None
    webhook: WebhookSettings | None = None
    poll_interval_s: float = 0.0
    device: str = "cpu"
    publish_dtype: str = "source"  # dtype of the published weights: the source's, or float32/bfloat16/float16
    torch_threads: int | None = None  # CPU threads for torch (None: torch's default); 1 on busy shared machines
    work_dir: Path | None = None  # where temporary job folders go (default: the system temp dir)

    @classmethod
    def from_file(cls, path: str | Path) -> "BotConfig":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError(f"Cannot read the bot config {path}: {err.strerror}.") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"The bot config {path} is not valid YAML: {err}") from None
        return cls.from_dict(data, base_dir=path.resolve().parent)

    @classmethod
    def from_dict(cls, data, base_dir: str | Path = ".") -> "BotConfig":
        if not isinstance(data, dict):
            raise ConfigError("The bot config must be a YAML mapping (hub:, target_org:, watch:, ...).")
        base_dir = Path(base_dir)
        known = ("hub", "target_org", "database", "limits", "visibility", "evaluation", "server", "webhook",
                 "polling", "watch", "device", "publish_dtype", "torch_threads", "work_dir")
        _check_keys(data, known, "config")
        hub = _section(HubSettings, data.get("hub"), "hub")
        if "token" in (data.get("hub") or {}):
            raise ConfigError("hub.token is not allowed: put the token in an environment variable and name it with "
                              "hub.token_env.")
        limits = _section(Limits, data.get("limits"), "limits")
        if limits.max_attempts < 1:
            raise ConfigError("limits.max_attempts must be >= 1.")
        if limits.lease_s < 1:
            raise ConfigError("limits.lease_s must be at least 1 second.")
        visibility = _section(VisibilitySettings, data.get("visibility"), "visibility")
        if visibility.private_sources not in ("private", "refuse"):
            raise ConfigError("visibility.private_sources must be 'private' (private variants) or 'refuse' (none).")
        if visibility.gated_sources not in ("gated", "refuse"):
            raise ConfigError("visibility.gated_sources must be 'gated' (gated variants) or 'refuse' (none).")
        evaluation = _eval_settings(data.get("evaluation"), base_dir)
        server = None if data.get("server") in (None, False) else _section(ServerSettings, data["server"], "server")
        webhook = None if data.get("webhook") in (None, False) else _section(WebhookSettings, data["webhook"],
                                                                              "webhook")
        if webhook and not server:
            raise ConfigError("webhook: needs a `server: {host, port}` to receive the Hub's deliveries.")
        if webhook and not webhook.path.startswith("/"):
            raise ConfigError(f"webhook.path must start with '/' (got {webhook.path!r}).")
        if webhook and webhook.max_body_bytes < 1024:
            raise ConfigError("webhook.max_body_bytes must be at least 1024 (the Hub's payloads are a few KB).")
        polling = data.get("polling") or {}
        _check_keys(polling, ("interval_s",), "polling")
        target_org = data.get("target_org")
        if target_org is not None and not valid_repo_id(f"{target_org}/x"):
            raise ConfigError(f"target_org {target_org!r} is not a valid user or organization name.")
        watch = tuple(_watch_entry(e, i) for i, e in enumerate(data.get("watch") or []))
        if not watch:
            raise ConfigError("The config watches nothing: add `watch:` entries with `repo:` or `author:`.")
        for entry in watch:
            if entry.publish == "repo" and not (entry.target_org or target_org):
                raise ConfigError(f"Watch entry {entry.repo or entry.author!r} publishes new repos but no "
                                  "target_org is set (globally or on the entry).")
        if not webhook and not polling.get("interval_s"):
            raise ConfigError("No trigger configured: set `webhook:` and/or `polling: {interval_s: N}`.")
        database = Path(data.get("database") or "hub_bot.sqlite")
        work_dir = data.get("work_dir")
        publish_dtype = str(data.get("publish_dtype") or "source")
        if publish_dtype not in ("source", "float32", "bfloat16", "float16"):
            raise ConfigError(f"publish_dtype must be source, float32, bfloat16 or float16 (got {publish_dtype!r}).")
        return cls(hub=hub, target_org=target_org, database=database if database.is_absolute() else base_dir / database,
                   watch=watch, limits=limits, visibility=visibility, evaluation=evaluation, server=server,
                   webhook=webhook,
                   poll_interval_s=float(polling.get("interval_s") or 0), device=str(data.get("device") or "cpu"),
                   publish_dtype=publish_dtype, torch_threads=_positive_int(data.get("torch_threads"), "torch_threads"),
                   work_dir=Path(work_dir) if work_dir else None)

    def entries_for(self, repo_id: str) -> list[WatchEntry]:
        return [e for e in self.watch if e.matches(repo_id)]


def valid_repo_id(repo_id: str) -> bool:
    """huggingface_hub's own check of a repo id (no '..', '--', path separators, at most 96 characters)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(repo_id))
    except HFValidationError:
        return False
    return True


def _positive_int(value, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{where} must be a positive integer (got {value!r}).")
    return value


def _check_keys(data: dict, known: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping.")
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Unknown key {key!r} in {where}.{hint} Known keys: {', '.join(known)}.")


def _section(cls, data, where: str):
    data = data or {}
    names = tuple(f.name for f in fields(cls))
    _check_keys(data, names, where)
    values, defaults = {}, cls()
    for f in fields(cls):
        if f.name not in data:
            continue
        value, default = data[f.name], getattr(defaults, f.name)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{f.name} must be true or false (got {value!r}).")
        elif isinstance(default, (int, float)) and not isinstance(default, bool):
            try:
                value = int(float(value)) if isinstance(default, int) else float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.{f.name} must be a number (got {value!r}).") from None
        elif isinstance(default, tuple):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}.{f.name} must be a list (got {value!r}).")
            value = tuple(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{where}.{f.name} must be a string (got {value!r}).")
        values[f.name] = value
    return cls(**values)


def _eval_settings(data, base_dir: Path) -> EvalSettings:
    data = dict(data or {})
    _check_keys(data, tuple(f.name for f in fields(EvalSettings)), "evaluation")
    speed = data.pop("speed", {})
    settings = {}
    if data.get("text"):
        text = Path(data.pop("text"))
        settings["text"] = str(text if text.is_absolute() else base_dir / text)
    if data.get("text_label"):
        settings["text_label"] = str(data.pop("text_label"))
    for key in ("max_tokens", "task_limit"):
        if key in data:
            settings[key] = None if data[key] is None else int(data.pop(key))
    if "max_length" in data:
        settings["max_length"] = int(data.pop("max_length"))
    for key in ("tasks", "task_dirs"):
        if key in data:
            value = data.pop(key) or []
            if not isinstance(value, list):
                raise ConfigError(f"evaluation.{key} must be a list.")
            settings[key] = tuple(str(v) for v in value)
    settings["speed"] = None if speed is False else _section(SpeedSettings, speed, "evaluation.speed")
    result = EvalSettings(**settings)
    if not result.text_path.is_file():
        raise ConfigError(f"The evaluation text {result.text_path} does not exist; set evaluation.text to a "
                          "UTF-8 text file.")
    return result


def _watch_entry(data, index: int) -> WatchEntry:
    where = f"watch[{index}]"
    _check_keys(data, ("repo", "author", "recipes", "publish", "target_org", "private"), where)
    repo, author = data.get("repo"), data.get("author")
    if bool(repo) == bool(author):
        raise ConfigError(f"{where} needs exactly one of `repo: owner/name` or `author: name`.")
    if repo and ("/" not in repo or not valid_repo_id(repo)):
        raise ConfigError(f"{where}.repo {repo!r} is not a repo id of the form owner/name.")
    if author and not valid_repo_id(f"{author}/x"):
        raise ConfigError(f"{where}.author {author!r} is not a user or organization name.")
    publish = data.get("publish", "repo")
    if publish not in ("repo", "pr"):
        raise ConfigError(f"{where}.publish must be 'repo' (a new repo in target_org) or 'pr' (a pull request "
                          f"on the source repo), got {publish!r}.")
    recipes = data.get("recipes") or []
    if not isinstance(recipes, list) or not recipes:
        raise ConfigError(f"{where} has no recipes: add e.g. `recipes: [{{method: maw_range, target: "
                          "{ratio: 0.3}}]`.")
    entries = tuple(recipe_entry(r, f"{where}.recipes[{i}]") for i, r in enumerate(recipes))
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} has two recipes named the same ({names}); give them distinct `name:`s.")
    return WatchEntry(repo=repo, author=author, recipes=entries, publish=publish, target_org=data.get("target_org"),
                      private=bool(data.get("private", False)))
