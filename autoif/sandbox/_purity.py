"""Static "purity" check that decides whether a sandbox child may run another function after this one.

Every function starts in a process forked from the pristine zygote state, but a fork costs about as
much CPU as 500 typical calls. So a child that ran a function is reused for the next function of
the same job (same inputs) only when the function it just ran is *statically* unable to leave state
behind or to reach anything outside plain data:

* imports only of a curated set of stateless stdlib modules, and only their stateless public names
  (no ``random``, no ``decimal.getcontext``, no ``functools.wraps``, no ``operator.attrgetter``, ...);
* no attribute whose name starts with ``_`` (so no ``__class__``/``__globals__``/``_cache`` ...),
  no attribute store or delete at all, and attribute loads only of names that are public methods
  or attributes of a fixed set of plain value types (str, list, dict, re.Match, Counter, ...) or of
  the imported stateless modules; no names starting with ``__`` (``__builtins__``, ``__import__``);
* only a fixed set of harmless builtins (no getattr/setattr/vars/globals/type/object/eval/exec/...);
* no class definitions, no ``match`` statements (class patterns read attributes by name), no
  generator functions, no async code.

Such code can only compute on its inputs and on fresh objects: it cannot reach ``os``, file
descriptors, frames, module dicts, class dicts or shared mutable containers, so it can neither
leave a hook for the next function nor forge another function's results. After each reused run
the child also checks dynamically (``snapshot``/``unchanged``) that builtins, ``sys.modules``, the
module dicts, the random state, the decimal context and the recursion limit are untouched, and
exits on any difference. Anything the check does not accept simply runs last in its child, and
the next function gets a fresh fork (the conservative default).
"""
from __future__ import annotations

import ast
import builtins
import sys

# stateless stdlib modules and the public names of theirs that must NOT be used by reusable code
PURE_MODULES: dict[str, frozenset[str]] = {
    "re": frozenset({"purge", "template", "Scanner"}),
    "json": frozenset({"dump", "load"}),  # file objects: not pure data
    "string": frozenset({"Formatter"}),  # Formatter.get_field does getattr by string
    "math": frozenset(),
    "collections": frozenset(),
    "itertools": frozenset(),
    "functools": frozenset({"update_wrapper", "wraps", "total_ordering", "singledispatchmethod"}),
    "operator": frozenset({"attrgetter", "methodcaller"}),  # getattr by string
    "unicodedata": frozenset(),
    "textwrap": frozenset(),
    "difflib": frozenset(),
    "statistics": frozenset({"NormalDist"}),  # samples() draws from the shared random state
    "datetime": frozenset(),
    "calendar": frozenset({"setfirstweekday", "different_locale", "LocaleTextCalendar", "LocaleHTMLCalendar"}),
    "html": frozenset(),
    "bisect": frozenset(),
    "heapq": frozenset(),
    "fractions": frozenset(),
    "decimal": frozenset({"getcontext", "setcontext", "localcontext"}),
    "keyword": frozenset(),
    "copy": frozenset(),
}

SAFE_BUILTINS = frozenset({
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr", "complex", "dict",
    "divmod", "enumerate", "filter", "float", "format", "frozenset", "hash", "hex", "int", "isinstance",
    "issubclass", "iter", "len", "list", "map", "max", "min", "next", "oct", "ord", "pow", "print", "range",
    "repr", "reversed", "round", "set", "slice", "sorted", "str", "sum", "tuple", "zip",
    "True", "False", "None", "NotImplemented", "Ellipsis",
})

_FORBIDDEN_NODES = (ast.ClassDef, ast.AsyncFunctionDef, ast.Await, ast.AsyncFor, ast.AsyncWith, ast.Yield,
                    ast.YieldFrom, ast.Match)
_IMMUTABLE = (str, bytes, int, float, complex, bool, frozenset, type(None))


class Policy:
    """What reusable code may name. Built once in the zygote from the modules actually loaded."""

    def __init__(self, allowed_modules, extra_pure_modules=()) -> None:
        pure_modules = dict(PURE_MODULES)
        for name in extra_pure_modules:  # tests only: declare a module stateless
            pure_modules.setdefault(name, frozenset())
        mods = {}
        for name in pure_modules:
            if name in allowed_modules and name in sys.modules:
                mods[name] = sys.modules[name]
        self.module_attrs: dict[str, frozenset[str]] = {}
        excluded: set[str] = set()
        for name, mod in mods.items():
            ok = set()
            for attr in dir(mod):
                if attr.startswith("_"):
                    continue
                v = getattr(mod, attr, None)
                # callables (functions, classes) and immutable constants only: no submodules,
                # no shared mutable containers or instances (keyword.kwlist, calendar.c, ...)
                if attr not in pure_modules[name] and not isinstance(v, type(sys)) and (
                        callable(v) or _immutable(v)):
                    ok.add(attr)
                else:
                    excluded.add(attr)
            self.module_attrs[name] = frozenset(ok)
        import collections
        import datetime
        import re

        value_types = [str, bytes, bytearray, list, dict, set, frozenset, tuple, int, float, complex, bool,
                       range, slice, BaseException, re.Pattern, re.Match, collections.Counter,
                       collections.deque, collections.defaultdict, collections.OrderedDict, datetime.date,
                       datetime.datetime, datetime.time, datetime.timedelta]
        if "decimal" in sys.modules:
            value_types.append(sys.modules["decimal"].Decimal)
        if "fractions" in sys.modules:
            value_types.append(sys.modules["fractions"].Fraction)
        if "json" in sys.modules:
            value_types.append(sys.modules["json"].JSONDecodeError)
        attrs = {a for t in value_types for a in dir(t) if not a.startswith("_")}
        # a name that is unsafe on some module must not be reachable through an aliased module
        self.safe_attrs = frozenset(attrs - excluded)
        self.builtin_names = frozenset(dir(builtins))
        self.safe_builtins = frozenset(
            n for n in self.builtin_names
            if n in SAFE_BUILTINS or (isinstance(getattr(builtins, n), type)
                                      and issubclass(getattr(builtins, n), BaseException)))

    def is_pure(self, src) -> bool:
        """True only if the source provably stays inside the reusable subset described above."""
        if type(src) is not str or len(src) > 200_000:  # noqa: E721
            return False
        try:
            tree = ast.parse(src)
            nodes = list(ast.walk(tree))
        except BaseException:  # SyntaxError, RecursionError, MemoryError...: not reusable
            return False
        modules: dict[str, str] = {}
        for node in nodes:
            t = type(node)
            if t is ast.Import:
                for a in node.names:
                    if a.name not in self.module_attrs:
                        return False
                    modules[a.asname or a.name] = a.name
            elif t is ast.ImportFrom:
                if node.level or node.module not in self.module_attrs:
                    return False
                for a in node.names:
                    if a.name not in self.module_attrs[node.module]:
                        return False
        for node in nodes:
            t = type(node)
            if isinstance(node, _FORBIDDEN_NODES):
                return False
            if t is ast.Attribute:
                if type(node.ctx) is not ast.Load or node.attr.startswith("_"):
                    return False
                base = node.value
                if type(base) is ast.Name and base.id in modules:
                    if node.attr not in self.module_attrs[modules[base.id]]:
                        return False
                elif node.attr not in self.safe_attrs:
                    return False
            elif t is ast.Name:
                if node.id.startswith("__"):
                    return False
                if node.id in self.builtin_names and node.id not in self.safe_builtins:
                    return False
            elif t in (ast.FunctionDef, ast.Lambda, ast.arg, ast.alias, ast.ExceptHandler, ast.Global, ast.Nonlocal):
                names = []
                if t is ast.FunctionDef:
                    names = [node.name]
                elif t is ast.arg:
                    names = [node.arg]
                elif t is ast.alias:
                    names = [node.asname or node.name]
                elif t is ast.ExceptHandler and node.name:
                    names = [node.name]
                elif t in (ast.Global, ast.Nonlocal):
                    names = node.names
                if any(n.startswith("__") for n in names):
                    return False
        return True


def _immutable(v) -> bool:
    if isinstance(v, _IMMUTABLE):
        return True
    if type(v) is tuple:  # noqa: E721
        return all(_immutable(x) for x in v)
    return False


# ------------------------------------------------------------------------------------ dynamic check
def snapshot(module_names) -> tuple:
    """What a reused child compares after each function (shallow: identities of bindings)."""
    mods = sys.modules
    watched = [n for n in ("builtins", "sys", *module_names) if n in mods]
    dicts = tuple((n, mods[n], dict(mods[n].__dict__)) for n in watched)
    return (dict(mods), dicts, _state())


def _state() -> tuple:
    import gc

    rnd = sys.modules.get("random")
    dec = sys.modules.get("decimal")
    ctx = None
    if dec is not None:
        c = dec.getcontext()
        ctx = (c.prec, c.rounding, c.Emin, c.Emax, c.capitals, c.clamp, tuple(sorted(
            (k.__name__, v) for k, v in c.traps.items())))
    return (
        rnd.getstate() if rnd is not None else None, ctx, sys.getrecursionlimit(), sys.getswitchinterval(),
        sys.gettrace(), sys.getprofile(), gc.isenabled(), gc.get_threshold(), len(gc.garbage), len(gc.callbacks),
        type(sys.stdout), type(sys.stderr), sys.stdin,
    )


def unchanged(snap: tuple) -> bool:
    try:
        mods, dicts, state = snap
        if sys.modules != mods:
            return False
        for _n, mod, d in dicts:
            if mod.__dict__ != d:
                return False
        return _state() == state
    except BaseException:  # anything odd: treat as changed
        return False
