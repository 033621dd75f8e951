"""Reading user corpora: local .txt, .jsonl and .parquet files (a file, a folder or a glob), and
Hugging Face datasets.

Conventions:
- a `.txt` file is one document (its whole UTF-8 text);
- a `.jsonl` file holds one JSON object per line, the document in `text_field`; blank lines are skipped;
- a `.parquet` file holds one document per row in the column `text_field` (needs pyarrow);
- a folder is searched recursively for those suffixes, a glob may use `**`; files are read in sorted
  path order so every rank and every run sees the same document order; hidden files and folders
  (`.ipynb_checkpoints/` copies, ...) are skipped, as a glob skips them;
- empty documents (and null parquet cells) are skipped.
Every problem is a DataError naming the file, and the line or byte offset where one applies.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Iterator

from torchtitan_like.errors import DataError, did_you_mean

# .json is read as JSON lines (one object per line), as TorchTitan's c4_test folder holds it
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_GLOB_CHARACTERS = "*?["
_SURROGATE = re.compile(r"[\ud800-\udfff]")
PARQUET_BATCH_ROWS = 4096
HF_BATCH_ROWS = 1024


def resolve_corpus_files(path_spec: str) -> list[Path]:
    """The corpus files a path, folder or glob names, sorted; DataError when there are none."""
    if not path_spec:
        raise DataError("no corpus path given: set training.dataset_path (or validation.dataset_path) "
                        "to a file, folder or glob of .txt/.jsonl/.json/.parquet files")
    # An existing path is that path, even with glob characters in its name (`run[1]/data.jsonl`).
    if not Path(path_spec).exists() and any(character in path_spec for character in _GLOB_CHARACTERS):
        matches = sorted(Path(match) for match in glob.glob(path_spec, recursive=True) if Path(match).is_file())
        if not matches:
            raise DataError(f"the glob {path_spec} matches no files")
        unsupported = [str(match) for match in matches if _suffix(match) not in SUPPORTED_SUFFIXES]
        if unsupported:
            raise DataError(f"the glob {path_spec} matches files of unsupported type, e.g. {unsupported[0]}; "
                            f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
        return matches
    path = Path(path_spec)
    if not path.exists():
        raise DataError(f"corpus path {path} does not exist")
    if path.is_file():
        if _suffix(path) not in SUPPORTED_SUFFIXES:
            raise DataError(f"corpus file {path} has unsupported type {path.suffix or '(none)'}; "
                            f"supported: {', '.join(SUPPORTED_SUFFIXES)}")
        return [path]
    files = sorted(file for file in path.rglob("*")
                   if file.is_file() and _suffix(file) in SUPPORTED_SUFFIXES and not _is_hidden(file, path))
    if not files:
        raise DataError(f"corpus folder {path} holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
    return files


def _is_hidden(file: Path, folder: Path) -> bool:
    """A file under `folder` that is hidden or inside a hidden folder (`.ipynb_checkpoints/data.jsonl`
    is a copy of the data: reading it would train on those documents twice)."""
    return any(part.startswith(".") for part in file.relative_to(folder).parts)


def iter_documents(path_spec: str, text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of the corpus at `path_spec`, file by file in sorted order."""
    for file in resolve_corpus_files(path_spec):
        yield from iter_file_documents(file, text_field)


def _suffix(file: Path) -> str:
    return file.suffix.lower()  # DATA.JSONL is JSON lines too


def iter_file_documents(file: Path, text_field: str = "text") -> Iterator[str]:
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_parquet}
    if _suffix(file) not in readers:
        raise DataError(f"corpus file {file} has unsupported type; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    for document in readers[_suffix(file)](file, text_field):
        if document:
            yield document


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read corpus file {file}: {error.strerror or error}") from error


def _read_txt(file: Path, text_field: str) -> Iterator[str]:
    data = _read_bytes(file)
    try:
        yield data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{file} is not UTF-8 text: byte 0x{data[error.start]:02x} at byte offset {error.start} "
                        f"cannot be decoded ({error.reason}); convert the file to UTF-8") from None


def _read_jsonl(file: Path, text_field: str) -> Iterator[str]:
    try:
        # Split on "\n" only: JSON strings may hold U+2028, U+0085 and the like raw, which
        # str.splitlines() would also cut at.
        lines = _read_bytes(file).decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{file} is not UTF-8 text: undecodable byte at byte offset {error.start}") from None
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{file}:{line_number}: not valid JSON ({error.msg} at column {error.colno})") from None
        yield _text_of(record, text_field, f"{file}:{line_number}")


def _text_of(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a \"{text_field}\" field, got {type(record).__name__}")
    if text_field not in record:
        raise DataError(f'{where}: no field "{text_field}"{did_you_mean(text_field, record)}; fields: '
                        f"{', '.join(map(str, record)) or '(none)'}; set training.dataset_text_field")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise DataError(f'{where}: field "{text_field}" holds {type(text).__name__}, expected a string')
    # JSON may escape a lone UTF-16 surrogate ("\ud83d" without its pair): no tokenizer can encode it.
    surrogate = None if text.isascii() else _SURROGATE.search(text)
    if surrogate:
        raise DataError(f'{where}: field "{text_field}" holds a lone surrogate \\u{ord(surrogate.group()):04x} at '
                        f"character {surrogate.start()}, which is not valid Unicode; fix or drop the record")
    return text


def _read_parquet(file: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError(f"reading {file} needs pyarrow: pip install pyarrow") from None
    try:
        parquet_file = parquet.ParquetFile(file)
    except Exception as error:  # pyarrow raises ArrowInvalid/OSError variants for damaged files
        raise DataError(f"{file} is not a readable parquet file: {error}") from None
    columns = parquet_file.schema_arrow.names
    if text_field not in columns:
        raise DataError(f'{file}: no column "{text_field}"{did_you_mean(text_field, columns)}; columns: '
                        f"{', '.join(columns)}; set training.dataset_text_field")
    for batch in parquet_file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f'{file}: column "{text_field}" holds {type(text).__name__}, expected strings')
            yield text or ""


def check_huggingface_path(name_or_path: str) -> None:
    """DataError when `name_or_path` is empty, or is a local path (it starts with / or ., or has more
    than the one slash of a Hub name "owner/name") that does not exist; cheap, no `datasets` import."""
    if not name_or_path:
        raise DataError('dataset "huggingface" needs dataset_path: a dataset name or a save_to_disk folder')
    looks_local = name_or_path.startswith(("/", ".")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).exists():
        raise DataError(f'dataset "huggingface" path {name_or_path} does not exist; expected a save_to_disk '
                        f"folder, a data folder or a Hub dataset name")


def iter_huggingface_documents(name_or_path: str, text_field: str, split: str) -> Iterator[str]:
    """Documents of a Hugging Face dataset: a folder written by `save_to_disk`, or a name/path that
    `datasets.load_dataset` understands (which may use the network or the HF cache; that is the
    user's choice when they name a hub dataset)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f'dataset "huggingface" ({name_or_path}) needs the datasets package: pip install datasets; '
                        f'or export it to .jsonl/.parquet and use dataset "local"') from None
    check_huggingface_path(name_or_path)
    if Path(name_or_path).is_dir() and ((Path(name_or_path) / "dataset_info.json").exists()
                                        or (Path(name_or_path) / "dataset_dict.json").exists()):
        dataset = datasets.load_from_disk(name_or_path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{name_or_path} has no split \"{split}\"; splits: {', '.join(dataset)}")
            dataset = dataset[split]
    else:
        try:
            dataset = datasets.load_dataset(name_or_path, split=split)
        except FileNotFoundError as error:  # also datasets' DatasetNotFoundError (no such dataset on the Hub)
            raise DataError(f'dataset "huggingface" {name_or_path} not found: {error}') from None
        except ValueError as error:  # datasets: 'Unknown split "x". Should be one of [...]'
            if "split" not in str(error).lower():
                raise
            raise DataError(f"{name_or_path} has no split \"{split}\": {error}") from None
    if text_field not in dataset.column_names:
        raise DataError(f'{name_or_path}: no column "{text_field}"{did_you_mean(text_field, dataset.column_names)}; '
                        f"columns: {', '.join(dataset.column_names)}; set training.dataset_text_field")
    feature = dataset.features.get(text_field)
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f'{name_or_path}: column "{text_field}" holds {feature}, not text; '
                        f"set training.dataset_text_field to a string column")
    # Batched iteration over the one column keeps memory flat on datasets larger than RAM.
    for batch in dataset.select_columns([text_field]).iter(batch_size=HF_BATCH_ROWS):
        for text in batch[text_field]:
            if text:
                yield text
