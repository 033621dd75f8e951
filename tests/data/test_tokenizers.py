from __future__ import annotations

import numpy as np
import pytest

from tests.data.conftest import SENTENCES, TIKTOKEN_MERGES
from torchtitan_like.config.job_config import Model
from torchtitan_like.data.tokenizers import ByteTokenizer, build_tokenizer, load_tokenizer
from torchtitan_like.errors import DataError

TEXT = "Hello, wörld! Ünïcödé — 日本語 🙂\nsecond line"


def test_byte_tokenizer_round_trips_non_ascii_text_and_frames_with_bos_eos():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(TEXT, bos=True, eos=True)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (258, 256, 257)
    assert ids[0] == 256 and ids[-1] == 257
    assert ids[1:-1] == list(TEXT.encode("utf-8"))
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.encode(TEXT, bos=False, eos=False) == ids[1:-1]


def test_byte_tokenizer_vectorized_documents_match_encode():
    tokenizer = ByteTokenizer()
    documents = [TEXT, "", "abc"]
    expected = [i for document in documents for i in tokenizer.encode(document, bos=True, eos=True)]
    assert tokenizer.encode_documents(documents).tolist() == expected


def test_hf_tokenizer_round_trips_and_finds_bos_eos_by_common_names(hf_tokenizer_file):
    tokenizer = load_tokenizer("hf", str(hf_tokenizer_file))
    assert tokenizer.bos_id == tokenizer._tokenizer.token_to_id("<s>")
    assert tokenizer.eos_id == tokenizer._tokenizer.token_to_id("</s>")
    assert tokenizer.vocab_size == tokenizer._tokenizer.get_vocab_size(with_added_tokens=True)
    for text in SENTENCES[:3] + [TEXT]:
        ids = tokenizer.encode(text, bos=True, eos=True)
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        assert tokenizer.decode(ids) == text
    # Merges learned on SENTENCES make them shorter than their bytes: the BPE model is really used.
    assert len(tokenizer.encode(SENTENCES[0], bos=False, eos=False)) < len(SENTENCES[0]) - 10
    documents = tokenizer.encode_documents(SENTENCES[:2]).tolist()
    assert documents == sum((tokenizer.encode(s, bos=True, eos=True) for s in SENTENCES[:2]), [])
    # Special-token text in a document is ordinary text, never the control ids (in batches too).
    text = "markup: <s>bold</s> end"
    for ids in (tokenizer.encode(text, bos=False, eos=False), tokenizer.encode_batch_ordinary([text])[0]):
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids
        assert tokenizer.decode(ids) == text


def test_hf_tokenizer_config_names_bos_and_eos(hf_tokenizer_file, tmp_path):
    folder = tmp_path / "assets"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(hf_tokenizer_file.read_bytes())
    (folder / "tokenizer_config.json").write_text('{"bos_token": {"content": "</s>"}, "eos_token": "<s>"}')
    tokenizer = load_tokenizer("auto", str(folder))
    assert tokenizer.kind == "hf"
    assert (tokenizer.bos_id, tokenizer.eos_id) == (tokenizer._tokenizer.token_to_id("</s>"),
                                                    tokenizer._tokenizer.token_to_id("<s>"))


def test_hf_tokenizer_without_bos_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=280, show_progress=False))
    raw.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="BOS token.*tokenizer_config.json"):
        load_tokenizer("hf", str(tmp_path))


def test_tiktoken_round_trips_and_places_llama3_specials_after_ranks(tiktoken_file):
    tokenizer = load_tokenizer("tiktoken", str(tiktoken_file))
    num_ranks = 256 + len(TIKTOKEN_MERGES)
    assert tokenizer.bos_id == num_ranks and tokenizer.eos_id == num_ranks + 1
    assert tokenizer.special_tokens["<|eot_id|>"] == num_ranks + 9
    assert tokenizer.vocab_size == num_ranks + 256
    ids = tokenizer.encode("the then there", bos=True, eos=True)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert 256 + TIKTOKEN_MERGES.index(b"the") in ids  # merges apply
    assert tokenizer.decode(ids[1:-1]) == "the then there"
    assert tokenizer.decode(tokenizer.encode(TEXT, bos=False, eos=False)) == TEXT
    # Special-token text in a document is ordinary text, never the control id.
    assert tokenizer.bos_id not in tokenizer.encode("<|begin_of_text|>", bos=False, eos=False)
    # Decoding drops the control tokens, as the other tokenizers do (generation stops on EOS).
    assert tokenizer.decode(tokenizer.encode("the end", bos=True, eos=True)) == "the end"


def test_tiktoken_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(DataError, match=rf"{path}:2"):
        load_tokenizer("tiktoken", str(path))


def test_auto_picks_byte_for_empty_path_hf_for_json_tiktoken_for_model(hf_tokenizer_file, tiktoken_file):
    assert build_tokenizer(Model()).kind == "byte"
    assert build_tokenizer(Model(hf_assets_path=str(hf_tokenizer_file.parent))).kind == "hf"
    assert build_tokenizer(Model(hf_assets_path=str(hf_tokenizer_file))).kind == "hf"
    assert build_tokenizer(Model(tokenizer_path=str(tiktoken_file.parent))).kind == "tiktoken"
    assert build_tokenizer(Model(hf_assets_path=str(tiktoken_file))).kind == "tiktoken"
    assert build_tokenizer(Model(tokenizer="byte", hf_assets_path=str(tiktoken_file))).kind == "byte"


@pytest.mark.parametrize("kind", ["auto", "hf", "tiktoken"])
def test_missing_tokenizer_path_is_a_data_error_naming_it(kind, tmp_path):
    missing = tmp_path / "no_such_assets"
    with pytest.raises(DataError, match=str(missing)):
        load_tokenizer(kind, str(missing))


def test_folder_without_tokenizer_files_names_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer("auto", str(tmp_path))
    with pytest.raises(DataError, match="tokenizer.model"):
        load_tokenizer("tiktoken", str(tmp_path))


def test_unreadable_tokenizer_json_is_a_data_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("{ not json")
    with pytest.raises(DataError, match=str(path)):
        load_tokenizer("auto", str(path))


def test_equal_tokenizers_hash_equal_so_caches_share_them(tiktoken_file):
    assert ByteTokenizer() == ByteTokenizer() and hash(ByteTokenizer()) == hash(ByteTokenizer())
    assert load_tokenizer("tiktoken", str(tiktoken_file)) != ByteTokenizer()
    assert np.array_equal(ByteTokenizer().encode_documents([]), np.zeros(0))
