from __future__ import annotations

import collections
import gzip

import pytest

from torchtitan_like.data import builtin_corpus
from torchtitan_like.data.builtin_corpus import CORPUS_FILE, load_builtin_documents
from torchtitan_like.data.corpus.build_corpus import is_prose
from torchtitan_like.errors import DataError


def test_corpus_is_several_megabytes_of_documents_and_a_small_gzip():
    documents = load_builtin_documents("train") + load_builtin_documents("validation")
    total_bytes = sum(len(document.encode("utf-8")) for document in documents)
    assert 3_000_000 <= total_bytes <= 6_000_000
    assert len(documents) > 500
    assert CORPUS_FILE.stat().st_size < 2_500_000
    assert all(document.strip() and "\x1e" not in document for document in documents)


def test_corpus_is_english_prose():
    text = "\n".join(load_builtin_documents("train"))
    most_common = [chr(byte) for byte, _ in collections.Counter(text.encode("utf-8")).most_common(8)]
    assert most_common[0] == " " and set(most_common[1:]) <= set("etaoinsrhl")
    words = collections.Counter(text.lower().split())
    for word in ("the", "of", "and", "is", "to", "a", "function", "returns"):
        assert words[word] > 500, word


def test_loading_is_deterministic_and_splits_are_disjoint_and_complete():
    train, validation = load_builtin_documents("train"), load_builtin_documents("validation")
    builtin_corpus._all_documents.cache_clear()
    assert load_builtin_documents("train") == train
    assert not set(train) & set(validation)
    with gzip.open(CORPUS_FILE, "rt", encoding="utf-8") as corpus:
        all_documents = corpus.read().split(builtin_corpus.DOCUMENT_SEPARATOR)
    assert validation == all_documents[builtin_corpus.VALIDATION_EVERY - 1 :: builtin_corpus.VALIDATION_EVERY]
    assert len(train) + len(validation) == len(all_documents)
    assert 200_000 < sum(map(len, validation)) < 0.2 * sum(map(len, train))


def test_unknown_split_is_a_data_error():
    with pytest.raises(DataError, match="test"):
        load_builtin_documents("test")


def test_prose_filter_keeps_sentences_and_drops_code():
    assert is_prose("Return the number of items in the container, counting duplicates once.")
    assert not is_prose(">>> sorted([3, 1, 2])\n[1, 2, 3]")
    assert not is_prose("    for key, value in mapping.items():\n        print(key, value)")
    assert not is_prose("x = {'a': [1, 2], 'b': {3: 4}}; y = x['a'][0] ** 2")
