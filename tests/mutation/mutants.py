"""Mutants of a Python module: small plausible bugs (an operator, a comparison, a constant, a min for a max, a
slice turned around) made in the bodies of its functions, and the function code objects that carry them.

A mutant is named without line numbers, by the function it is in, the stripped text of its source line, the change
and an occurrence count, so that names survive edits elsewhere in the file. Docstrings, decorators, default values,
annotations, f-strings (error messages), `assert`s, logging calls and tensor axes (`dim=`) are not mutated.
"""
from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass
from pathlib import Path
from types import CodeType

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.Div, ast.Pow: ast.Mult, ast.MatMult: ast.Mult, ast.LShift: ast.RShift, ast.RShift: ast.LShift,
          ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
NAME_SWAPS = {"max": "min", "min": "max", "any": "all", "all": "any"}
METHOD_SWAPS = {"amax": "amin", "amin": "amax", "max": "min", "min": "max", "argmax": "argmin", "argmin": "argmax",
                "floor": "ceil", "ceil": "floor", "clamp_min": "clamp_max", "clamp_max": "clamp_min"}
UNWRAP_CALLS = {"abs", "sorted"}  # f(x) -> x
UNWRAP_METHODS = {"abs", "sqrt"}  # x.f() -> x
# in SQL string literals: (text, replacement); "ORDER BY -x" reverses the first sort key
SQL_CHANGES = ((" AND ", " OR "), (" <= ", " < "), (" >= ", " > "), (" < ", " <= "), (" > ", " >= "),
               (" != ", " = "), (" DESC", ""), ("+ 1", "- 1"), ("ORDER BY ", "ORDER BY -"))
SQL = re.compile(r"\b(SELECT|UPDATE|INSERT|DELETE)\b")
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**",
          ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>", ast.BitAnd: "&", ast.BitOr: "|", ast.Lt: "<",
          ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in",
          ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.And: "and", ast.Or: "or"}


@dataclass(frozen=True)
class Mutant:
    module: str  # path relative to the repository root
    function: str  # qualified name of the outermost function (what gets replaced)
    line_text: str  # the stripped source line of the change
    change: str  # e.g. "< -> <="
    occurrence: int  # among mutants with the same (function, line_text, change)
    lineno: int  # for coverage and the report only (names never depend on it)
    path: tuple  # where the node sits in the module's AST
    variant: int  # which of the node's mutations

    @property
    def name(self) -> str:
        suffix = f" #{self.occurrence}" if self.occurrence else ""
        return f"{self.module}::{self.function}: `{self.line_text}` {self.change}{suffix}"


def _variants(node: ast.AST) -> list[tuple[str, ast.AST]]:
    """(change, replacement node) for every mutation of `node` itself."""
    out: list[tuple[str, ast.AST]] = []
    if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
        new = BINOPS[type(node.op)]
        out.append((f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}", ast.BinOp(node.left, new(), node.right)))
    elif isinstance(node, ast.AugAssign) and type(node.op) in BINOPS:
        new = BINOPS[type(node.op)]
        out.append((f"{SYMBOL[type(node.op)]}= -> {SYMBOL[new]}=", ast.AugAssign(node.target, new(), node.value)))
        out.append((f"{SYMBOL[type(node.op)]}= -> =", ast.Assign([node.target], node.value)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
        out.append((f"drop {'not' if isinstance(node.op, ast.Not) else 'unary -'}", node.operand))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMPOPS:
                ops = list(node.ops)
                ops[i] = CMPOPS[type(op)]()
                out.append((f"{SYMBOL[type(op)]} -> {SYMBOL[type(ops[i])]}", ast.Compare(node.left, ops, node.comparators)))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}", ast.BoolOp(new(), node.values)))
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and SQL.search(node.value):
        for old, new in SQL_CHANGES:
            start = node.value.find(old)
            while start >= 0:
                text = node.value[:start] + new + node.value[start + len(old):]
                where = " ".join(node.value[max(0, start - 24):start + len(old) + 12].split())
                out.append((f"SQL `...{where}...`: `{old.strip()}` -> `{new.strip()}`", ast.Constant(text)))
                start = node.value.find(old, start + 1)
    elif isinstance(node, ast.Constant) and not isinstance(node.value, (str, bytes)) and node.value is not None:
        if isinstance(node.value, bool):
            out.append((f"{node.value} -> {not node.value}", ast.Constant(not node.value)))
        elif isinstance(node.value, (int, float)):
            out.append((f"{node.value!r} -> {node.value + 1!r}", ast.Constant(node.value + 1)))
    elif isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in NAME_SWAPS:
            out.append((f"{func.id}() -> {NAME_SWAPS[func.id]}()",
                        ast.Call(ast.Name(NAME_SWAPS[func.id], ast.Load()), node.args, node.keywords)))
        if isinstance(func, ast.Name) and func.id in UNWRAP_CALLS and len(node.args) == 1 and not node.keywords:
            out.append((f"{func.id}(x) -> x", node.args[0]))
        if isinstance(func, ast.Attribute) and func.attr in METHOD_SWAPS:
            new_func = ast.Attribute(func.value, METHOD_SWAPS[func.attr], ast.Load())
            out.append((f".{func.attr}() -> .{METHOD_SWAPS[func.attr]}()", ast.Call(new_func, node.args, node.keywords)))
        if isinstance(func, ast.Attribute) and func.attr in UNWRAP_METHODS and not node.args and not node.keywords:
            out.append((f"x.{func.attr}() -> x", func.value))
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice) and node.slice.step is None:
        s = node.slice
        if (s.lower is None) != (s.upper is None):
            flipped = ast.Slice(lower=s.upper, upper=s.lower)
            change = "[:k] -> [k:]" if s.lower is None else "[k:] -> [:k]"
            out.append((change, ast.Subscript(node.value, flipped, node.ctx)))
    elif isinstance(node, ast.Break):
        out.append(("break -> continue", ast.Continue()))
    elif isinstance(node, ast.Continue):
        out.append(("continue -> break", ast.Break()))
    elif isinstance(node, ast.Return) and node.value is not None and not (
            isinstance(node.value, ast.Constant) and node.value.value is None):
        out.append(("return x -> return None", ast.Return(ast.Constant(None))))
    return out


def _skipped(node: ast.AST) -> bool:
    if isinstance(node, (ast.JoinedStr, ast.Assert)):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
        return node.func.value.id in ("logger", "logging")
    return False


NOT_MUTATED = {ast.FunctionDef: {"decorator_list", "returns", "args"}, ast.AsyncFunctionDef: {"decorator_list",
               "returns", "args"}, ast.Lambda: {"args"}, ast.AnnAssign: {"annotation"}, ast.arg: {"annotation"}}


def _children(node: ast.AST):
    """(field, index, child) of the parts of a function body that may be mutated (no defaults, no annotations, no
    tensor axes: a changed `dim=` either fails at once or, on the 2-D or symmetric tensors used here, means the same)."""
    if isinstance(node, ast.keyword) and node.arg in ("dim", "axis"):
        return
    skip = NOT_MUTATED.get(type(node), set())
    for field, value in ast.iter_fields(node):
        if field in skip:
            continue
        if isinstance(value, list):
            for i, child in enumerate(value):
                if isinstance(child, ast.AST):
                    yield field, i, child
        elif isinstance(value, ast.AST):
            yield field, None, value


def _functions(tree: ast.Module):
    """(qualified name, path, node) of module-level functions and of methods of module-level classes."""
    def walk(body, prefix, path):
        for i, node in enumerate(body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + node.name, path + (("body", i),), node
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, prefix + node.name + ".", path + (("body", i),))

    yield from walk(tree.body, "", ())


def _has_docstring(fn: ast.FunctionDef) -> bool:
    first = fn.body[0] if fn.body else None
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def generate(root: Path, relpath: str, skip_functions: set[str] = frozenset()) -> list[Mutant]:
    source = (root / relpath).read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines()
    mutants: list[Mutant] = []
    seen: dict[tuple, int] = {}

    def visit(node, path, qualname):
        if _skipped(node):
            return
        for variant, (change, _) in enumerate(_variants(node)):
            text = lines[node.lineno - 1].strip()
            key = (qualname, text, change)
            seen[key] = seen.get(key, -1) + 1
            mutants.append(Mutant(relpath, qualname, text, change, seen[key], node.lineno, path, variant))
        for field, i, child in _children(node):
            visit(child, path + ((field, i),), qualname)

    for qualname, path, fn in _functions(tree):
        if qualname in skip_functions:
            continue
        for i, stmt in enumerate(fn.body):
            if i == 0 and _has_docstring(fn):
                continue
            visit(stmt, path + (("body", i),), qualname)
    return mutants


def _locate(tree: ast.AST, path: tuple) -> tuple[ast.AST, str, int | None]:
    parent = tree
    for field, index in path[:-1]:
        value = getattr(parent, field)
        parent = value[index] if index is not None else value
    return parent, path[-1][0], path[-1][1]


def mutated_code(root: Path, mutant: Mutant) -> CodeType:
    """The code object of `mutant.function` with the mutation applied (compiled with the whole module)."""
    source = (root / mutant.module).read_text(encoding="utf-8")
    tree = ast.parse(source)
    parent, field, index = _locate(tree, mutant.path)
    node = getattr(parent, field)[index] if index is not None else getattr(parent, field)
    change, new = _variants(node)[mutant.variant]
    assert change == mutant.change, f"the source changed under {mutant.name}"
    new = copy.deepcopy(new)
    ast.copy_location(new, node)
    if index is not None:
        getattr(parent, field)[index] = new
    else:
        setattr(parent, field, new)
    code = compile(ast.fix_missing_locations(tree), str(root / mutant.module), "exec", dont_inherit=True)
    found = _find_code(code, mutant.function)
    assert found is not None, f"compiled module has no function {mutant.function}"
    return found


def _find_code(code: CodeType, qualname: str) -> CodeType | None:
    for const in code.co_consts:
        if isinstance(const, CodeType):
            if const.co_qualname == qualname:
                return const
            inner = _find_code(const, qualname)
            if inner is not None:
                return inner
    return None


def patched_code(root: Path, relpath: str, function: str, old: str, new: str) -> CodeType:
    """The code object of `function` with the text `old` (found exactly once in it) replaced by `new`."""
    source = (root / relpath).read_text(encoding="utf-8")
    node = next((fn for name, _, fn in _functions(ast.parse(source)) if name == function), None)
    if node is None:
        raise ValueError(f"{relpath} has no function {function}")
    lines = source.splitlines(keepends=True)
    start, end = sum(map(len, lines[:node.lineno - 1])), sum(map(len, lines[:node.end_lineno]))
    body = source[start:end]
    if body.count(old) != 1:
        raise ValueError(f"{relpath}::{function} contains {old!r} {body.count(old)} times, not once")
    code = compile(source[:start] + body.replace(old, new) + source[end:], str(root / relpath), "exec",
                   dont_inherit=True)
    found = _find_code(code, function)
    assert found is not None, f"compiled module has no function {function}"
    return found
