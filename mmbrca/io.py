"""Small file helpers: atomic writes and table reading with errors that name the file."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from mmbrca.errors import UserError

_TEXT_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file: on any exception the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the final file the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh hidden directory beside `final`, removed afterwards unless moved away.

    Build a whole output directory inside it and `os.rename` it onto `final` at the end, so an
    error half-way never leaves a partial directory behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(staged: Path, final: Path) -> None:
    """Move a staged directory onto `final`, which must be absent or an empty directory."""
    if final.is_dir() and not any(final.iterdir()):
        final.rmdir()
    os.rename(staged, final)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def table_format(path: Path) -> str:
    """'parquet', ',' or '\\t' from a file name (compression suffixes such as .gz are skipped)."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in {".gz", ".bz2", ".xz", ".zip"}]
    last = suffixes[-1] if suffixes else ""
    if last in {".parquet", ".pq"}:
        return "parquet"
    if last in _TEXT_SEPARATORS:
        return _TEXT_SEPARATORS[last]
    raise UserError(f"{path}: unknown table format {last or '(no extension)'!r}; use .csv, .tsv, .txt or .parquet")


def read_table(path: str | os.PathLike, *, what: str, **csv_options) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet table; a missing or unreadable file is a UserError naming it.

    `csv_options` go to `pandas.read_csv` for text tables and are ignored for Parquet.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    fmt = table_format(path)
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, sep=fmt, **csv_options)
    except UserError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read {what} file: {first_line}") from exc


def read_yaml_mapping(path: str | os.PathLike, *, what: str) -> tuple[str, dict]:
    """The text and parsed mapping of a YAML file; a missing, invalid or non-mapping file is a UserError."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read {what} file: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{path}: a {what} file must be a mapping")
    return text, data
