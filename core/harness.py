"""lm-eval on an in-memory (pruned) model through lm-eval's own HF wrapper.

Task folders may use `${TASK_DIR}` in their YAML (e.g. for local data files); it is replaced by the folder's
absolute path, so task folders work from any working directory. The repository ships an offline task
(`reference/tasks`, task `pydoc_cloze`), always available.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import PruningError

logger = logging.getLogger(__name__)

# the pruning literature's zero-shot set (needs the datasets from the Hub)
DEFAULT_TASKS = ("wikitext", "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
BUNDLED_TASKS = Path(__file__).resolve().parent.parent / "reference" / "tasks"


@contextmanager
def prepared_task_dirs(task_dirs: list[str | Path]) -> Iterator[list[str]]:
    """Copies of the task folders' YAML files with ${TASK_DIR} filled in (removed afterwards)."""
    tmp = Path(tempfile.mkdtemp(prefix="lm-eval-tasks-"))
    try:
        out = []
        for n, folder in enumerate(Path(d).resolve() for d in task_dirs):
            if not folder.is_dir():
                raise PruningError(f"Task folder {folder} does not exist.")
            target = tmp / str(n)
            target.mkdir()
            for yaml_file in folder.glob("*.yaml"):
                text = yaml_file.read_text(encoding="utf-8").replace("${TASK_DIR}", str(folder))
                (target / yaml_file.name).write_text(text, encoding="utf-8")
            out.append(str(target))
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _metrics(entry: dict) -> dict:
    """'acc,none' -> 'acc'; keeps numbers only."""
    out = {}
    for key, value in entry.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "sample_len":
            metric, _, filt = key.partition(",")
            out[metric if filt in ("", "none") else f"{metric}[{filt}]"] = value
    return out


def run_tasks(model, tokenizer, tasks: list[str], task_dirs: list[str | Path] = (), limit: int | None = None,
              batch_size: int = 8, num_fewshot: int | None = None, seed: int = 1234) -> dict:
    """Run lm-eval `tasks` on `model`. Returns {"tasks": {task: {metric: value}}, "limit", "lm_eval_version"}."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise PruningError("lm-eval is not installed: pip install lm-eval") from err
    if tokenizer is None:
        raise PruningError("lm-eval needs the model's tokenizer.")
    from .streaming import is_streamed, whole

    if is_streamed(model) and not model.core_stream.pinned:  # lm-eval runs the model whole: load a streamed one that fits, refuse one that does not
        from .errors import EnvironmentFailure
        from .memory import model_too_big

        reason = model_too_big(model)
        if reason:
            raise EnvironmentFailure(f"lm-eval needs the model in memory and {reason}. Use a machine with more "
                                     "memory, or evaluate perplexity only (it streams).")
        with whole(model):
            return run_tasks(model, tokenizer, tasks, task_dirs, limit, batch_size, num_fewshot, seed)
    with prepared_task_dirs([BUNDLED_TASKS, *task_dirs]) as include:
        manager = TaskManager(include_path=include)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise PruningError(f"Unknown lm-eval task(s) {unknown}. Offline, use the bundled 'pydoc_cloze' or a "
                               "task folder of your own (--task-dir).")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
        except (ConnectionError, OSError) as err:
            raise PruningError(f"lm-eval could not load a task's data ({err}). The literature's tasks download "
                               "their datasets from the Hub; offline, use local task folders.") from err
    return {"tasks": {name: _metrics(entry) for name, entry in raw["results"].items()}, "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown")}


class ChoiceTask:
    """A multiple-choice lm-eval task as (context, continuation) pairs per document, scored by lm-eval's own
    `process_results` (for the task utility of depth pruning: its forwards run through `core.utility`)."""

    def __init__(self, name: str, task, docs: list, requests: list[list[tuple[str, str]]]) -> None:
        self.name, self._task, self.docs, self.requests = name, task, docs, requests

    def accuracy(self, loglikelihoods: list[list[float]]) -> float:
        """Mean of lm-eval's `acc` over the documents, given each choice's summed log-likelihood."""
        total = 0.0
        for doc, lls in zip(self.docs, loglikelihoods):
            total += self._task.process_results(doc, [(ll, False) for ll in lls])["acc"]
        return total / max(len(self.docs), 1)


def choice_task(name: str, task_dirs: list[str | Path] = (), docs: slice = slice(None)) -> ChoiceTask:
    """Load multiple-choice task `name` (bundled, lm-eval's own, or from `task_dirs`); keep documents `docs`."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise PruningError("lm-eval is not installed: pip install lm-eval") from err
    with prepared_task_dirs([BUNDLED_TASKS, *task_dirs]) as include:
        manager = TaskManager(include_path=include, include_defaults=False)  # instant; lm-eval's own index is not
        if name not in manager.all_tasks:
            manager = TaskManager(include_path=include)
        if name not in manager.all_tasks:
            raise PruningError(f"Unknown lm-eval task {name!r}. Offline, use the bundled 'pydoc_cloze' or a task "
                               "folder of your own.")
        if hasattr(manager, "load"):
            task = manager.load([name])["tasks"][name]
        else:  # lm-eval before TaskManager.load
            from lm_eval.tasks import get_task_dict

            task = get_task_dict([name], manager)[name]
        if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice":
            raise PruningError(f"Task {name!r} is not a multiple-choice task; a task utility needs one.")
        try:
            task.build_all_requests(rank=0, world_size=1)
        except (ConnectionError, OSError) as err:
            raise PruningError(f"lm-eval could not load the data of task {name!r} ({err}).") from err
    by_doc: dict[int, tuple] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, (inst.doc, {}))[1][inst.idx] = tuple(inst.arguments)
    ids = sorted(by_doc)[docs]
    if not ids:
        raise PruningError(f"Task {name!r} has no documents in {docs}.")
    return ChoiceTask(name, task, [by_doc[i][0] for i in ids],
                      [[by_doc[i][1][k] for k in sorted(by_doc[i][1])] for i in ids])
