"""The life of an output folder: written into a hidden temporary folder next to it, moved into place at the end.

    with staged_output(out, overwrite) as tmp:   # .NAME.PID.HEX.tmp next to `out`, removed on any failure
        write files into tmp
    # here `out` holds exactly what was written; a replaced `out` went through .NAME.PID.HEX.old and is gone

The owner's process id is part of every temporary name, so a later run (of any process) can remove what a killed
one (SIGKILL, power loss) left behind: `remove_stale` deletes the temporary folders next to an output whose owner no
longer runs on this machine. The streamed writer and the one-shot writer both use this module.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from .errors import EnvironmentFailure, OutputExistsError

logger = logging.getLogger(__name__)

# .NAME.PID.HEX.tmp (being written) and .NAME.PID.HEX.old (an output being replaced)
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<hex>[0-9a-f]{12})\.(?P<kind>tmp|old)$")
OWNER_FILE = ".owner"  # inside a .tmp folder: "host pid"


def staged_name(out: Path, kind: str = "tmp") -> Path:
    return out.parent / f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.{kind}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_host(path: Path) -> str | None:
    try:
        return (path / OWNER_FILE).read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        return None


def remove_stale(parent: Path) -> list[Path]:
    """Delete temporary folders/files in `parent` left by processes of this machine that no longer run."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for path in entries:
        match = _STAGED.match(path.name)
        if not match:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        owner = _owner_host(path) if path.is_dir() else None
        if owner is not None and owner != host:  # another machine's run on a shared file system
            continue
        _remove(path)
        removed.append(path)
        logger.info("removed %s, left by process %d which no longer runs", path, pid)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_target(out_dir: str | os.PathLike, overwrite: bool = False, protect: tuple[str | os.PathLike, ...] = ()
                 ) -> Path:
    """The resolved output path. Raises when it exists and `overwrite` is off, when replacing it would delete one of
    the `protect` paths (the input model) or the current folder, and when its parent cannot be written."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists. Choose another --out folder or pass --overwrite.")
    if overwrite and out.exists():
        guarded = [(Path(p).expanduser().resolve(), "the input model") for p in protect]
        for keep_path, what in guarded + [(Path.cwd().resolve(), "the current folder")]:
            if keep_path == out or out in keep_path.parents:
                raise OutputExistsError(f"--out {out} holds {what} ({keep_path}); overwriting it would delete it. "
                                        "Choose another --out folder.")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EnvironmentFailure(f"Cannot create {out}: {ancestor} is not a folder. Choose another --out.")
    try:  # really try: permissions say nothing for root, read-only mounts or special file systems
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=ancestor))
    except OSError as err:
        raise EnvironmentFailure(f"Cannot write into {ancestor} ({err.strerror}). Choose another --out "
                                 "folder.") from None
    return out


@contextlib.contextmanager
def staged_output(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder next to `out_dir`; on success it becomes `out_dir` (replacing it when `overwrite`)."""
    out = check_target(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent)
    tmp = staged_name(out)
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would stay on the final folder; mkdir honours the umask
    try:
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n", encoding="utf-8")
        yield tmp
        (tmp / OWNER_FILE).unlink()
        _publish(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move `tmp` to `out`; an existing `out` (folder or file) is moved aside first and deleted after."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out} appeared while writing. Choose another --out folder or pass --overwrite.")
        trash = staged_name(out, "old")
        os.replace(out, trash)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(trash, out)  # put the old output back
            raise
        _remove(trash)
    else:
        os.replace(tmp, out)
