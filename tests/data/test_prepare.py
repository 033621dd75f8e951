from __future__ import annotations

import base64
import itertools
import json

import numpy as np
import torch

from tests.data.conftest import make_job_config
from tests.helpers import FileOnAFullDisk
from torchtitan_like.config import validate_config
from torchtitan_like.data import build_dataloader
from torchtitan_like.data.prepare import main
from torchtitan_like.data.shards import ShardMetadata, load_token_shards
from torchtitan_like.data.tokenizers import ByteTokenizer, load_tokenizer
from torchtitan_like.models.llama3 import get_flavor

DOCUMENTS = [f"Document number {index}: naïve prose, repeated {'la ' * index}." for index in range(40)]


def write_corpus(folder):
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCUMENTS[:25]), encoding="utf-8")
    for index, document in enumerate(DOCUMENTS[25:]):
        (folder / f"b{index:02d}.txt").write_text(document, encoding="utf-8")
    return folder


def split_documents(tokens, tokenizer):
    """Invert packing: cut the stream at BOS/EOS and decode each document."""
    documents, current = [], None
    for token in tokens.tolist():
        if token == tokenizer.bos_id:
            current = []
        elif token == tokenizer.eos_id:
            documents.append(tokenizer.decode(current))
        else:
            current.append(token)
    return documents


def test_shards_decode_back_to_the_original_documents(tmp_path, capsys):
    corpus, output = write_corpus(tmp_path / "corpus"), tmp_path / "tokens"
    assert main(["--input", str(corpus), "--output", str(output), "--text-field", "body", "--shard-tokens", "500"]) == 0
    assert "train: 40 documents" in capsys.readouterr().out
    metadata = ShardMetadata.load(output)
    assert metadata.dtype == "uint16" and metadata.vocab_size == 258 and metadata.tokenizer_kind == "byte"
    shards = metadata.splits["train"].shards
    assert len(shards) > 2 and all(shard.num_tokens == 500 for shard in shards[:-1])
    assert "validation" not in metadata.splits
    tokens = load_token_shards(output, "train", ByteTokenizer())
    assert split_documents(tokens.read(0, len(tokens)), ByteTokenizer()) == DOCUMENTS


def test_validation_fraction_holds_out_an_even_deterministic_share(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    main(["--input", str(corpus), "--output", str(tmp_path / "out"), "--text-field", "body",
          "--validation-fraction", "0.1"])
    validation = load_token_shards(tmp_path / "out", "validation")
    held_out = split_documents(validation.read(0, len(validation)), ByteTokenizer())
    assert held_out == [DOCUMENTS[index] for index in range(9, 40, 10)]
    train = load_token_shards(tmp_path / "out", "train")
    assert len(split_documents(train.read(0, len(train)), ByteTokenizer())) == 36


def test_uint32_is_chosen_when_the_vocabulary_exceeds_uint16(tmp_path):
    # 256 single bytes plus 65,300 two-byte tokens: 65,556 ranks + 256 specials > 65,536 ids.
    two_byte_tokens = (bytes(pair) for pair in itertools.product(range(256), repeat=2))
    tokens = [bytes([value]) for value in range(256)] + list(itertools.islice(two_byte_tokens, 65_300))
    model = tmp_path / "tokenizer.model"
    model.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    (tmp_path / "doc.txt").write_text("plain text")
    main(["--input", str(tmp_path / "doc.txt"), "--output", str(tmp_path / "out"), "--tokenizer-path", str(model)])
    metadata = ShardMetadata.load(tmp_path / "out")
    tokenizer = load_tokenizer("tiktoken", str(model))
    assert metadata.dtype == "uint32" and metadata.vocab_size == tokenizer.vocab_size == 65_812
    stream = load_token_shards(tmp_path / "out", "train", tokenizer)
    assert stream.read(0, len(stream)).tolist()[0] == tokenizer.bos_id == 65_556
    assert split_documents(stream.read(0, len(stream)), tokenizer) == ["plain text"]


def test_tokenized_loader_gives_the_same_batches_as_the_in_memory_builtin_path(tmp_path):
    assert main(["--input", "builtin", "--output", str(tmp_path / "out"), "--shard-tokens", "300000"]) == 0
    tokenizer = ByteTokenizer()
    model_args = get_flavor("debugmodel")
    model_args.vocab_size = tokenizer.vocab_size
    for split in ("train", "validation"):
        in_memory = make_job_config(seq_len=128, local_batch_size=4, seed=3)
        tokenized = make_job_config(seq_len=128, local_batch_size=4, seed=3, dataset="tokenized",
                                    dataset_path=str(tmp_path / "out"))
        tokenized.validation.dataset = "tokenized"  # its path defaults to training.dataset_path
        tokenized.validation.enable = True
        validate_config(tokenized, model_args)  # the trainer's start-up checks accept that default
        memory_batches = itertools.islice(build_dataloader(in_memory, tokenizer, 1, 2, split), 6)
        shard_batches = itertools.islice(build_dataloader(tokenized, tokenizer, 1, 2, split), 6)
        for (inputs, labels), (shard_inputs, shard_labels) in zip(memory_batches, shard_batches, strict=True):
            assert torch.equal(inputs, shard_inputs) and torch.equal(labels, shard_labels)


def test_bad_input_exits_with_code_2_and_names_the_path(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    assert main(["--input", str(missing), "--output", str(tmp_path / "out")]) == 2
    assert f"error: corpus path {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metadata.json").exists()


def test_tokenizer_kind_without_its_file_names_the_prepare_option(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as usage_error:
        main(["--input", "builtin", "--output", str(tmp_path / "out"), "--tokenizer", "hf"])
    assert usage_error.value.code == 2
    assert "--tokenizer hf needs --tokenizer-path" in capsys.readouterr().err  # not model.hf_assets_path


def test_a_failed_run_leaves_the_dataset_already_in_output_intact(tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["--input", str(write_corpus(tmp_path / "corpus")), "--output", str(output), "--text-field", "body"]) == 0
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    assert main(["--input", str(tmp_path / "typo"), "--output", str(output)]) == 2  # a wrong path
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n', encoding="utf-8")
    assert main(["--input", str(bad), "--output", str(output)]) == 2  # bad data, found mid-way
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert not (tmp_path / "out.partial").exists()


def test_a_disk_that_fills_up_exits_2_naming_the_shard_and_leaves_the_dataset_in_output_intact(
        tmp_path, capsys, monkeypatch):
    from torchtitan_like import filesystem

    output, corpus = tmp_path / "out", write_corpus(tmp_path / "corpus")
    assert main(["--input", str(corpus), "--output", str(output), "--text-field", "body"]) == 0
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    capsys.readouterr()
    room = {"bytes": 1000}  # the first shard of 300 uint16 tokens fits, the second does not
    monkeypatch.setattr(filesystem, "open", lambda path, mode: FileOnAFullDisk(open(path, mode), room),
                        raising=False)
    assert main(["--input", str(corpus), "--output", str(output), "--text-field", "body",
                 "--shard-tokens", "300"]) == 2
    error = capsys.readouterr().err  # before: an OSError traceback naming no file, exit code 1
    assert (f"error: prepare-data failed: {tmp_path / 'out.partial' / 'train_00001.bin'}: No space left on device "
            f"(ENOSPC); ") in error
    assert " free of " in error and f"The partial output out.partial was removed; {output} was not changed" in error
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert not (tmp_path / "out.partial").exists()


def test_metadata_of_another_format_version_and_fraction_with_builtin_are_refused(tmp_path, capsys):
    import pytest

    from torchtitan_like.errors import DataError

    assert main(["--input", "builtin", "--output", str(tmp_path / "out"), "--shard-tokens", "300000"]) == 0
    metadata_path = tmp_path / "out" / "metadata.json"
    raw = json.loads(metadata_path.read_text())
    metadata_path.write_text(json.dumps({**raw, "format_version": raw["format_version"] + 1}))
    with pytest.raises(DataError, match="format_version 2, but this version reads 1"):
        ShardMetadata.load(tmp_path / "out")
    with pytest.raises(SystemExit):  # builtin has its own split: the fraction would be ignored
        main(["--input", "builtin", "--output", str(tmp_path / "other"), "--validation-fraction", "0.1"])
    assert "does not apply to --input builtin" in capsys.readouterr().err


def test_shard_bytes_are_little_endian_arrays_of_the_metadata_dtype(tmp_path):
    (tmp_path / "doc.txt").write_text("hi")
    main(["--input", str(tmp_path / "doc.txt"), "--output", str(tmp_path / "out")])
    raw = np.fromfile(tmp_path / "out" / "train_00000.bin", dtype="<u2")
    assert raw.tolist() == [256, ord("h"), ord("i"), 257]


def test_progress_falls_back_to_plain_stderr_lines_without_tqdm(monkeypatch, capsys):
    import sys

    from torchtitan_like.data.prepare import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `from tqdm import tqdm` raise ImportError
    progress = Progress()
    progress._last_print = 0.0
    progress.update(documents=3, tokens=1234)
    progress.close()
    assert "tokenizing: 3 documents, 1,234 tokens" in capsys.readouterr().err
