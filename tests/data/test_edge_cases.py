"""Data edge cases: vocabularies with unused ids, hidden folders, lone surrogates in JSON lines, missing
Hugging Face paths and prepare-data outputs (each test failed before its fix)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.data.conftest import make_job_config
from torchtitan_like.data import check_dataset_paths
from torchtitan_like.data.packing import encode_corpus
from torchtitan_like.data.prepare import main as prepare_main
from torchtitan_like.data.shards import ShardMetadata, load_token_shards
from torchtitan_like.data.sources import iter_documents, iter_huggingface_documents, resolve_corpus_files
from torchtitan_like.errors import DataError


def test_hf_vocab_size_is_one_past_the_highest_id_when_the_vocabulary_has_unused_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from torchtitan_like.data.hf_tokenizer import HFTokenizer

    # Five tokens, but "world" is id 70,000: counting tokens (5) would size the embedding too small
    # and pick uint16, which wraps 70,000 to 4,464.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 70_000}
    rust_tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    rust_tokenizer.save(str(tmp_path / "tokenizer.json"))
    tokenizer = HFTokenizer(str(tmp_path / "tokenizer.json"))
    assert tokenizer.vocab_size == 70_001
    tokens = encode_corpus(tokenizer, ["hello world"])
    assert tokens.tolist() == [1, 3, 70_000, 2]
    assert tokens.max() < tokenizer.vocab_size


def test_a_folder_skips_files_in_hidden_folders_as_a_glob_does(tmp_path):
    # Jupyter keeps a copy of every edited file in .ipynb_checkpoints/: reading it trains on it twice.
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "once"}) + "\n")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "data-checkpoint.jsonl").write_text(json.dumps({"text": "once"}) + "\n")
    assert list(iter_documents(str(tmp_path))) == ["once"]
    assert resolve_corpus_files(str(tmp_path)) == resolve_corpus_files(str(tmp_path / "**" / "*.jsonl"))
    # A hidden folder above the corpus is the user's choice, not a copy.
    hidden_parent = tmp_path / ".cache" / "corpus"
    hidden_parent.mkdir(parents=True)
    (hidden_parent / "doc.txt").write_text("kept")
    assert list(iter_documents(str(hidden_parent))) == ["kept"]


def test_a_lone_surrogate_in_json_lines_is_a_data_error_naming_file_and_line(tmp_path):
    # json.loads accepts "\ud83d" without its pair, but no tokenizer can encode it (UnicodeEncodeError).
    corpus = tmp_path / "scraped.jsonl"
    corpus.write_text('{"text": "fine \\ud83d\\ude00 pair"}\n{"text": "broken \\ud83d emoji"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{corpus}:2: .*lone surrogate \\ud83d at character 7"):
        list(iter_documents(str(corpus)))
    assert prepare_main(["--input", str(corpus), "--output", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize("relative", [False, True])
def test_a_missing_local_huggingface_path_is_a_data_error_naming_it(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    missing = "./missing_dataset" if relative else str(tmp_path / "missing_dataset")
    with pytest.raises(DataError, match=missing):
        list(iter_huggingface_documents(missing, "text", "train"))
    config = make_job_config(dataset="huggingface", dataset_path=missing)
    with pytest.raises(DataError, match=f"path {missing} does not exist"):
        check_dataset_paths(config)  # at start-up, before any process group


def test_prepare_writes_into_the_current_folder_and_refuses_a_file_as_output(tmp_path, monkeypatch, capsys):
    (tmp_path / "doc.txt").write_text("hi")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    assert prepare_main(["--input", str(tmp_path / "doc.txt"), "--output", "."]) == 0
    assert ShardMetadata.load(tmp_path / "out").splits["train"].num_tokens == 4
    assert np.array_equal(load_token_shards(tmp_path / "out", "train").read(0, 4), [256, ord("h"), ord("i"), 257])
    assert prepare_main(["--input", str(tmp_path / "doc.txt"), "--output", str(tmp_path / "doc.txt")]) == 2
    assert f"--output {tmp_path / 'doc.txt'} is a file" in capsys.readouterr().err
    assert (tmp_path / "doc.txt").read_text() == "hi"
