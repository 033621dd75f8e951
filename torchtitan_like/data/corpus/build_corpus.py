"""Build the shipped default corpus `builtin.txt.gz` from the prose that CPython carries.

Run once, from the repository root, with the Python that should supply the text:

    python torchtitan_like/data/corpus/build_corpus.py

The output is a deterministic function of the CPython installation (3.11.7 built the shipped file):
inputs are visited in sorted order and the gzip header carries no timestamp, so the same
interpreter rebuilds a byte-identical file. Nothing is downloaded.

Sources, each giving one document:
- every topic of `pydoc_data.topics` (the language reference pages that `help()` shows);
- every `.py` file of the standard library (tests included, `site-packages` excluded): its module,
  class and function docstrings plus its comment blocks of four lines or more, in source order;
- every `.txt`/`.rst` file of the standard library outside the tests (IDLE's README and NEWS, the
  licence, the email package's architecture notes);
- every C extension module (built in or in `lib-dynload`, test modules excluded): its docstring and
  those of its functions, classes and their methods.

Only prose is kept: a paragraph (text between blank lines) survives when it is mostly letters and
spaces, has a few words and is not a doctest or an indented code block. Paragraphs are
deduplicated across the corpus (the first occurrence wins) so boilerplate such as "Return
self==value." appears once. Documents shorter than `MIN_DOCUMENT_CHARS` are dropped.

Format: UTF-8 text, documents separated by a line holding only the ASCII record separator
(DOCUMENT_SEPARATOR). `torchtitan_like.data.builtin_corpus` reads it and holds out every
`VALIDATION_EVERY`-th document as the validation split.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib
import inspect
import pathlib
import re
import sys
import sysconfig

DOCUMENT_SEPARATOR = "\n\x1e\n"
MIN_DOCUMENT_CHARS = 200
MIN_PARAGRAPH_WORDS = 4
MIN_PROSE_FRACTION = 0.8  # letters, digits, spaces and sentence punctuation over all characters
OUTPUT = pathlib.Path(__file__).with_name("builtin.txt.gz")
SKIPPED_FOLDERS = {"site-packages", "__pycache__"}
MIN_COMMENT_BLOCK_LINES = 4

_PROSE_CHARS = re.compile(r"[A-Za-z0-9 \n,.;:'\"()?!-]")
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def is_prose(paragraph: str) -> bool:
    """True for a paragraph of natural language, False for code, tables and doctests."""
    lines = paragraph.splitlines()
    if any(line.lstrip().startswith((">>>", "...", "$ ", "%")) for line in lines):
        return False
    # reST and docstrings indent code blocks; prose paragraphs start at the margin.
    if sum(line.startswith(("    ", "\t")) for line in lines) > len(lines) / 2:
        return False
    if len(paragraph.split()) < MIN_PARAGRAPH_WORDS:
        return False
    return len(_PROSE_CHARS.findall(paragraph)) >= MIN_PROSE_FRACTION * len(paragraph)


def prose_paragraphs(text: str, seen: set[bytes]) -> list[str]:
    """Split text at blank lines and keep the prose paragraphs not seen earlier in the corpus."""
    text = _CONTROL_CHARS.sub("", text.replace("\r\n", "\n").replace("\t", "    "))
    kept = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip("\n").rstrip()
        if not paragraph.strip() or not is_prose(paragraph):
            continue
        digest = hashlib.sha1(" ".join(paragraph.split()).encode()).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(paragraph)
    return kept


def pydoc_topic_texts() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics
    return [(f"topic {name}", topics[name]) for name in sorted(topics)]


def source_file_texts(stdlib: pathlib.Path) -> list[tuple[str, str]]:
    """Docstrings and long comment blocks of each stdlib source file, in source order."""
    texts = []
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_FOLDERS & set(relative.parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        pieces: list[tuple[int, str]] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    pieces.append((node.body[0].lineno, docstring))
        pieces += comment_blocks(source)
        pieces.sort(key=lambda piece: piece[0])
        texts.append((relative.as_posix(), "\n\n".join(text for _, text in pieces)))
    return texts


def comment_blocks(source: str) -> list[tuple[int, str]]:
    """Runs of at least MIN_COMMENT_BLOCK_LINES full-line comments, as (first line, text)."""
    blocks, block, start = [], [], 0
    for line_number, line in enumerate(source.splitlines() + [""], start=1):
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            if not block:
                start = line_number
            block.append(stripped.lstrip("#").strip())
        else:
            if len(block) >= MIN_COMMENT_BLOCK_LINES:
                blocks.append((start, "\n".join(block)))
            block = []
    return blocks


def extension_module_names(stdlib: pathlib.Path) -> list[str]:
    """Modules written in C: compiled into the interpreter or shipped in lib-dynload (test modules excluded)."""
    shared = {path.name.split(".")[0] for path in (stdlib / "lib-dynload").glob("*.so")}
    names = set(sys.builtin_module_names) | shared
    return sorted(name for name in names if not name.startswith(("_test", "xx", "_xx", "_ctypes_test")))


def extension_module_texts(stdlib: pathlib.Path) -> list[tuple[str, str]]:
    """Docstrings of each C module, its functions, its classes and their methods."""
    texts = []
    for name in extension_module_names(stdlib):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        docstrings = [inspect.getdoc(module) or ""]
        for _, value in sorted(vars(module).items()):
            if inspect.isbuiltin(value):
                docstrings.append(inspect.getdoc(value) or "")
            elif inspect.isclass(value) and value.__module__ in (name, name.lstrip("_")):
                docstrings.append(inspect.getdoc(value) or "")
                docstrings += [getattr(member, "__doc__", None) or "" for _, member in sorted(vars(value).items())]
        texts.append((f"extension module {name}", "\n\n".join(docstrings)))
    return texts


def prose_file_texts(stdlib: pathlib.Path) -> list[tuple[str, str]]:
    """The plain-text and reST documents of the stdlib (READMEs, IDLE news and help, the licence)."""
    texts = []
    for path in sorted([*stdlib.rglob("*.txt"), *stdlib.rglob("*.rst")]):
        relative = path.relative_to(stdlib)
        if SKIPPED_FOLDERS & set(relative.parts) or "test" in relative.parts:
            continue
        try:
            texts.append((relative.as_posix(), path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    return texts


def build_documents() -> list[str]:
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    seen: set[bytes] = set()
    documents = []
    for title, text in (pydoc_topic_texts() + prose_file_texts(stdlib) + source_file_texts(stdlib)
                        + extension_module_texts(stdlib)):
        paragraphs = prose_paragraphs(text, seen)
        document = "\n\n".join(paragraphs)
        if len(document) >= MIN_DOCUMENT_CHARS:
            documents.append(document.replace("\x1e", ""))
    return documents


def main() -> None:
    documents = build_documents()
    payload = DOCUMENT_SEPARATOR.join(documents).encode("utf-8")
    # mtime=0 keeps the gzip header, hence the file, identical across rebuilds.
    with open(OUTPUT, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as out:
        out.write(payload)
    print(f"{OUTPUT}: {len(documents)} documents, {len(payload) / 1e6:.2f} MB text, "
          f"{OUTPUT.stat().st_size / 1e6:.2f} MB gzip (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
