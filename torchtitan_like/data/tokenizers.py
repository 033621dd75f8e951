"""The tokenizer interface, the built-in byte-level tokenizer, and `build_tokenizer` that picks one.

A tokenizer maps text to integer ids and back and names its begin/end-of-sequence ids. Packing
(`packing.py`) frames every document as BOS + ids + EOS, so `encode_documents` is the hot path: the
byte tokenizer does it with numpy in one pass, the file-based tokenizers in batches.

The file-based tokenizers live in `hf_tokenizer.py` (tokenizer.json) and `tiktoken_tokenizer.py`
(Llama 3 tokenizer.model); they are imported only when chosen, so their packages stay optional.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from torchtitan_like.errors import DataError

BYTE_VOCAB = 256


class Tokenizer(ABC):
    """Text <-> ids. `vocab_size` counts every id the tokenizer can emit, special tokens included."""

    #: Short name of the implementation ("byte", "hf", "tiktoken"), recorded in shard metadata.
    kind: str = ""
    #: The file the tokenizer was read from; "" for the byte tokenizer.
    path: str = ""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @abstractmethod
    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` alone: no BOS/EOS, and special-token text is treated as plain text."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.encode_ordinary(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch_ordinary(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode_ordinary` of each text; implementations override this with a batched call."""
        return [self.encode_ordinary(text) for text in texts]

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        """One int64 array holding BOS + ids + EOS of each text, in order."""
        pieces = []
        for ids in self.encode_batch_ordinary(texts):
            pieces.append(np.asarray([self.bos_id, *ids, self.eos_id], dtype=np.int64))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)

    @property
    def identity(self) -> tuple:
        """What makes two tokenizers interchangeable; caches of tokenized text are keyed by it."""
        return (self.kind, self.path, self.vocab_size, self.bos_id, self.eos_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.identity == other.identity

    def __hash__(self) -> int:
        return hash(self.identity)

    def __repr__(self) -> str:
        where = f", path={self.path!r}" if self.path else ""
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}{where})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then BOS = 256 and EOS = 257: vocab 258, no files needed.

    Decoding drops the special ids and replaces invalid UTF-8 (e.g. a sample cut mid-character)
    with U+FFFD rather than failing.
    """

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB + 2

    @property
    def bos_id(self) -> int:
        return BYTE_VOCAB

    @property
    def eos_id(self) -> int:
        return BYTE_VOCAB + 1

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTE_VOCAB).decode("utf-8", errors="replace")

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        # Vectorized: several MB of text become ids in milliseconds instead of a Python loop per byte.
        bos = np.asarray([self.bos_id], dtype=np.int64)
        eos = np.asarray([self.eos_id], dtype=np.int64)
        pieces = []
        for text in texts:
            pieces += [bos, np.frombuffer(text.encode("utf-8"), dtype=np.uint8), eos]
        return np.concatenate(pieces, dtype=np.int64) if pieces else np.zeros(0, dtype=np.int64)


TOKENIZER_KINDS = ("auto", "byte", "hf", "tiktoken")
HF_FILE_NAME = "tokenizer.json"
TIKTOKEN_FILE_NAME = "tokenizer.model"


def build_tokenizer(model_config: Any) -> Tokenizer:
    """The tokenizer of `[model]`: `tokenizer` kind and `hf_assets_path` (or legacy `tokenizer_path`)."""
    path = model_config.hf_assets_path or model_config.tokenizer_path
    key = "model.hf_assets_path" if model_config.hf_assets_path else "model.tokenizer_path"
    try:
        return load_tokenizer(model_config.tokenizer, path)
    except DataError as error:
        if not path or key in str(error):
            raise
        raise DataError(f"{key} = {path!r}: {error}") from None


def load_tokenizer(kind: str, path: str = "") -> Tokenizer:
    """A tokenizer of `kind` from a local file or folder.

    "auto" picks byte for an empty path, hf when the path is or holds tokenizer.json, tiktoken when it
    is or holds tokenizer.model (also under `original/`, as Meta's Hugging Face repositories ship it).
    """
    if kind not in TOKENIZER_KINDS:
        raise DataError(f'unknown tokenizer kind "{kind}"; expected one of {", ".join(TOKENIZER_KINDS)}')
    if kind == "byte" or (kind == "auto" and not path):
        return ByteTokenizer()
    if not path:
        raise DataError(f'tokenizer "{kind}" needs a file: set model.hf_assets_path to a folder or file '
                        f"holding {HF_FILE_NAME if kind == 'hf' else TIKTOKEN_FILE_NAME}")
    if not Path(path).exists():
        raise DataError(f"tokenizer path {path} does not exist; expected a folder or a {HF_FILE_NAME} "
                        f"or {TIKTOKEN_FILE_NAME} file")
    if kind == "auto":
        kind, file = _detect_tokenizer_file(Path(path))
    else:
        file = _find_tokenizer_file(Path(path), HF_FILE_NAME if kind == "hf" else TIKTOKEN_FILE_NAME)
    if kind == "hf":
        from torchtitan_like.data.hf_tokenizer import HFTokenizer
        return HFTokenizer(str(file))
    from torchtitan_like.data.tiktoken_tokenizer import TiktokenTokenizer
    return TiktokenTokenizer(str(file))


def _candidate_files(path: Path, file_name: str) -> list[Path]:
    return [path / file_name, path / "original" / file_name]


def _find_tokenizer_file(path: Path, file_name: str) -> Path:
    if path.is_file():
        return path
    for candidate in _candidate_files(path, file_name):
        if candidate.is_file():
            return candidate
    raise DataError(f"no {file_name} in {path}; expected {path / file_name}")


def _detect_tokenizer_file(path: Path) -> tuple[str, Path]:
    if path.is_file():
        if path.suffix == ".json":
            return "hf", path
        if path.suffix == ".model":
            return "tiktoken", path
        raise DataError(f"cannot tell the tokenizer kind of {path}: expected a {HF_FILE_NAME} (Hugging Face) "
                        f"or {TIKTOKEN_FILE_NAME} (tiktoken) file, or set model.tokenizer explicitly")
    # tokenizer.json first: Meta's Llama 3 repositories hold both, and the HF file is the canonical one.
    for kind, file_name in (("hf", HF_FILE_NAME), ("tiktoken", TIKTOKEN_FILE_NAME)):
        for candidate in _candidate_files(path, file_name):
            if candidate.is_file():
                return kind, candidate
    raise DataError(f"no tokenizer in {path}: expected {path / HF_FILE_NAME} or {path / TIKTOKEN_FILE_NAME}")
