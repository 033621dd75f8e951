"""The default corpus shipped with the package: about 3 MB of English prose from CPython's own docs.

`corpus/builtin.txt.gz` is built once by `corpus/build_corpus.py` (see its docstring for the sources
and the prose filter) and committed; nothing is downloaded or generated at run time. Documents are
separated by a line holding only the ASCII record separator.

Every `VALIDATION_EVERY`-th document (indices 9, 19, 29, ...) is held out as the validation split and
never appears in train. That is about 10% of the text, ~300k byte tokens: enough for a full
validation batch of 8 x 2048 tokens on each of 8 data-parallel ranks. A strided hold-out samples
every source (language reference, stdlib modules, C modules), unlike the last files in sorted order.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from torchtitan_like.errors import DataError

CORPUS_FILE = Path(__file__).with_name("corpus") / "builtin.txt.gz"
DOCUMENT_SEPARATOR = "\n\x1e\n"
VALIDATION_EVERY = 10
SPLITS = ("train", "validation")


@functools.lru_cache(maxsize=1)
def _all_documents() -> tuple[str, ...]:
    try:
        with gzip.open(CORPUS_FILE, "rb") as corpus:
            text = corpus.read().decode("utf-8")
    except OSError as error:
        raise DataError(f"the built-in corpus {CORPUS_FILE} is missing or damaged ({error}); reinstall the "
                        f"package or rebuild it with python {CORPUS_FILE.with_name('build_corpus.py')}") from error
    return tuple(text.split(DOCUMENT_SEPARATOR))


def is_validation_document(index: int) -> bool:
    return index % VALIDATION_EVERY == VALIDATION_EVERY - 1


def load_builtin_documents(split: str) -> list[str]:
    """The documents of the built-in corpus in `split` ("train" or "validation"), in corpus order."""
    if split not in SPLITS:
        raise DataError(f'unknown split "{split}" of the built-in corpus; expected one of {", ".join(SPLITS)}')
    want_validation = split == "validation"
    return [document for index, document in enumerate(_all_documents())
            if is_validation_document(index) == want_validation]
