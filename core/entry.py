"""What a command-line entry point does around a command: logging and progress output, signals, and turning every
failure into one `error:` line with an exit status (2 bad input, 1 environment or bug, 128 + signal when
interrupted). Kept apart from the flags (`core.cli`) so every entry point behaves the same."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import traceback
import warnings
from typing import Callable, Iterator

from .errors import Interrupted, describe_failure

NOISY = ("transformers", "lm_eval", "lm-eval", "datasets", "huggingface_hub", "accelerate", "urllib3", "httpx",
         "filelock", "torch")
INTERRUPTED = "interrupted ({}): stopped; nothing half-written was left behind"


def configure_output(quiet: bool, debug: bool, bars: bool) -> None:
    """Our INFO lines in a normal run (WARNING with `quiet`); libraries' warnings, per-layer notices and INFO lines
    only with `debug`; progress bars unless `bars` is off."""
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("core").setLevel(level)
    if debug:
        return
    warnings.filterwarnings("ignore")
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        if not bars:
            transformers.logging.disable_progress_bar()
    if not bars:
        with contextlib.suppress(Exception):
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` (so that temporary output is removed on the way out); a second signal
    while cleaning up is ignored. Only in the main thread (signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            return
        fired.append(signum)
        raise Interrupted(signum, signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"error: {' '.join(str(message).split()) or 'failed'}\n")
    return code


def guarded(command: Callable[[], None], debug: bool = False) -> int:
    """Run `command` with `signals_raise`; returns the exit status, having printed one line for any failure."""
    with signals_raise():
        try:
            command()
        except Interrupted as err:
            sys.stderr.write("\n" + INTERRUPTED.format(err.name) + "\n")
            return err.exit_code
        except KeyboardInterrupt:
            sys.stderr.write("\n" + INTERRUPTED.format("SIGINT") + "\n")
            return 130
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else 0
        except Exception as err:
            if debug:
                traceback.print_exc()
            known = describe_failure(err)
            if known:
                return _fail(*known)
            first = str(err).splitlines()[0] if str(err) else ""
            return _fail(f"unexpected {type(err).__name__}: {first} -- this is a bug; re-run with --debug and "
                         "report the traceback.", 1)
    return 0
