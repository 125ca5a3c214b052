"""MovieLens-100K: fetch the raw files into a local cache once, load them as InteractionData.

Where the files come from, in order:

1. the cache folder (``cache_dir``, else ``$RAYBC_DATA_CACHE/ml-100k``, else ``~/.cache/raybc/ml-100k``);
2. the GroupLens archive (``u.data``, ``u.item``, ``u.user``), with a short timeout;
3. the copy inside the RecBole 1.2.1 wheel on PyPI (``ml-100k.inter``/``.item``/``.user``, RecBole's
   atomic format with typed headers), fetched with ``pip download`` of this interpreter.

Both layouts load to the same data: 943 users, 1682 items, 100,000 ratings. Item attributes are
the genres ("genre=Comedy") and the release decade ("year=1990s", "year=unknown"). Ids are
MovieLens' own user_id / item_id (int64). The raw files are never committed to the repository.

This module does not split the data into versions (see ``slicing``).
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from raybc.data.interactions import InteractionData, build_interactions
from raybc.errors import InputDataError, StorageError

log = logging.getLogger(__name__)

NAME = "movielens-100k"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# Short: an unreachable host (no internet, only a package index) should cost seconds, not minutes.
GROUPLENS_TIMEOUT_S = 10.0
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"
# pip download of a ~2 MB wheel; generous for slow mirrors, bounded so a hung index fails clearly.
PIP_TIMEOUT_S = 300.0
CACHE_ENV = "RAYBC_DATA_CACHE"

GROUPLENS_FILES = ("u.data", "u.item", "u.user")
RECBOLE_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
# u.item's 19 genre flags, in the order of GroupLens' u.genre.
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
UNKNOWN_YEAR = "year=unknown"
_YEAR = re.compile(r"(1[89]\d\d|20\d\d)")


def default_cache_dir() -> Path:
    """``$RAYBC_DATA_CACHE/ml-100k`` when set, else ``~/.cache/raybc/ml-100k``."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "raybc") / "ml-100k"


def _cached_layout(folder: Path) -> str | None:
    if all((folder / f).is_file() for f in GROUPLENS_FILES[:2]):
        return "grouplens"
    if all((folder / f).is_file() for f in RECBOLE_FILES[:2]):
        return "recbole"
    return None


def fetch_movielens_100k(cache_dir: str | Path | None = None) -> Path:
    """Make sure the raw files are in the cache (downloading once); return the folder."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _cached_layout(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    problems = []
    try:
        _fetch_grouplens(folder)
        return folder
    except Exception as exc:  # any failure here just means "try the next source"
        problems.append(f"GroupLens archive {GROUPLENS_URL}: {exc}")
        log.info("MovieLens-100K: GroupLens unreachable (%s); trying the RecBole wheel on PyPI", exc)
    try:
        _fetch_recbole(folder)
        return folder
    except Exception as exc:
        problems.append(f"{RECBOLE_REQUIREMENT} wheel via pip download: {exc}")
    raise StorageError(
        "could not fetch MovieLens-100K:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + f"\nput u.data, u.item, u.user (GroupLens) or {', '.join(RECBOLE_FILES)} (RecBole) into {folder} by hand"
    )


def _put(folder: Path, name: str, data: bytes) -> None:
    """Write one raw file atomically, so a crash never leaves a truncated file that looks cached."""
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)


def _fetch_grouplens(folder: Path) -> None:
    with urllib.request.urlopen(GROUPLENS_URL, timeout=GROUPLENS_TIMEOUT_S) as resp:
        payload = resp.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as zf:
        # The data files first, u.item last: its presence marks the layout as complete.
        for name in ("u.user", "u.data", "u.item"):
            _put(folder, name, zf.read(f"ml-100k/{name}"))


def _fetch_recbole(folder: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="raybc-recbole-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", RECBOLE_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}): {' | '.join(tail)}")
        with zipfile.ZipFile(wheels[0]) as zf:
            for name in ("ml-100k.user", "ml-100k.inter", "ml-100k.item"):
                _put(folder, name, zf.read(RECBOLE_PREFIX + name))


def year_bucket(text: str) -> str:
    """'1995' or '01-Jan-1995' -> 'year=1990s'; anything without a year -> 'year=unknown'."""
    m = _YEAR.search(text or "")
    return f"year={int(m.group(1)) // 10 * 10}s" if m else UNKNOWN_YEAR


def load_movielens_100k(cache_dir: str | Path | None = None) -> InteractionData:
    """MovieLens-100K as InteractionData (fetched into the cache on first use)."""
    folder = fetch_movielens_100k(cache_dir)
    return read_movielens_folder(folder)


def read_movielens_folder(folder: str | Path) -> InteractionData:
    """Load the raw files already in ``folder`` (GroupLens or RecBole layout)."""
    folder = Path(folder)
    layout = _cached_layout(folder)
    if layout == "grouplens":
        edges = _read_grouplens_ratings(folder / "u.data")
        attrs = _read_grouplens_items(folder / "u.item")
    elif layout == "recbole":
        edges = _read_recbole_ratings(folder / "ml-100k.inter")
        attrs = _read_recbole_items(folder / "ml-100k.item")
    else:
        raise InputDataError(f"{folder}: no MovieLens-100K files (u.data + u.item, or ml-100k.inter + ml-100k.item); run fetch_movielens_100k")
    user, item, rating, ts = edges
    unknown = set(item.tolist()) - set(attrs)
    if unknown:
        raise InputDataError(f"{folder}: ratings name {len(unknown)} item ids missing from the item file (e.g. {min(unknown)}); re-fetch the data")
    return build_interactions(name=NAME, user=user, item=item, rating=rating, timestamp=ts, item_attributes=attrs)


def load_movielens_users(cache_dir: str | Path | None = None) -> pa.Table:
    """The user table: user_id (int64), age (int64), gender, occupation, zip_code (strings)."""
    folder = fetch_movielens_100k(cache_dir)
    if (folder / "u.user").is_file():
        path, sep, skip = folder / "u.user", "|", 0
    elif (folder / "ml-100k.user").is_file():
        path, sep, skip = folder / "ml-100k.user", "\t", 1
    else:
        raise InputDataError(f"{folder}: no user file (u.user or ml-100k.user); delete the folder and fetch again")
    cols: dict[str, list] = {"user_id": [], "age": [], "gender": [], "occupation": [], "zip_code": []}
    for lineno, fields in _rows(path, sep, n_fields=5, skip=skip):
        cols["user_id"].append(_int(fields[0], path, lineno, "user_id"))
        cols["age"].append(_int(fields[1], path, lineno, "age"))
        for name, value in zip(("gender", "occupation", "zip_code"), fields[2:]):
            cols[name].append(value)
    return pa.table({k: pa.array(v, type=pa.int64() if k in ("user_id", "age") else pa.string()) for k, v in cols.items()})


# --- parsers ----------------------------------------------------------------------------------


def _rows(path: Path, sep: str, *, n_fields: int, skip: int = 0, encoding: str = "utf-8") -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of each non-empty line after ``skip`` header lines."""
    with open(path, encoding=encoding, errors="strict") as fh:
        for lineno, line in enumerate(fh, start=1):
            if lineno <= skip or not line.strip():
                continue
            fields = line.rstrip("\r\n").split(sep)
            if len(fields) < n_fields:
                raise InputDataError(f"{path}, line {lineno}: {len(fields)} fields, expected {n_fields} separated by {sep!r}; fix or re-fetch the file")
            yield lineno, fields


def _int(text: str, path: Path, lineno: int, field: str) -> int:
    try:
        return int(float(text)) if "." in text else int(text)
    except ValueError:
        raise InputDataError(f"{path}, line {lineno}: {field} {text!r} is not a number; fix or re-fetch the file") from None


def _float(text: str, path: Path, lineno: int, field: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise InputDataError(f"{path}, line {lineno}: {field} {text!r} is not a number; fix or re-fetch the file") from None


def _ratings(path: Path, sep: str, skip: int, cols: tuple[int, int, int, int]) -> tuple[np.ndarray, ...]:
    u, i, r, t = [], [], [], []
    cu, ci, cr, ct = cols
    for lineno, f in _rows(path, sep, n_fields=max(cols) + 1, skip=skip):
        u.append(_int(f[cu], path, lineno, "user_id"))
        i.append(_int(f[ci], path, lineno, "item_id"))
        r.append(_float(f[cr], path, lineno, "rating"))
        t.append(_int(f[ct], path, lineno, "timestamp"))
    return np.asarray(u, np.int64), np.asarray(i, np.int64), np.asarray(r, np.float32), np.asarray(t, np.int64)


def _read_grouplens_ratings(path: Path) -> tuple[np.ndarray, ...]:
    return _ratings(path, "\t", 0, (0, 1, 2, 3))


def _read_grouplens_items(path: Path) -> dict[int, list[str]]:
    attrs: dict[int, list[str]] = {}
    # u.item is Latin-1 (accented titles), not UTF-8.
    for lineno, f in _rows(path, "|", n_fields=5 + len(GROUPLENS_GENRES), encoding="latin-1"):
        flags = f[5 : 5 + len(GROUPLENS_GENRES)]
        if any(x not in ("0", "1") for x in flags):
            raise InputDataError(f"{path}, line {lineno}: genre flags must be 0 or 1, got {flags}; fix or re-fetch the file")
        genres = [f"genre={g}" for g, x in zip(GROUPLENS_GENRES, flags) if x == "1"]
        year = year_bucket(f[2]) if f[2] else year_bucket(f[1])
        attrs[_int(f[0], path, lineno, "movie id")] = genres + [year]
    return attrs


def _header(path: Path) -> dict[str, int]:
    """RecBole atomic header 'user_id:token<TAB>rating:float' -> {'user_id': 0, 'rating': 1}."""
    with open(path, encoding="utf-8") as fh:
        head = fh.readline().rstrip("\r\n").split("\t")
    return {h.split(":", 1)[0]: j for j, h in enumerate(head)}


def _need(path: Path, header: dict[str, int], names: tuple[str, ...]) -> tuple[int, ...]:
    missing = [n for n in names if n not in header]
    if missing:
        raise InputDataError(f"{path}, line 1: header lacks {missing} (has {list(header)}); expected RecBole's atomic format")
    return tuple(header[n] for n in names)


def _read_recbole_ratings(path: Path) -> tuple[np.ndarray, ...]:
    cols = _need(path, _header(path), ("user_id", "item_id", "rating", "timestamp"))
    return _ratings(path, "\t", 1, cols)  # type: ignore[arg-type]


def _read_recbole_items(path: Path) -> dict[int, list[str]]:
    header = _header(path)
    c_item, c_year, c_genre = _need(path, header, ("item_id", "release_year", "class"))
    c_title = header.get("movie_title")
    attrs: dict[int, list[str]] = {}
    for lineno, f in _rows(path, "\t", n_fields=max(c_item, c_year, c_genre) + 1, skip=1):
        genres = [f"genre={g}" for g in f[c_genre].split(" ") if g]
        year = year_bucket(f[c_year])
        if year == UNKNOWN_YEAR and c_title is not None:
            year = year_bucket(f[c_title])  # e.g. item 1412: year "V", "(1995)" in the title
        attrs[_int(f[c_item], path, lineno, "item_id")] = genres + [year]
    return attrs


def clear_cache(cache_dir: str | Path | None = None) -> None:
    """Delete the cached raw files (the next load fetches them again)."""
    shutil.rmtree(Path(cache_dir) if cache_dir is not None else default_cache_dir(), ignore_errors=True)
