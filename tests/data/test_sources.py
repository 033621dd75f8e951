from __future__ import annotations

import json

import pytest

from torchtitan_like.data.sources import (iter_documents, iter_file_documents, iter_huggingface_documents,
                                          resolve_corpus_files)
from torchtitan_like.errors import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def test_txt_file_is_one_document_and_empty_files_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph, same document\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("")
    assert list(iter_documents(str(tmp_path))) == ["first paragraph\n\nsecond paragraph, same document\n"]


def test_jsonl_reads_the_text_field_and_skips_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n', encoding="utf-8")
    assert list(iter_documents(str(path), text_field="body")) == ["one", "two"]


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path):
    # JSON allows U+2028, U+2029 and U+0085 raw inside strings (json.dumps(ensure_ascii=False) writes
    # them); only "\n" ends a record.
    texts = ["one\u2028line", "two\u2029paragraphs\u0085next", "form\x0cfeed"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts), encoding="utf-8")
    assert list(iter_documents(str(path))) == texts


def test_torchtitan_c4_test_folder_of_json_lines_loads(tmp_path):
    # TorchTitan's c4_test folder holds data.json in JSON lines; suffixes match in any case.
    folder = tmp_path / "c4_test"
    folder.mkdir()
    write_jsonl(folder / "data.json", [{"text": "first"}, {"text": "second"}])
    write_jsonl(folder / "MORE.JSONL", [{"text": "third"}])
    assert list(iter_documents(str(folder))) == ["third", "first", "second"]


def test_parquet_reads_the_text_field(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as parquet

    path = tmp_path / "docs.parquet"
    parquet.write_table(pyarrow.table({"text": ["alpha", None, "beta"], "n": [1, 2, 3]}), path)
    assert list(iter_documents(str(path))) == ["alpha", "beta"]
    with pytest.raises(DataError, match=rf'{path}: no column "txt" \(did you mean "text"\?\)'):
        list(iter_documents(str(path), text_field="txt"))


def test_folders_are_recursive_and_sorted_globs_too(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "b" / "a.txt").write_text("a")
    (tmp_path / "c.txt").write_text("c")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "j1"}, {"text": "j2"}])
    (tmp_path / "notes.md").write_text("ignored in folders")
    assert list(iter_documents(str(tmp_path))) == ["j1", "j2", "a", "z", "c"]
    assert list(iter_documents(str(tmp_path / "**" / "*.txt"))) == ["a", "z", "c"]
    assert [path.name for path in resolve_corpus_files(str(tmp_path / "*.txt"))] == ["c.txt"]


def test_an_existing_path_with_glob_characters_in_its_name_is_that_path(tmp_path):
    # As a glob, "run[1]" means "run1": the folder named run[1] would not be found.
    folder = tmp_path / "run[1]"
    folder.mkdir()
    write_jsonl(folder / "data.jsonl", [{"text": "kept"}])
    (tmp_path / "run1").mkdir()
    write_jsonl(tmp_path / "run1" / "data.jsonl", [{"text": "other"}])
    assert list(iter_documents(str(folder))) == ["kept"]
    assert list(iter_documents(str(folder / "data.jsonl"))) == ["kept"]
    assert list(iter_documents(str(tmp_path / "run?" / "*.jsonl"))) == ["other"]  # still a glob


def test_missing_path_glob_without_matches_and_empty_folder_name_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "missing.txt")):
        resolve_corpus_files(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"glob .*\*\.jsonl matches no files"):
        resolve_corpus_files(str(tmp_path / "*.jsonl"))
    with pytest.raises(DataError, match=f"{tmp_path} holds no"):
        resolve_corpus_files(str(tmp_path))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported type .csv"):
        resolve_corpus_files(str(tmp_path / "data.csv"))


def test_non_utf8_txt_names_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path} is not UTF-8 text: byte 0xe9 at byte offset 3"):
        list(iter_documents(str(path)))


def test_bad_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        list(iter_documents(str(path)))


def test_missing_or_wrong_typed_text_field_names_file_line_and_fields(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl(path, [{"content": "hello", "id": 3}])
    with pytest.raises(DataError, match=rf'{path}:1: no field "text"; fields: content, id'):
        list(iter_documents(str(path)))
    write_jsonl(path, [{"text": 5}])
    with pytest.raises(DataError, match=rf'{path}:1: field "text" holds int'):
        list(iter_documents(str(path)))


def test_unreadable_file_is_a_data_error(tmp_path):
    not_a_file = tmp_path / "folder.txt"  # reading a folder fails like an unreadable file, even as root
    not_a_file.mkdir()
    with pytest.raises(DataError, match=f"cannot read corpus file {not_a_file}"):
        list(iter_file_documents(not_a_file))


def test_huggingface_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["first doc", "", "second doc"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_huggingface_documents(str(tmp_path / "ds"), "text", "train")) == ["first doc", "second doc"]
    with pytest.raises(DataError, match="no column"):
        list(iter_huggingface_documents(str(tmp_path / "ds"), "body", "train"))


def test_huggingface_missing_split_and_non_text_column_are_data_errors(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a doc"], "n": [1]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match='column "n" holds .*int64.*not text'):
        list(iter_huggingface_documents(str(tmp_path / "ds"), "n", "train"))
    # A folder of JSON lines that datasets.load_dataset reads (offline: a packaged builder).
    folder = tmp_path / "jsonl_folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": "from load_dataset"}])
    assert list(iter_huggingface_documents(str(folder), "text", "train")) == ["from load_dataset"]
    with pytest.raises(DataError, match=f'{folder} has no split "test"'):
        list(iter_huggingface_documents(str(folder), "text", "test"))


def test_huggingface_dataset_dict_split_feeds_the_loader(tmp_path):
    datasets = pytest.importorskip("datasets")
    from tests.data.conftest import make_job_config
    from torchtitan_like.data import build_dataloader
    from torchtitan_like.data.tokenizers import ByteTokenizer

    splits = {"train": datasets.Dataset.from_dict({"body": ["t" * 100]}),
              "validation": datasets.Dataset.from_dict({"body": ["v" * 100]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    config = make_job_config(dataset="huggingface", dataset_path=str(tmp_path / "dd"), dataset_text_field="body",
                             seq_len=8, local_batch_size=1)
    config.validation.dataset, config.validation.dataset_path, config.validation.local_batch_size = (
        "huggingface", str(tmp_path / "dd"), 1)
    inputs, _ = next(iter(build_dataloader(config, ByteTokenizer(), 0, 1)))
    assert set(inputs[0].tolist()) <= {ord("t"), 256, 257}
    inputs, _ = next(iter(build_dataloader(config, ByteTokenizer(), 0, 1, split="validation")))
    assert set(inputs[0].tolist()) <= {ord("v"), 256, 257}
    with pytest.raises(DataError, match='no split "test"'):
        list(iter_huggingface_documents(str(tmp_path / "dd"), "body", "test"))
