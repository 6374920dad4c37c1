"""The part of a torch release's Python API that ddp-fnn reaches, read from the release's
source without importing it, and the package's own references to torch, read from its AST.

tests/test_torch_api_floor.py holds the package to the oldest torch pyproject.toml allows
(``torch>=X``): every ``torch.*`` name the package imports or spells out (``dist.new_group``,
``torch.cuda.Event``, ``from torch.nn.parallel import DistributedDataParallel``), and every
keyword argument it passes to a torch function, must exist in that release. This module
makes the data the test reads, one JSON file per release:

    pip download torch==2.7.0 --no-deps -d /tmp/torchwheel
    python tests/tools/torch_api.py /tmp/torchwheel/torch-2.7.0-*.whl

writes tests/data/torch_api_2.7.0.json (a wheel is read in place, nothing is installed or
imported; a site-packages directory holding ``torch/`` works too). Rerun it after raising
the floor, or when the package starts using a torch module or class the data lacks (the
test says which).

What is read, statically:

* a module's names: what its top level binds (def, class, assignment, annotation, import,
  ``from m import *`` through ``m.__all__``), in every branch of ``if``/``try``; extension
  modules (``torch._C``, ``torch._C._distributed_c10d``) through their ``.pyi`` stubs, and
  the ``for name in dir(X): globals()[name] = ...`` re-export that puts ATen's functions
  into ``torch``;
* a class's attributes: its body's, ``self.x = ...`` in its methods, and its bases'
  (where they resolve to a class in the release's source or stubs);
* a function's parameters, for the keyword arguments the package passes.

What it cannot see: attributes of objects whose type is only known at run time
(``ddp.reducer.get_backward_stats()``, ``bucket.buffer()``, ``work.wait()``). The package's
reliance on such names is listed by hand in ``RELIED_ON`` below, each checked against the
release like the rest; a private (``_x``) attribute the package reads on such an object
must be listed there, or the test fails. Nor: names that exist only through a module's
``__getattr__`` or that C++ adds at import without a stub (absent from the data: the test
fails, it does not pass wrongly); whether a backend implements a collective (a run-time
matter: pyproject.toml's comment says what Gloo needs); module names inside strings
(``-m torch.distributed.run``); the tests themselves (they run on the pinned torch).
``getattr(torch_thing, "name", default)`` and ``hasattr`` mark an optional, newer name
behind a fallback, and are not checked; the fallback is.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("ddp_fnn", "benchmarks")      # what the test walks: the package and its benchmarks
DATA_DIR = REPO / "tests" / "data"

# Modules recorded whatever the package uses today, so that a new call into one of the
# common ones is checked without regenerating the data.
BASE_MODULES = (
    "torch", "torch.nn", "torch.nn.functional", "torch.nn.init", "torch.nn.parallel", "torch.nn.utils",
    "torch.optim", "torch.optim.lr_scheduler", "torch.autograd", "torch.amp", "torch.cuda", "torch.cuda.amp",
    "torch.distributed", "torch.distributed.distributed_c10d", "torch.futures", "torch.profiler",
    "torch.utils.data", "torch.backends.cuda", "torch.backends.cudnn", "torch.version",
)

# Torch names the package relies on that are private, or that it reaches on objects a
# static reading cannot type (so nothing above would check them). Each is checked to exist
# in the floor release; each says why the package needs it. A private attribute the
# package reads that is not here fails the test.
RELIED_ON = {
    "torch.cuda._sleep":
        "train/faults.py (DDP_FNN_SLOW_STREAM, a test's fault): a kernel that spins the GPU for "
        "N cycles, the one way to make the device slower than the host without other work",
    "torch.distributed.distributed_c10d._get_default_group":
        "train/sync.py: the default group's own allreduce() in the DDP hook; dist.all_reduce's "
        "Python wrapper costs about as much as the rest of the hook at 24 buckets",
    "torch._amp_foreach_non_finite_check_and_unscale_":
        "train/health.py: one fused pass that finds a non-finite gradient (the GradScaler's "
        "own check), instead of one isfinite() per tensor",
    "torch.nn.parallel.DistributedDataParallel._set_ddp_runtime_logging_sample_rate":
        "observe/observer.py (--ddp-logger): makes the Reducer time every iteration",
    "torch.nn.parallel.DistributedDataParallel._get_ddp_logging_data":
        "observe/observer.py (--ddp-logger): the Reducer's own timings, an independent witness",
    "torch.nn.parallel.DistributedDataParallel.reducer":
        "train/sync.py: the C++ Reducer behind a DDP wrapper (bucket layout, ready times)",
    "torch.distributed.Reducer.get_backward_stats":
        "train/sync.py (--bucket-detail-every > 1): each gradient's ready time on the C++ path",
    "torch.distributed.Reducer._get_zeros_like_grad_buckets":
        "train/sync.py: the Reducer's current bucket layout (parameters and bytes per bucket)",
    "torch.distributed.GradBucket.buffer": "train/sync.py: a communication hook's bucket",
    "torch.distributed.GradBucket.index": "train/sync.py: a communication hook's bucket",
    "torch.distributed.GradBucket.parameters": "train/sync.py: a bucket's parameters (its layout)",
    "torch.futures.Future.then": "train/sync.py: a hook's completion callback",
    "torch.futures.Future.set_result": "train/sync.py: the hierarchical hook's finished future",
    "torch.futures.Future.value": "train/sync.py: a collective's result, in its callback",
}


# ---------------------------------------------------------------------------------------
# a release's source, read in place
# ---------------------------------------------------------------------------------------

class Tree:
    """The files of a torch wheel (read from the zip) or of a directory holding ``torch/``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.files = {p.relative_to(self.path).as_posix(): p for p in self.path.glob("torch/**/*")
                          if p.suffix in (".py", ".pyi")}
            self._zip = None
        else:
            self._zip = zipfile.ZipFile(self.path)
            self.files = {n: n for n in self._zip.namelist()
                          if n.startswith("torch/") and n.endswith((".py", ".pyi"))}
        self._text: dict[str, str] = {}

    def version(self) -> str:
        src = self.read("torch/version.py") or ""
        m = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", src, re.MULTILINE)
        if not m:
            raise SystemExit(f"{self.path}: no torch/version.py __version__")
        return m.group(1).split("+")[0]

    def read(self, name: str) -> str | None:
        if name not in self.files:
            return None
        if name not in self._text:
            if self._zip is not None:
                self._text[name] = self._zip.read(name).decode("utf-8", "replace")
            else:
                self._text[name] = self.files[name].read_text("utf-8", "replace")
        return self._text[name]

    def source_of(self, module: str) -> tuple[str, bool] | None:
        """(file, is_package) for ``module``: its .py, else its .pyi stub (extension modules)."""
        base = module.replace(".", "/")
        for name, pkg in ((f"{base}.py", False), (f"{base}/__init__.py", True),
                          (f"{base}.pyi", False), (f"{base}/__init__.pyi", True)):
            if name in self.files:
                return name, pkg
        return None

    def is_module(self, module: str) -> bool:
        return self.source_of(module) is not None


@dataclass(frozen=True)
class Binding:
    """What a module-level name is: ``module`` (another module), ``from`` (name ``attr`` of
    module ``target``, resolved lazily), ``class`` (defined here: ``node``), ``function``
    (``node``) or ``value``."""
    kind: str
    target: str = ""
    attr: str = ""
    node: ast.AST | None = None
    module: str = ""
    nodes: tuple = ()       # a function's definitions (a stub's @overload variants)


class Release:
    """Static reading of one torch release's namespaces."""

    def __init__(self, tree: Tree):
        self.tree = tree
        self._bindings: dict[str, dict[str, Binding]] = {}
        self._all: dict[str, list[str] | None] = {}
        self._busy: set[str] = set()

    # ---- modules -----------------------------------------------------------------------
    def bindings(self, module: str) -> dict[str, Binding]:
        if module in self._bindings:
            return self._bindings[module]
        if module in self._busy:            # a circular star import: what is known so far
            return {}
        src = self.tree.source_of(module)
        if src is None:
            return {}
        self._busy.add(module)
        try:
            file, is_pkg = src
            tree = ast.parse(self.tree.read(file) or "", file)
            package = module if is_pkg else module.rpartition(".")[0]
            out: dict[str, Binding] = {}
            all_names: list[str] = []
            all_static = [True, False]          # __all__ known statically; __all__ seen
            self._walk(tree.body, module, package, out, all_names, all_static)
            self._bindings[module] = out
            self._all[module] = all_names if all_static[0] and all_static[1] else None
            return out
        finally:
            self._busy.discard(module)

    def exported(self, module: str) -> list[str]:
        """What ``from module import *`` binds."""
        b = self.bindings(module)
        names = self._all.get(module)
        if names is not None:
            return names
        return [n for n in b if not n.startswith("_")]

    def _walk(self, body, module, package, out, all_names, all_static):
        for s in body:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                prev = out.get(s.name)
                nodes = prev.nodes if prev is not None and prev.kind == "function" else ()
                out[s.name] = Binding("function", node=s, module=module, nodes=(*nodes, s))
            elif isinstance(s, ast.ClassDef):
                out[s.name] = Binding("class", node=s, module=module)
            elif isinstance(s, ast.Import):
                for a in s.names:
                    if a.asname:
                        out[a.asname] = Binding("module", target=a.name)
                    else:
                        out[a.name.split(".")[0]] = Binding("module", target=a.name.split(".")[0])
            elif isinstance(s, ast.ImportFrom):
                src = _absolute(s.module, s.level, package)
                for a in s.names:
                    if a.name == "*":
                        for n in self.exported(src):
                            out[n] = Binding("from", target=src, attr=n)
                    else:
                        out[a.asname or a.name] = Binding("from", target=src, attr=a.name)
            elif isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                if "__all__" in _targets(s):
                    self._note_all(s, module, all_names, all_static)
                for n in _targets(s):
                    if isinstance(s, ast.AugAssign) and n in out:
                        continue
                    out[n] = Binding("value", module=module)
            elif isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
                f = s.value.func
                if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "__all__":
                    self._note_all(s, module, all_names, all_static)
            elif isinstance(s, ast.Delete):
                for t in s.targets:
                    if isinstance(t, ast.Name):
                        out.pop(t.id, None)
            elif isinstance(s, ast.For):
                self._reexport_loop(s, module, out)
                self._walk(s.body, module, package, out, all_names, all_static)
                self._walk(s.orelse, module, package, out, all_names, all_static)
            elif isinstance(s, ast.If):
                self._walk(s.body, module, package, out, all_names, all_static)
                self._walk(s.orelse, module, package, out, all_names, all_static)
            elif isinstance(s, ast.Try) or type(s).__name__ == "TryStar":
                for part in (s.body, *(h.body for h in s.handlers), s.orelse, s.finalbody):
                    self._walk(part, module, package, out, all_names, all_static)
            elif isinstance(s, (ast.With, ast.While)):
                self._walk(s.body, module, package, out, all_names, all_static)

    def _note_all(self, s, module, all_names, all_static):
        """``__all__ = [...]``, ``+= [...]``, ``.extend([...])``, ``.append("x")``, and
        ``+= m.__all__``; anything else makes the module's ``__all__`` unknown."""
        all_static[1] = True
        value = s.value
        if isinstance(value, ast.Call):             # __all__.extend(...) / .append(...)
            method = value.func.attr
            if method == "append" and len(value.args) == 1 and isinstance(value.args[0], ast.Constant):
                all_names.append(value.args[0].value)
                return
            value = value.args[0] if method == "extend" and len(value.args) == 1 else None
        if isinstance(s, ast.Assign) and not isinstance(s.value, ast.Call):
            all_names.clear()
        names = self._str_list(value, module)
        if names is None:
            all_static[0] = False
        else:
            all_names.extend(names)

    def _str_list(self, value, module):
        if isinstance(value, (ast.List, ast.Tuple)) and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts):
            return [e.value for e in value.elts]
        if isinstance(value, ast.BinOp) and isinstance(value.op, ast.Add):
            left, right = self._str_list(value.left, module), self._str_list(value.right, module)
            return None if left is None or right is None else left + right
        if isinstance(value, ast.Attribute) and value.attr == "__all__":
            target = self.resolve_expr(value.value, module)
            if target and target[0] == "module":
                return list(self.exported(target[1]))
        return None

    def _reexport_loop(self, s: ast.For, module, out):
        """``for name in dir(X): ... globals()[name] = obj``: every name of X lands here."""
        it = s.iter
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "dir" and it.args):
            return
        sets_globals = any(isinstance(n, ast.Subscript) and isinstance(n.value, ast.Call)
                           and isinstance(n.value.func, ast.Name) and n.value.func.id == "globals"
                           for st in ast.walk(s) if isinstance(st, ast.Assign) for n in st.targets)
        if not sets_globals:
            return
        target = self.resolve_expr(it.args[0], module)
        if target and target[0] == "module":
            for n in self.bindings(target[1]):
                if not n.startswith("__"):
                    out.setdefault(n, Binding("from", target=target[1], attr=n))

    # ---- resolving ---------------------------------------------------------------------
    def resolve_expr(self, node, module):
        """A Name/Attribute expression in ``module``'s top level, as ``("module", name)``,
        ``("class", module, ClassDef)``, ``("function", module, FunctionDef)``, or None."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Subscript):         # Generic[T], List[int]
            return self.resolve_expr(node.value, module) if not parts else None
        if not isinstance(node, ast.Name):
            return None
        r = self.resolve_name(module, node.id)
        for p in reversed(parts):
            if r is None or r[0] != "module":
                return None
            r = self.resolve_name(r[1], p)
        return r

    def resolve_name(self, module: str, name: str, depth: int = 0):
        """What ``module.name`` is (see resolve_expr); a submodule where nothing binds it."""
        if depth > 40:
            return None
        b = self.bindings(module).get(name)
        if b is None:
            sub = f"{module}.{name}"
            return ("module", sub) if self.tree.is_module(sub) else None
        if b.kind == "module":
            return ("module", b.target)
        if b.kind == "class":
            return ("class", b.module, b.node)
        if b.kind == "function":
            return ("function", b.module, b.nodes)
        if b.kind == "from":
            if b.attr in self.bindings(b.target) and (b.target, b.attr) != (module, name):
                return self.resolve_name(b.target, b.attr, depth + 1)
            sub = f"{b.target}.{b.attr}"
            if self.tree.is_module(sub):
                return ("module", sub)
            return None
        return ("value", module, None)

    def resolve_path(self, dotted: str):
        """``torch.a.b`` as resolve_name gives it, through modules; None if absent."""
        parts = dotted.split(".")
        if not self.tree.is_module(parts[0]):
            return None
        r = ("module", parts[0])
        for p in parts[1:]:
            if r[0] == "module":
                r = self.resolve_name(r[1], p)
            elif r[0] == "class":
                return ("attr", r) if p in self.class_attrs(r[1], r[2]) else None
            else:
                return None
            if r is None:
                return None
        return r

    # ---- classes and functions ---------------------------------------------------------
    def class_attrs(self, module: str, node: ast.ClassDef, seen=None) -> set[str]:
        seen = set() if seen is None else seen
        if id(node) in seen:
            return set()
        seen.add(id(node))
        names: set[str] = set()
        _class_body(node.body, names)
        for fn in ast.walk(node):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.args.args:
                me = fn.args.args[0].arg
                for st in ast.walk(fn):
                    for t in (st.targets if isinstance(st, ast.Assign) else
                              [st.target] if isinstance(st, (ast.AnnAssign, ast.AugAssign)) else []):
                        for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                            if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == me:
                                names.add(e.attr)
        # its bases', and its metaclass's (class properties: ``dist.group.WORLD``)
        for base in (*node.bases, *(k.value for k in node.keywords if k.arg == "metaclass")):
            r = self.resolve_expr(base, module)
            if r and r[0] == "class":
                names |= self.class_attrs(r[1], r[2], seen)
        return names

    @staticmethod
    def parameters(node: ast.FunctionDef) -> list[str]:
        """Its parameter names, with ``**`` when it takes any keyword."""
        a = node.args
        names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
        return names + (["**"] if a.kwarg else [])

    def callable_parameters(self, r) -> list[str] | None:
        """Parameters of a function (every overload of a stub's), or of a class's
        ``__init__``/``__new__`` (its own or the nearest base's); None where the source
        has none."""
        if r[0] == "function":
            defs = r[2]
        elif r[0] == "class":
            defs = self._find_init(r[1], r[2], set())
        else:
            return None
        if not defs:
            return None
        return sorted({p for fn in defs for p in self.parameters(fn)})

    def _find_init(self, module, node, seen) -> list:
        if id(node) in seen:
            return []
        seen.add(id(node))
        own = [st for st in node.body if isinstance(st, ast.FunctionDef) and st.name in ("__init__", "__new__")]
        if own:
            return own
        for base in node.bases:
            r = self.resolve_expr(base, module)
            if r and r[0] == "class":
                found = self._find_init(r[1], r[2], seen)
                if found:
                    return found
        return []


def _absolute(mod: str | None, level: int, package: str) -> str:
    if not level:
        return mod or ""
    base = package.split(".")
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join([*base, *([mod] if mod else [])])


def _targets(s) -> list[str]:
    ts = s.targets if isinstance(s, ast.Assign) else [s.target]
    out = []
    for t in ts:
        for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]):
            if isinstance(e, ast.Name):
                out.append(e.id)
    return out


def _class_body(body, names):
    for s in body:
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(s.name)
        elif isinstance(s, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            names.update(_targets(s))
        elif isinstance(s, ast.If):
            _class_body(s.body, names)
            _class_body(s.orelse, names)
        elif isinstance(s, ast.Try):
            for part in (s.body, *(h.body for h in s.handlers), s.orelse, s.finalbody):
                _class_body(part, names)


# ---------------------------------------------------------------------------------------
# the package's references to torch
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """One use of torch in the package. ``kind``: ``module`` (``import torch.x``), ``name``
    (a dotted name that must exist), ``keyword`` (``name`` called with keyword ``detail``),
    ``private`` (an attribute ``name`` starting with ``_`` read on an object of unknown
    type, defined nowhere in the package)."""
    file: str
    line: int
    kind: str
    name: str
    detail: str = ""

    def where(self) -> str:
        return f"{self.file}:{self.line}"


class _Scope:
    def __init__(self, node, parent, is_class=False):
        self.node, self.parent, self.is_class = node, parent, is_class
        self.imports: dict[str, str] = {}    # name -> dotted path of what it was imported as
        self.local: set[str] = set()         # names bound otherwise (they shadow outer imports)


def _own_statements(node):
    """The nodes of a scope's body, not descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(node))
    while stack:
        n = stack.pop()
        yield n
        if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(n))


def _bind_scope(scope: _Scope, module_name: str, is_pkg: bool):
    node = scope.node
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        for p in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg):
            if p is not None:
                scope.local.add(p.arg)
    package = module_name if is_pkg else module_name.rpartition(".")[0]
    for n in _own_statements(node):
        if isinstance(n, ast.Import):
            for a in n.names:
                if a.asname:
                    scope.imports[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    scope.imports[top] = top
        elif isinstance(n, ast.ImportFrom):
            src = _absolute(n.module, n.level, package)
            for a in n.names:
                if a.name != "*":
                    scope.imports[a.asname or a.name] = f"{src}.{a.name}"
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope.local.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            scope.local.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            scope.local.add(n.name)
    # An import wins over another binding of the same name in the same scope
    # (``try: import x / except ImportError: x = None``).
    scope.local -= set(scope.imports)


def _lookup(scope: _Scope, name: str) -> str | None:
    s, first = scope, True
    while s is not None:
        if s.is_class and not first:          # class scopes do not enclose their methods
            s = s.parent
            continue
        if name in s.imports:
            return s.imports[name]
        if name in s.local:
            return None
        s, first = s.parent, False
    return None


def _chain(node):
    """``a.b.c`` as (Name node, [b, c]), or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return node, list(reversed(parts))
    return None


def package_files(root: Path = REPO, scanned=SCANNED) -> list[Path]:
    return sorted(p for d in scanned for p in (root / d).rglob("*.py"))


def references(root: Path = REPO, scanned=SCANNED, files=None) -> list[Ref]:
    """Every use of torch in the scanned files: imports, dotted names, keyword arguments
    of calls to torch, and private attributes read on objects of unknown type."""
    out: list[Ref] = []
    defined = _package_defined_names(root, scanned)
    for path in (files if files is not None else package_files(root, scanned)):
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        is_pkg = path.name == "__init__.py"
        mod = rel[:-3].replace("/", ".")
        if is_pkg:
            mod = mod[:-len(".__init__")]
        out += _file_references(path, rel, mod, is_pkg, defined)
    return out


def _package_defined_names(root, scanned) -> set[str]:
    names = set()
    for p in package_files(root, scanned):
        for n in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                names.add(n.attr)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                names.add(n.id)
            elif isinstance(n, ast.arg) or isinstance(n, ast.keyword) and n.arg:
                names.add(n.arg)
    return names


def _file_references(path: Path, rel: str, mod: str, is_pkg: bool, defined: set[str]) -> list[Ref]:
    tree = ast.parse(path.read_text(), str(path))
    out: list[Ref] = []
    package = mod if is_pkg else mod.rpartition(".")[0]
    parents: dict[int, ast.AST] = {}
    for n in ast.walk(tree):
        for ch in ast.iter_child_nodes(n):
            parents[id(ch)] = n

    def visit(node, scope):
        check(node, scope)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                # decorators, defaults, bases and annotations belong to the enclosing scope
                outer = [*getattr(child, "decorator_list", ()), *getattr(child, "bases", ()),
                         *getattr(child, "keywords", ())]
                if not isinstance(child, ast.ClassDef):
                    outer += [*child.args.defaults, *(d for d in child.args.kw_defaults if d is not None)]
                for part in outer:
                    visit(part, scope)
                inner = _Scope(child, scope, isinstance(child, ast.ClassDef))
                _bind_scope(inner, mod, is_pkg)
                check(child, scope)
                for st in (child.body if isinstance(child.body, list) else [child.body]):
                    visit(st, inner)
            else:
                visit(child, scope)

    def check(node, scope):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_torch(a.name):
                    out.append(Ref(rel, node.lineno, "module", a.name))
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(node.module, node.level, package)
            if _is_torch(src):
                for a in node.names:
                    out.append(Ref(rel, node.lineno, "module", src) if a.name == "*"
                               else Ref(rel, node.lineno, "name", f"{src}.{a.name}"))
        elif isinstance(node, ast.Attribute):
            c = _chain(node)
            dotted = _dotted(c, scope) if c else None
            if dotted is not None:
                if _is_torch(dotted) and not _is_inner(node, parents):
                    out.append(Ref(rel, node.lineno, "name", dotted))
            elif (node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in defined
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                  and _receiver_unknown(node, scope)):
                out.append(Ref(rel, node.lineno, "private", node.attr))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and not _is_inner(node, parents):
            dotted = _lookup(scope, node.id)
            if dotted is not None and _is_torch(dotted):
                out.append(Ref(rel, node.lineno, "name", dotted))
        if isinstance(node, ast.Call):
            c = _chain(node.func)
            target = _dotted(c, scope) if c else None
            if target is not None and _is_torch(target):
                for k in node.keywords:
                    if k.arg is not None:
                        out.append(Ref(rel, node.lineno, "keyword", target, k.arg))
            # getattr(torch_thing, "name") is a plain reference to torch_thing.name; with a
            # default, or under hasattr(), the name is optional (a guarded use of a newer
            # API) and not checked.
            f = node.func
            if (isinstance(f, ast.Name) and f.id == "getattr" and _lookup(scope, "getattr") is None
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str)):
                c = _chain(node.args[0])
                dotted = _dotted(c, scope) if c else None
                if dotted is not None and _is_torch(dotted):
                    out.append(Ref(rel, node.lineno, "name", f"{dotted}.{node.args[1].value}"))

    def _receiver_unknown(node, scope):
        c = _chain(node.value)
        return c is None or _lookup(scope, c[0].id) is None

    top = _Scope(tree, None)
    _bind_scope(top, mod, is_pkg)
    visit(tree, top)
    return out


def _is_inner(node, parents) -> bool:
    """Part of a longer chain ``a.b.c`` (the outermost Attribute is the one checked)."""
    p = parents.get(id(node))
    return isinstance(p, ast.Attribute) and p.value is node


def _dotted(c, scope) -> str | None:
    name, parts = c
    base = _lookup(scope, name.id)
    return None if base is None else ".".join([base, *parts])


def _is_torch(dotted: str) -> bool:
    return dotted == "torch" or dotted.startswith("torch.")


# ---------------------------------------------------------------------------------------
# the data: what of a release the check needs
# ---------------------------------------------------------------------------------------

def make_data(release: Release, refs: list[Ref], source: str) -> dict:
    """The release's names for every module the references pass through (and
    BASE_MODULES), the attributes of every class a reference reaches into, and the
    parameters of every function the package passes keywords to."""
    modules: dict[str, list[str]] = {}
    submodules: dict[str, list[str]] = {}
    classes: dict[str, list[str] | None] = {}
    signatures: dict[str, list[str] | None] = {}
    wanted_modules = set(BASE_MODULES)
    wanted_classes: set[str] = set()
    dotted_names = [r.name for r in refs if r.kind in ("name", "module")] + list(RELIED_ON)
    for name in dotted_names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            r = release.resolve_path(prefix)
            if r is None:
                break
            if r[0] == "module":
                wanted_modules.add(prefix)
            elif r[0] == "class" and i < len(parts):
                wanted_classes.add(prefix)
                break
            else:
                break
    for m in sorted(wanted_modules):
        r = release.resolve_path(m)
        if r is None or r[0] != "module":
            continue
        names = release.bindings(r[1])
        subs = _submodules(release.tree, r[1])
        modules[m] = sorted(set(names) | subs)
        for n in names:
            cr = release.resolve_name(r[1], n)
            if cr is not None and cr[0] == "class":
                classes.setdefault(f"{m}.{n}", None)
            elif cr is not None and cr[0] == "module":
                subs.add(n)
        submodules[m] = sorted(subs)
    for c in sorted(wanted_classes):
        r = release.resolve_path(c)
        classes[c] = sorted(release.class_attrs(r[1], r[2]))
    for name in sorted({r.name for r in refs if r.kind == "keyword"}):
        r = release.resolve_path(name)
        if r is not None:
            signatures[name] = release.callable_parameters(r)
    return {"torch": release.tree.version(), "source": source, "modules": modules,
            "submodules": submodules, "classes": classes, "signatures": signatures}


def _submodules(tree: Tree, module: str) -> set[str]:
    src = tree.source_of(module)
    if src is None or not src[1]:
        return set()
    prefix = module.replace(".", "/") + "/"
    out = set()
    for f in tree.files:
        if f.startswith(prefix):
            rest = f[len(prefix):]
            head = rest.split("/")[0]
            if "/" in rest and tree.is_module(f"{module}.{head}"):
                out.add(head)
            elif head.endswith(".py") and head != "__init__.py":
                out.add(head[:-3])
    return {n for n in out if n.isidentifier()}


REGENERATE = "python tests/tools/torch_api.py torch-{v}-*.whl (after pip download torch=={v} --no-deps)"


def problems(data: dict, refs: list[Ref]) -> list[str]:
    """Every reference that torch ``data["torch"]`` does not have, as ``file:line: what``;
    every private torch name not in RELIED_ON; every RELIED_ON entry absent from the
    release or no longer used."""
    v = data["torch"]
    out = []
    relied_attrs = {k.rsplit(".", 1)[1] for k in RELIED_ON}
    for r in refs:
        if r.kind in ("name", "module"):
            why = missing(data, r.name)
            if why:
                out.append(f"{r.where()}: {r.name}: {why}")
            elif _private(r.name) and r.name not in RELIED_ON:
                out.append(f"{r.where()}: {r.name} is private to torch: use a public API, or list it in "
                           "RELIED_ON (tests/tools/torch_api.py) with the reason")
        elif r.kind == "keyword":
            if missing(data, r.name):
                continue                                # reported as a name
            if r.name not in data["signatures"]:
                out.append(f"{r.where()}: {r.name}(): its parameters are not recorded; regenerate: "
                           + REGENERATE.format(v=v))
                continue
            params = data["signatures"][r.name]
            if params is not None and "**" not in params and r.detail not in params:
                out.append(f"{r.where()}: {r.name}(): torch {v} has no keyword {r.detail}= "
                           f"(it takes {', '.join(p for p in params if p not in ('self', 'cls'))})")
        elif r.kind == "private" and r.name not in relied_attrs:
            out.append(f"{r.where()}: .{r.name} looks like a private torch attribute (it is defined nowhere in the "
                       "package): use a public API, or list it in RELIED_ON (tests/tools/torch_api.py) with the reason")
    used = {r.name for r in refs if r.kind in ("name", "private")}
    attrs_used = {r.name for r in refs if r.kind == "private"} | _attributes_read()
    for name in sorted(RELIED_ON):
        why = missing(data, name)
        if why:
            out.append(f"RELIED_ON {name}: {why}")
        if name not in used and name.rsplit(".", 1)[1] not in attrs_used:
            out.append(f"RELIED_ON {name}: the package no longer uses it; drop the entry")
    return out


def missing(data: dict, dotted: str) -> str | None:
    """Why torch ``data["torch"]`` lacks ``dotted``, or None if it has it (as far as the
    data can tell: attributes of values, and of attributes, are not followed)."""
    v, mods = data["torch"], data["modules"]
    parts = dotted.split(".")
    i = max((k for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in mods), default=0)
    if i == 0:
        return f"module {parts[0]} is not recorded; regenerate: " + REGENERATE.format(v=v)
    if i == len(parts):
        return None
    mod, name = ".".join(parts[:i]), parts[i]
    if name not in mods[mod]:
        return f"torch {v} has no {mod}.{name}"
    path = f"{mod}.{name}"
    rest = parts[i + 1:]
    if not rest:
        return None
    if name in data["submodules"].get(mod, ()):
        return f"module {path} of torch {v} is not recorded; regenerate: " + REGENERATE.format(v=v)
    if path in data["classes"]:
        attrs = data["classes"][path]
        if attrs is None:
            return f"the attributes of class {path} are not recorded; regenerate: " + REGENERATE.format(v=v)
        if rest[0] not in attrs:
            return f"torch {v}'s {path} has no attribute {rest[0]}"
    return None


def _private(dotted: str) -> bool:
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in dotted.split(".")[1:])


def _attributes_read(root: Path = REPO, scanned=SCANNED) -> set[str]:
    return {n.attr for p in package_files(root, scanned) for n in ast.walk(ast.parse(p.read_text(), str(p)))
            if isinstance(n, ast.Attribute)}


def data_path(version: str) -> Path:
    return DATA_DIR / f"torch_api_{version}.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a torch wheel (.whl) or a directory holding torch/")
    ap.add_argument("--out", help="the JSON file to write (default: tests/data/torch_api_VERSION.json)")
    args = ap.parse_args(argv)
    tree = Tree(args.source)
    data = make_data(Release(tree), references(), Path(args.source).name)
    out = Path(args.out) if args.out else data_path(data["torch"])
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{out}: torch {data['torch']}, {len(data['modules'])} modules, {len(data['classes'])} classes, "
          f"{len(data['signatures'])} signatures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
