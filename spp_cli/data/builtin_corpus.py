"""`builtin:python-docs`: a text corpus built offline from what every Python installation carries.

The documents are the interpreter's own documentation: the pydoc topics (`pydoc_data/topics.py`) and the
docstrings of the standard library's modules, classes and functions. Source files are *parsed* with `ast`,
never imported, so building the corpus runs no library code. The build is deterministic for a given Python
version: files are read in sorted order and each module goes to train / validation / test by a hash of its
name (about 90% / 5% / 5%), so adding a module elsewhere never moves another one between splits.
"""

import ast
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

CORPUS_VERSION = 1  # bump when the extraction changes: it invalidates caches and the tiny model's card
SPLITS = ("train", "validation", "test")
SKIPPED_DIRS = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")


@dataclass(frozen=True)
class Corpus:
    name: str
    splits: dict[str, list[str]]  # split -> documents
    sha256: dict[str, str]  # split -> sha256 of the documents joined with "\n\n"
    python_version: str

    def documents(self, split: str) -> list[str]:
        return self.splits[split]


def split_of(document_name: str) -> str:
    """Assign a document to a split by the first byte of sha256(name): stable and independent of the others."""
    byte = hashlib.sha256(document_name.encode()).digest()[0]
    if byte < 230:
        return "train"
    return "validation" if byte < 243 else "test"


def _docstring_entries(tree: ast.Module, module_name: str) -> list[str]:
    """'name' headings followed by their docstrings, in source order (module first)."""
    entries = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        entries.append(f"Module {module_name}\n\n{module_doc}")

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    entries.append(f"{kind} {module_name}.{qualname}\n\n{doc}")
                visit(child, qualname + ".")

    visit(tree, "")
    return entries


def _stdlib_documents(stdlib: Path) -> list[tuple[str, str]]:
    documents = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if any(part in SKIPPED_DIRS for part in relative.parts[:-1]) or relative.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken (lib2to3 fixtures, bad encodings)
        module_name = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        entries = _docstring_entries(tree, module_name)
        if entries:
            documents.append((module_name, "\n\n".join(entries)))
    return documents


def _topic_documents(stdlib: Path) -> list[tuple[str, str]]:
    """The pydoc topics dict literal, read with ast.literal_eval (not imported)."""
    topics_file = stdlib / "pydoc_data" / "topics.py"
    if not topics_file.exists():
        return []
    tree = ast.parse(topics_file.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "topics":
            topics = ast.literal_eval(node.value)
            return [(f"topic:{name}", text.strip()) for name, text in sorted(topics.items())]
    return []


def build_python_docs(stdlib: Path | None = None) -> Corpus:
    """Build the corpus from scratch (a few seconds on 2 cores)."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name, text in _topic_documents(stdlib) + _stdlib_documents(stdlib):
        splits[split_of(name)].append(text)
    digests = {split: hashlib.sha256("\n\n".join(docs).encode()).hexdigest() for split, docs in splits.items()}
    return Corpus("python-docs", splits, digests, python_version=sys.version.split()[0])


def _cache_path() -> Path:
    root = Path(os.environ.get("SPP_CACHE", Path.home() / ".cache" / "spp"))
    key = hashlib.sha256(f"{sys.version}|{sysconfig.get_paths()['stdlib']}|{CORPUS_VERSION}".encode()).hexdigest()
    return root / "builtin" / f"python-docs-{key[:16]}.json"


def load_python_docs() -> Corpus:
    """The corpus, from a per-interpreter cache when present (rebuilt if the cache is unreadable)."""
    cache = _cache_path()
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        return Corpus(data["name"], data["splits"], data["sha256"], data["python_version"])
    except (OSError, ValueError, KeyError):
        pass
    corpus = build_python_docs()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_suffix(f".tmp-{os.getpid()}")
        temporary.write_text(json.dumps(corpus.__dict__), encoding="utf-8")
        os.replace(temporary, cache)
    except OSError:
        pass  # a read-only home still works, just slower
    return corpus


BUILTIN_CORPORA = {"python-docs": load_python_docs}
