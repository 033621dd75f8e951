"""Binary token shards written by `prepare-data` and read back through memory maps (the fast path).

A prepared folder holds `metadata.json` and raw little-endian arrays `<split>_<index>.bin` of the
dtype the metadata names (uint16 when the vocabulary fits, else uint32). The metadata records the
tokenizer (kind, path, vocab size, BOS/EOS ids) and, per shard, its token count, byte size and
SHA-256. Loading checks sizes (cheap) and, on request, checksums (reads every byte), and refuses a
folder tokenized with a different vocabulary than the configured tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from torchtitan_like.data.packing import TokenStream
from torchtitan_like.data.tokenizers import Tokenizer
from torchtitan_like.errors import DataError
from torchtitan_like.filesystem import write_bytes

METADATA_FILE = "metadata.json"
FORMAT_VERSION = 1
SUPPORTED_DTYPES = ("uint16", "uint32")


@dataclass
class ShardInfo:
    file: str
    num_tokens: int
    num_bytes: int
    sha256: str


@dataclass
class SplitInfo:
    num_tokens: int = 0
    num_documents: int = 0
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class ShardMetadata:
    dtype: str
    vocab_size: int
    bos_id: int
    eos_id: int
    tokenizer_kind: str
    tokenizer_path: str
    source: str = ""
    text_field: str = "text"
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def save(self, folder: Path) -> None:
        write_bytes(folder / METADATA_FILE, (json.dumps(asdict(self), indent=2) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, folder: Path) -> "ShardMetadata":
        path = folder / METADATA_FILE
        if not folder.is_dir():
            raise DataError(f"tokenized dataset folder {folder} does not exist; create it with "
                            f"python -m torchtitan_like.data.prepare --input CORPUS --output {folder}")
        if not path.is_file():
            raise DataError(f"{path} is missing: {folder} is not a prepare-data output folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            splits = {name: SplitInfo(split["num_tokens"], split["num_documents"],
                                      [ShardInfo(**shard) for shard in split["shards"]])
                      for name, split in raw.pop("splits").items()}
            metadata = cls(**raw, splits=splits)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise DataError(f"{path} is not valid prepare-data metadata: {error!r}") from None
        if metadata.format_version != FORMAT_VERSION:
            raise DataError(f"{path}: format_version {metadata.format_version}, but this version reads "
                            f"{FORMAT_VERSION}; re-run prepare-data on the corpus")
        if metadata.dtype not in SUPPORTED_DTYPES:
            raise DataError(f'{path}: dtype "{metadata.dtype}" is not one of {", ".join(SUPPORTED_DTYPES)}')
        return metadata


class ShardWriter:
    """Appends token arrays of one split and cuts them into shards of `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, np.dtype(dtype), shard_tokens
        self.info = SplitInfo()
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add_document_tokens(self, tokens: np.ndarray, num_documents: int) -> None:
        self._pending.append(tokens.astype(self.dtype, copy=False))
        self._pending_tokens += len(tokens)
        self.info.num_documents += num_documents
        while self._pending_tokens >= self.shard_tokens:
            buffer = np.concatenate(self._pending)
            self._write_shard(buffer[: self.shard_tokens])
            rest = buffer[self.shard_tokens:]
            self._pending, self._pending_tokens = [rest], len(rest)

    def close(self) -> SplitInfo:
        if self._pending_tokens:
            self._write_shard(np.concatenate(self._pending))
        self._pending, self._pending_tokens = [], 0
        return self.info

    def _write_shard(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.info.shards):05d}.bin"
        data = tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
        write_bytes(self.folder / name, data)
        self.info.shards.append(ShardInfo(name, len(tokens), len(data), hashlib.sha256(data).hexdigest()))
        self.info.num_tokens += len(tokens)


def check_tokenizer_matches(metadata: ShardMetadata, folder: Path, tokenizer: Tokenizer) -> None:
    """A model trained on ids of another vocabulary would learn garbage; refuse the mismatch."""
    expected = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    found = (metadata.vocab_size, metadata.bos_id, metadata.eos_id)
    if expected != found:
        raise DataError(f"{folder} was tokenized with {metadata.tokenizer_kind} tokenizer "
                        f"{metadata.tokenizer_path or '(built-in)'} (vocab_size={found[0]}, bos={found[1]}, "
                        f"eos={found[2]}) but the configured tokenizer is {tokenizer!r}; set the same tokenizer "
                        f"in [model] or re-run prepare-data with it")


# Shards whose SHA-256 this process has checked, by (path, size, mtime): the start-up check
# (startup.py) and the loader both verify, and a second read of every byte would double the cost.
_VERIFIED_SHARDS: set[tuple[str, int, int]] = set()


def check_token_shards(folder: str | Path, split: str, tokenizer: Tokenizer | None = None,
                       verify_checksums: bool = False) -> tuple[np.dtype, list[tuple[Path, int]]]:
    """Every check of `split` in a prepare-data folder that needs no token read (metadata, tokenizer,
    split present, shard sizes) and, on request, the checksums; returns the shards' dtype and
    (path, token count) of each. Cheap enough for the start-up checks, which run it before any
    process group exists so that a mistake stops the run once (--check-config)."""
    folder = Path(folder)
    metadata = ShardMetadata.load(folder)
    if tokenizer is not None:
        check_tokenizer_matches(metadata, folder, tokenizer)
    if split not in metadata.splits:
        raise DataError(f'{folder} has no "{split}" split (it has: {", ".join(metadata.splits) or "none"}); '
                        f"re-run prepare-data with --validation-fraction > 0 for a validation split")
    dtype = np.dtype(metadata.dtype).newbyteorder("<")
    shards = []
    for shard in metadata.splits[split].shards:
        path = folder / shard.file
        if not path.is_file():
            raise DataError(f"shard {path} listed in {folder / METADATA_FILE} is missing")
        stat = path.stat()
        if stat.st_size != shard.num_bytes or stat.st_size != shard.num_tokens * dtype.itemsize:
            raise DataError(f"shard {path} has {stat.st_size} bytes but the metadata expects {shard.num_tokens} "
                            f"{metadata.dtype} tokens = {shard.num_tokens * dtype.itemsize} bytes; the shard is "
                            f"truncated or of another dtype: re-run prepare-data")
        identity = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if verify_checksums and identity not in _VERIFIED_SHARDS:
            if hashlib.sha256(path.read_bytes()).hexdigest() != shard.sha256:
                raise DataError(f"shard {path} does not match its SHA-256 in the metadata; re-run prepare-data")
            _VERIFIED_SHARDS.add(identity)
        shards.append((path, shard.num_tokens))
    return dtype, shards


def load_token_shards(folder: str | Path, split: str, tokenizer: Tokenizer | None = None,
                      verify_checksums: bool = False) -> TokenStream:
    """The tokens of `split` in a prepare-data folder, memory-mapped shard by shard."""
    dtype, shards = check_token_shards(folder, split, tokenizer, verify_checksums)
    return TokenStream([np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))
                        for path, num_tokens in shards if num_tokens])
