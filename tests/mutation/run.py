"""Mutation testing of the modules where a wrong choice is silent, within a time budget.

    python tests/mutation/run.py                 # run, print the score and the survivors; exit 1 below the threshold
    python tests/mutation/run.py --write         # also write tests/mutation/results.{json,md}
    python tests/mutation/run.py --mutant TEXT   # run the mutants whose name contains TEXT, showing what fails

`config.toml` maps each module to the fast tests that cover it, sets the threshold and the budget and lists the
mutants judged equivalent (with the reason). Mutants are small bugs in function bodies (see mutants.py).

One pytest session collects every mapped test once (torch, transformers and the test modules are imported once);
then, instead of running the tests, it forks one child per mutant. The child swaps the code of the mutated function
in place (every reference to the function sees the change) and runs its module's tests in order, stopping at the
first failure: a failure kills the mutant, so does running past the timeout. A mutant on a line that the module's
tests never execute (measured in an unmutated run) survives without being run.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from mutants import Mutant, generate, mutated_code, patched_code  # noqa: E402

KILLED, SURVIVED, NOT_COVERED, TIMEOUT, EQUIVALENT, NOT_RUN, ERROR = (
    "killed", "survived", "not covered", "timeout", "equivalent", "not run", "error")
PATCH_FAILED = 4  # exit code of a child that could not apply its mutant (not a kill)


def load_config(path: Path) -> dict:
    config = tomllib.loads(path.read_text(encoding="utf-8"))
    config.setdefault("modules", {})
    for module, entry in config["modules"].items():
        if not (ROOT / module).is_file():
            raise SystemExit(f"config.toml names {module}, which does not exist")
        for test in entry["tests"]:
            if not (ROOT / test.split("::")[0]).is_file():
                raise SystemExit(f"config.toml maps {module} to {test}, which does not exist")
    return config


def unmapped(config: dict) -> list[str]:
    """Python files under the config's `watch` folders that are neither mutated nor listed in `not_mutated`: a module
    added later is reported (and shown in results.md) until someone maps it to its tests, never an error."""
    known = set(config["modules"]) | set(config.get("not_mutated", {}))
    found = {str(p.relative_to(ROOT)) for folder in config.get("watch", []) for p in (ROOT / folder).rglob("*.py")}
    return sorted(found - known)


def _live_function(mutant: Mutant):
    """The function object the running process uses for `mutant.function`."""
    obj = importlib.import_module(mutant.module[:-3].replace("/", ".").removesuffix(".__init__"))
    for part in mutant.function.split("."):
        obj = vars(obj)[part] if inspect.isclass(obj) or inspect.ismodule(obj) else getattr(obj, part)
    if isinstance(obj, (classmethod, staticmethod)):
        obj = obj.__func__
    elif isinstance(obj, property):
        obj = obj.fget
    return inspect.unwrap(obj)


def _selected(nodeid: str, test: str) -> bool:
    return nodeid == test or nodeid.startswith((test + "[", test + "::"))


def _run_items(items) -> tuple[bool, str]:
    """Run pytest items in order until one fails; (all passed, what failed)."""
    from _pytest.runner import runtestprotocol

    for i, item in enumerate(items):
        reports = runtestprotocol(item, log=False, nextitem=items[i + 1] if i + 1 < len(items) else None)
        failed = [r for r in reports if r.failed]
        if failed:
            return False, f"{item.nodeid}\n{failed[0].longreprtext[-3000:]}"
    return True, ""


def _trace(fn, files: set[str]) -> tuple[object, dict[str, set[int]]]:
    """fn() with the executed lines of `files` recorded."""
    hits: dict[str, set[int]] = {f: set() for f in files}

    def local(frame, event, arg):
        if event == "line":
            hits[frame.f_code.co_filename].add(frame.f_lineno)
        return local

    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename in files else None)
    try:
        return fn(), hits
    finally:
        sys.settrace(None)


def _in_child(work, session, quiet: bool = True) -> int:
    """Fork; the child runs work() -> exit code (output silenced when quiet) and never returns. Returns the pid.
    Each child gets its own pytest base temp folder: children run at the same time and pytest empties the base
    folder on first use."""
    pid = os.fork()
    if pid:
        return pid
    code = 3
    basetemp = Path(tempfile.mkdtemp(prefix="mutant-"))
    try:
        factory = session.config._tmp_path_factory  # no public way to point tmp_path elsewhere after start-up
        factory._given_basetemp, factory._basetemp = basetemp, None
        if quiet:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
        code = work()
    except BaseException:  # noqa: BLE001 - an exception escaping pytest (exit code 3) ends the child
        if not quiet:
            import traceback

            traceback.print_exc()
    finally:
        sys.stdout.flush()
        shutil.rmtree(basetemp, ignore_errors=True)
        os._exit(code)


class MutationSession:
    """A pytest plugin: collects the mapped tests, then runs the mutants instead of the tests."""

    def __init__(self, config: dict, modules: dict, mutants: dict[str, list[Mutant]], budget: float, workers: int,
                 verbose: bool, show: bool, bugs: list[dict]):
        self.config, self.modules, self.mutants = config, modules, mutants
        self.budget, self.workers, self.verbose, self.show = budget, workers, verbose, show
        self.status: dict[str, str] = {}
        self.bugs = bugs
        self.bug_status: dict[str, str | None] = {}
        self.started = time.monotonic()

    def pytest_runtestloop(self, session):
        self.session = session
        items = {m: [i for test in e["tests"] for i in session.items if _selected(i.nodeid, test)]
                 for m, e in self.modules.items()}
        for module, entry in [*self.modules.items(), *((b["module"], b) for b in self.bugs)]:
            for test in entry["tests"]:
                if not any(_selected(i.nodeid, test) for i in session.items):
                    raise SystemExit(f"config.toml maps {module} to {test}, which collects no test (renamed, or "
                                     "marked slow?): fix the map")
        if self.show:
            self.show_mutants(items)
            return True
        equivalent = {e["mutant"] for e in self.config.get("equivalent", [])}
        groups = []
        for module, mutants in self.mutants.items():
            seconds, covered = self.baseline(module, items[module])
            timeout = max(20.0, 1.5 * seconds + 10)  # the baseline ran traced, slower than a mutant's run
            print(f"{module}: {len(mutants)} mutants, {len(items[module])} tests ({seconds:.1f} s traced), "
                  f"timeout {timeout:.0f} s", flush=True)
            group = []
            for m in mutants:
                if m.name in equivalent:
                    self.status[m.name] = EQUIVALENT
                elif m.lineno not in covered:
                    self.status[m.name] = NOT_COVERED
                else:
                    group.append((m, items[module], timeout))
            groups.append(group)
        self.run(_interleave(groups))
        if self.bugs:  # their tests must pass without the bug, so that a failure is the bug's doing
            unpatched = self.run_bug(None, [i for i in session.items if any(_selected(i.nodeid, t) for b in self.bugs
                                                                               for t in b["tests"])])
            if unpatched:
                raise SystemExit(f"the tests of the named bugs fail without any bug: {unpatched}")
        for bug in self.bugs:
            self.bug_status[bug["row"]] = self.run_bug(bug, [i for t in bug["tests"] for i in session.items
                                                             if _selected(i.nodeid, t)])
            print(f"bug {'caught by ' + self.bug_status[bug['row']] if self.bug_status[bug['row']] else 'MISSED'}: "
                  f"{bug['row']}", flush=True)
        return True

    def run_bug(self, bug: dict | None, items) -> str | None:
        """Re-introduce a named bug (config [[bug]]; None: no bug) in a child and run its tests: the test that fails
        first, or None when all pass (the bug is missed)."""
        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            def work() -> int:
                if bug is not None:
                    _live_function(Mutant(bug["module"], bug["function"], "", "", 0, 0, (), 0)).__code__ = \
                        patched_code(ROOT, bug["module"], bug["function"], bug["old"], bug["new"])
                ok, failure = _run_items(items)
                Path(out.name).write_text(json.dumps({"caught_by": None if ok else failure.split("\n")[0]}))
                return 0

            os.waitpid(_in_child(work, self.session), 0)
            text = Path(out.name).read_text()
        if not text:
            raise SystemExit(f"the bug {bug['row'] if bug else None!r} could not be run (see config.toml [[bug]])")
        return json.loads(text)["caught_by"]

    def baseline(self, module: str, items) -> tuple[float, set[int]]:
        """Run the module's tests unmutated, traced: they must pass. Their duration and the module's executed lines."""
        path = str(ROOT / module)
        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            def work() -> int:
                (ok, failure), hits = _trace(lambda: _run_items(items), {path})
                Path(out.name).write_text(json.dumps({"ok": ok, "failure": failure, "lines": sorted(hits[path])}))
                return 0

            start = time.monotonic()
            os.waitpid(_in_child(work, self.session), 0)
            seconds = time.monotonic() - start
            result = json.loads(Path(out.name).read_text() or '{"ok": false, "failure": "crashed"}')
        if not result["ok"]:
            raise SystemExit(f"the tests of {module} fail without any mutant:\n{result['failure']}")
        return seconds, set(result["lines"])

    def run(self, jobs: list) -> None:
        """Run (mutant, items, timeout) jobs on `workers` children until done or the budget is spent."""
        running: dict[int, tuple[Mutant, float]] = {}
        queue = list(jobs)
        while queue or running:
            while queue and len(running) < self.workers and time.monotonic() - self.started < self.budget:
                mutant, items, timeout = queue.pop(0)
                running[_in_child(lambda m=mutant, it=items: _mutant_exit_code(m, it), self.session)] = (
                    mutant, time.monotonic() + timeout)
            if not running:
                break
            finished = []
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid:
                mutant, _ = running.pop(pid)
                code = os.waitstatus_to_exitcode(status)
                self.status[mutant.name] = SURVIVED if code == 0 else ERROR if code == PATCH_FAILED else KILLED
                finished.append(mutant)
            else:
                time.sleep(0.01)
            for pid, (mutant, deadline) in list(running.items()):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    running.pop(pid)
                    self.status[mutant.name] = TIMEOUT
                    finished.append(mutant)
            for mutant in finished if self.verbose else ():
                print(f"[{len(self.status)}] {self.status[mutant.name]}: {mutant.name}", flush=True)
        for mutant, _, _ in queue:
            self.status[mutant.name] = NOT_RUN

    def show_mutants(self, items) -> None:
        for module, mutants in self.mutants.items():
            for m in mutants:
                def work(m=m, tests=items[module]) -> int:
                    _live_function(m).__code__ = mutated_code(ROOT, m)
                    ok, failure = _run_items(tests)
                    print(f"survived: {m.name}" if ok else f"killed: {m.name}\nby {failure}", flush=True)
                    return 0 if ok else 1

                os.waitpid(_in_child(work, self.session, quiet=False), 0)


def _mutant_exit_code(mutant: Mutant, items) -> int:
    try:
        _live_function(mutant).__code__ = mutated_code(ROOT, mutant)
    except Exception:  # noqa: BLE001 - reported as an error of the runner, never as a kill
        return PATCH_FAILED
    return 0 if _run_items(items)[0] else 1


def _interleave(groups: list[list]) -> list:
    """Round-robin over the modules, so that a run cut short by the budget samples every module."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def summarize(config: dict, mutants: dict[str, list[Mutant]], status: dict[str, str], seconds: float,
              workers: int, bugs: dict[str, str | None] | None = None) -> dict:
    per_module = {}
    for module, items in mutants.items():
        counts = {s: 0 for s in (KILLED, TIMEOUT, SURVIVED, NOT_COVERED, EQUIVALENT, NOT_RUN, ERROR)}
        for m in items:
            counts[status.get(m.name, NOT_RUN)] += 1
        judged = counts[KILLED] + counts[TIMEOUT] + counts[SURVIVED] + counts[NOT_COVERED]
        per_module[module] = {**counts, "score": round((counts[KILLED] + counts[TIMEOUT]) / judged, 4) if judged
                              else None}
    killed = sum(v[KILLED] + v[TIMEOUT] for v in per_module.values())
    judged = killed + sum(v[SURVIVED] + v[NOT_COVERED] for v in per_module.values())
    survivors = [{"mutant": m.name, "status": status[m.name], "line": m.lineno}
                 for items in mutants.values() for m in items if status.get(m.name) in (SURVIVED, NOT_COVERED, ERROR)]
    return {
        "score": round(killed / judged, 4) if judged else None, "killed": killed, "judged": judged,
        "not_run": sum(v[NOT_RUN] for v in per_module.values()), "errors": sum(v[ERROR] for v in per_module.values()),
        "threshold": config["threshold"],
        "seconds": round(seconds, 1), "workers": workers, "modules": per_module, "survivors": survivors,
        "equivalent": [e for e in config.get("equivalent", []) if e["mutant"].split("::")[0] in mutants],
        "known_survivors": config.get("known_survivor", []),
        "unmapped": unmapped(config),
        "bugs": [{"bug": row, "caught_by": test} for row, test in (bugs or {}).items()],
        "machine": _machine(),
    }


def _machine() -> dict:
    import platform
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return {"cpus": os.cpu_count(), "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "cpu_seconds": round(cpu, 1), "python": platform.python_version(), "platform": platform.platform()}


def markdown(summary: dict, command: str) -> str:
    m = summary["machine"]
    lines = ["# Mutation testing", "", f"- Command: `{command}`",
             f"- Score: **{summary['score']:.1%}** of {summary['judged']} mutants killed (threshold "
             f"{summary['threshold']:.0%}); {summary['not_run']} not run within the budget; {summary['errors']} could "
             "not be applied (runner errors, not counted); "
             f"{len(summary['equivalent'])} equivalent mutants left out (config.toml gives the reasons)",
             f"- Run time: {summary['seconds']:.0f} s with {summary['workers']} worker(s), {m['cpu_seconds']:.0f} CPU "
             f"seconds in all; machine: {m['cpus']} CPUs, load average {m['load_average_1min_at_end']} at the end "
             "(a shared machine runs slower)", "",
             "| module | mutants | killed | timeout | survived | not covered | score |", "|---|---|---|---|---|---|---|"]
    for module, v in summary["modules"].items():
        total = v[KILLED] + v[TIMEOUT] + v[SURVIVED] + v[NOT_COVERED]
        score = f"{v['score']:.1%}" if v["score"] is not None else "-"
        lines.append(f"| `{module}` | {total} | {v[KILLED]} | {v[TIMEOUT]} | {v[SURVIVED]} | {v[NOT_COVERED]} | "
                     f"{score} |")
    notes = {e["mutant"]: e["reason"] for e in summary.get("known_survivors", [])}
    lines += ["", "## Survivors", ""]
    lines += [f"- {s['status']}: `{s['mutant']}`" + (f" ({notes[s['mutant']]})" if s["mutant"] in notes else "")
              for s in summary["survivors"]] or ["none"]
    if summary.get("bugs"):
        lines += ["", "## Named bugs re-introduced (issue 17's table; `[[bug]]` in config.toml)", "",
                  "| bug | caught by (first failing test) |", "|---|---|"]
        lines += [f"| {b['bug']} | " + (f"`{b['caught_by']}`" if b["caught_by"] else "**MISSED**") + " |"
                  for b in summary["bugs"]]
    if summary.get("unmapped"):
        lines += ["", "## Not mutated yet", "",
                  "Modules under a watched folder (`watch` in config.toml) that no entry maps to tests: add each under "
                  "`[modules]` with the fast tests that cover it.", ""]
        lines += [f"- `{m}`" for m in summary["unmapped"]]
    lines += ["", "## Equivalent mutants (left out of the score)", ""]
    lines += [f"- `{e['mutant']}`: {e['reason']}" for e in summary["equivalent"]] or ["none"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "config.toml")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: config budget_seconds)")
    parser.add_argument("--workers", type=int, help="parallel children (default: config workers or CPU count)")
    parser.add_argument("--modules", help="comma-separated subset of the config's modules")
    parser.add_argument("--mutant", help="run only mutants whose name contains this text, showing what kills them")
    parser.add_argument("--bugs", action="store_true", help="only re-introduce the named bugs ([[bug]] in config)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--write", action="store_true", help="write results.json and results.md next to this file")
    parser.add_argument("--verbose", action="store_true", help="print every mutant's fate as it comes")
    args = parser.parse_args()
    started = time.monotonic()
    config = load_config(args.config)
    modules = {m: e for m, e in config["modules"].items()
               if not args.bugs and (not args.modules or m in args.modules.split(","))}
    mutants = {m: generate(ROOT, m, set(e.get("skip", []))) for m, e in modules.items()}
    if args.mutant:
        mutants = {m: [x for x in items if args.mutant in x.name] for m, items in mutants.items()}
        modules = {m: e for m, e in modules.items() if mutants[m]}
        mutants = {m: items for m, items in mutants.items() if items}
    bugs = config.get("bug", []) if not (args.modules or args.mutant or args.list) else []
    if args.list or not (modules or bugs):
        print("\n".join(m.name for items in mutants.values() for m in items) or "no such mutant")
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import pytest
    import torch

    torch.set_num_threads(1)  # one thread per child: the children run in parallel
    workers = args.workers or config.get("workers") or os.cpu_count()
    budget = args.budget if args.budget is not None else config["budget_seconds"]
    plugin = MutationSession(config, modules, mutants, budget, workers, args.verbose, show=bool(args.mutant),
                             bugs=bugs)
    tests = sorted({t for e in [*modules.values(), *plugin.bugs] for t in e["tests"]})
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        code = pytest.main([*tests, "-q", "-p", "no:cacheprovider", f"--basetemp={tmp}", "--rootdir", str(ROOT),
                            "-c", str(ROOT / "pytest.ini")], plugins=[plugin])
    if code not in (0, 5) or args.mutant:
        sys.exit(0 if args.mutant else code)
    missed = [row for row, test in plugin.bug_status.items() if not test]
    if args.bugs:
        print(f"{len(plugin.bug_status) - len(missed)} of {len(plugin.bug_status)} named bugs caught")
        sys.exit(1 if missed else 0)
    summary = summarize(config, mutants, plugin.status, time.monotonic() - started, workers, plugin.bug_status)
    command = " ".join(["python tests/mutation/run.py", *sys.argv[1:]])
    print(markdown(summary, command))
    named = {e["mutant"] for e in config.get("equivalent", []) + config.get("known_survivor", [])}
    gone = named - {m.name for items in mutants.values() for m in items}
    if gone and not args.modules:
        print("config.toml names mutants that no longer exist (update it):\n  " + "\n  ".join(sorted(gone)))
    if args.write:
        (HERE / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        (HERE / "results.md").write_text(markdown(summary, command), encoding="utf-8")
    if summary["unmapped"] and not args.modules:
        print("not mutated yet (add them to config.toml with their tests): " + ", ".join(summary["unmapped"]))
    if summary["errors"]:
        print(f"{summary['errors']} mutants could not be applied: see the survivors list (status 'error')")
    if missed:
        print("FAIL: named bugs no test catches any more:\n  " + "\n  ".join(missed))
        sys.exit(1)
    if summary["score"] is None or summary["score"] < config["threshold"]:
        print(f"FAIL: mutation score {summary['score']} is below the threshold {config['threshold']}")
        sys.exit(1)
    print(f"mutation score {summary['score']:.1%} (threshold {config['threshold']:.0%})")


if __name__ == "__main__":
    main()
