"""Build the reference text corpus from the Python standard library's own documentation.

The text is what ``pydoc`` renders (plain text) for the public standard-library
modules of the running interpreter: the modules' docstrings, PSF licensed.
Modules are grouped by top-level package and each group goes to exactly one of
``train.txt``, ``calibration.txt`` or ``eval.txt`` (see ``reference/corpus/README.md``).

Run with the project's interpreter (Python 3.11.7)::

    python reference/build_corpus.py

The script re-executes itself as ``python -S -P -X utf8`` with ``PYTHONHASHSEED=0`` so
that site-packages (e.g. setuptools' ``distutils`` shim), the script directory,
the locale and string hashing cannot change the output.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import os
import pkgutil
import pydoc
import re
import sys
import sysconfig
import warnings
from pathlib import Path

log = logging.getLogger("build_corpus")

#: Top-level modules never imported: side effects on import (browser, printing, GUI),
#: bulk data rather than prose (pydoc_data), or the regression-test package.
SKIP_TOP_LEVEL = frozenset(
    {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "test"}
)
#: Submodule name parts that are never imported: test suites.
SKIP_PARTS = frozenset({"test", "tests", "idle_test"})
#: Packages whose submodules are boilerplate (one codec module per encoding).
NO_SUBMODULES = frozenset({"encodings"})

#: Top-level pydoc sections dropped: boilerplate (MODULE REFERENCE), local file
#: paths (FILE) and reprs of module-level values, which can describe the machine (DATA).
DROP_SECTIONS = frozenset({"MODULE REFERENCE", "FILE", "DATA"})
SECTION_RE = re.compile(r"^[A-Z][A-Z ]*$")
INHERITED_RE = re.compile(
    r"^(?P<prefix>[ |]*\|  )(?:Methods|Class methods|Static methods|Readonly properties"
    r"|Data descriptors|Data and other attributes) inherited from .*:$"
)
ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]*")
OVERSTRIKE_RE = re.compile(r".\x08")
#: Blocks (paragraphs separated by blank lines) at least this long are emitted once only.
DEDUP_MIN_CHARS = 200

SPLIT_TARGET_BYTES = 200_000  # upper bound for calibration.txt and eval.txt
SPLIT_MAX_GROUP_BYTES = 40_000  # larger groups always go to train.txt


def is_private(name: str) -> bool:
    """Return True if any dotted part of ``name`` starts with an underscore."""
    return any(part.startswith("_") for part in name.split("."))


def from_stdlib(module) -> bool:
    """Return True if ``module`` is built in or lives in the interpreter's stdlib directories."""
    path = getattr(module, "__file__", None)
    if path is None:
        return True
    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib")}
    return any(os.path.abspath(path).startswith(os.path.join(root, "")) for root in roots)


def try_import(name: str):
    """Import ``name``; return the module, or None if it fails or is not from the stdlib."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except (Exception, SystemExit) as exc:  # platform-specific or optional modules
        log.debug("skip %s: %s", name, exc)
        return None
    return module if from_stdlib(module) else None


def iter_group(top: str):
    """Yield the importable public modules of top-level package ``top``, sorted, depth first."""
    module = try_import(top)
    if module is None:
        return
    yield module
    if top in NO_SUBMODULES or not hasattr(module, "__path__"):
        return
    names = sorted(info.name for info in pkgutil.iter_modules(module.__path__, top + "."))
    for name in names:
        if not is_private(name) and SKIP_PARTS.isdisjoint(name.split(".")):
            yield from iter_group(name)


def drop_inherited(lines: list[str]) -> list[str]:
    """Remove the 'X inherited from Y:' subsections of class documentation (pure duplicates)."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = INHERITED_RE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        prefix = match["prefix"]
        separator = prefix + "-" * 70
        if out and out[-1] == separator:
            out.pop()
        i += 1
        while i < len(lines) and lines[i].startswith(prefix.rstrip()) and lines[i] != separator:
            i += 1
    return out


def drop_sections(lines: list[str]) -> list[str]:
    """Remove the top-level pydoc sections listed in DROP_SECTIONS."""
    out: list[str] = []
    dropping = False
    for line in lines:
        if SECTION_RE.match(line):
            dropping = line in DROP_SECTIONS
        if not dropping:
            out.append(line)
    return out


def local_strings() -> list[tuple[str, str]]:
    """(value, placeholder) pairs for machine-specific strings that can occur in default values."""
    values = {
        sys.executable: "sys.executable",
        sys.prefix: "sys.prefix",
        sys.base_prefix: "sys.base_prefix",
        sys.exec_prefix: "sys.exec_prefix",
    }
    return sorted(values.items(), key=lambda item: -len(item[0]))


def clean(text: str) -> str:
    """Strip trailing whitespace and overstrike, hide addresses, collapse blank-line runs."""
    text = OVERSTRIKE_RE.sub("", text)
    text = ADDRESS_RE.sub("", text)
    for value, placeholder in local_strings():
        text = text.replace(value, placeholder)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def render(module) -> str:
    """Render ``module`` with pydoc as plain text and clean it."""
    environ_repr = type(os.environ).__repr__
    type(os.environ).__repr__ = lambda self: "os.environ"  # defaults like environ=os.environ
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    finally:
        type(os.environ).__repr__ = environ_repr
    return clean("\n".join(drop_sections(drop_inherited(text.splitlines()))))


def render_topics() -> str:
    """The language-reference topics of ``help()`` (``pydoc_data.topics``), sorted by name."""
    from pydoc_data.topics import topics

    return "\n".join(clean(topics[name]) for name in sorted(topics))


def dedup(text: str, seen: set[str]) -> str:
    """Drop long blocks of ``text`` already in ``seen`` (updated in place)."""
    kept = []
    for block in text.split("\n\n"):
        key = block.strip()
        if len(key) >= DEDUP_MIN_CHARS:
            if key in seen:
                continue
            seen.add(key)
        kept.append(block)
    return "\n\n".join(kept)


def top_level_names() -> list[str]:
    """Public top-level stdlib module names, in split order (sorted by SHA-256 of the name)."""
    names = [n for n in sys.stdlib_module_names if not is_private(n) and n not in SKIP_TOP_LEVEL]
    return sorted(names, key=lambda n: hashlib.sha256(n.encode()).hexdigest())


def build(out_dir: Path) -> dict[str, list[str]]:
    """Render all groups, assign them to splits, write the three files; return split -> groups."""
    texts: dict[str, list[str]] = {"train": [], "calibration": [], "eval": []}
    groups: dict[str, list[str]] = {split: [] for split in texts}
    sizes = dict.fromkeys(texts, 0)
    seen: set[str] = set()
    for top in top_level_names():
        docs = [dedup(render(module), seen) for module in iter_group(top)]
        if not docs:
            continue
        text = "\n".join(docs)
        size = len(text.encode())
        split = "train"
        for candidate in ("eval", "calibration"):
            if size <= SPLIT_MAX_GROUP_BYTES and sizes[candidate] + size <= SPLIT_TARGET_BYTES:
                split = candidate
                break
        texts[split].append(text)
        groups[split].append(top)
        sizes[split] += size
        log.info("%-16s %5d modules %8d bytes -> %s", top, len(docs), size, split)
    texts["train"].append(dedup(render_topics(), seen))
    groups["train"].append("pydoc_data.topics")
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, parts in texts.items():
        data = "\n".join(parts).encode()
        (out_dir / f"{split}.txt").write_bytes(data)
        log.info("%s.txt: %d groups, %d bytes, sha256 %s",
                 split, len(parts), len(data), hashlib.sha256(data).hexdigest())
    return groups


def reexec_if_needed() -> None:
    """Re-run this script in a hermetic interpreter mode unless already doing so."""
    if os.environ.get("PYTHONHASHSEED") == "0" and sys.flags.no_site and sys.flags.utf8_mode \
            and sys.flags.safe_path:
        return
    env = dict(os.environ, PYTHONHASHSEED="0")
    args = [sys.executable, "-S", "-P", "-X", "utf8", os.path.abspath(__file__), *sys.argv[1:]]
    os.execve(sys.executable, args, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "corpus",
                        help="output directory (default: reference/corpus)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log skipped modules")
    args = parser.parse_args()
    reexec_if_needed()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    groups = build(args.out)
    for split, names in groups.items():
        log.info("%s groups: %s", split, " ".join(sorted(names)))


if __name__ == "__main__":
    main()
