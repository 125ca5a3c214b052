"""Amazon review data (the paper's data set): 5-core reviews + item metadata -> InteractionData.

Both files are JSON lines, gzip-compressed or plain (detected from the bytes, not the name), from
a path the user gives; nothing is downloaded. Fields used:

- reviews: ``reviewerID`` (user id), ``asin`` (item id), ``overall`` (rating), and
  ``unixReviewTime`` (seconds), or ``reviewTime`` ("MM DD, YYYY", read as UTC midnight) when the
  former is absent;
- metadata: ``asin``, ``brand`` (a string), ``category`` (a list of strings, 2018 dumps) or
  ``categories`` (a list of lists of strings, 2014 dumps). Older metadata dumps write Python
  literals instead of JSON (single quotes); those lines are read with ``ast.literal_eval``, which
  evaluates literals only, never code.

Item attributes: "brand=<brand>" and "category=<each category>". Items without metadata get no
attributes; metadata of items nobody reviewed is ignored. Ids stay Amazon's (reviewerID, asin).
A malformed line raises InputDataError naming the file, the 1-based line number and the problem.

This module does not download the data or split it into versions (see ``slicing``).
"""

from __future__ import annotations

import ast
import gzip
import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from raybc.data.interactions import InteractionData, build_interactions
from raybc.errors import InputDataError

GZIP_MAGIC = b"\x1f\x8b"
REVIEW_TIME_FORMAT = "%m %d, %Y"  # "10 17, 2015"; single-digit days ("9 5, 2014") parse too


def _open_text(path: Path):
    if not path.is_file():
        raise InputDataError(f"{path}: no such file; give the path of the JSON lines file (.json or .json.gz)")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, parsed object) of every non-empty line."""
    with _open_text(path) as fh:
        lineno = 0
        try:
            for lineno, line in enumerate(fh, start=1):
                text = line.strip()
                if not text:
                    continue
                yield lineno, _parse(text, path, lineno)
        except (UnicodeDecodeError, EOFError, OSError) as exc:
            raise InputDataError(f"{path}, line {lineno + 1}: cannot read the file ({exc}); is it truncated or not UTF-8 text?") from None


def _parse(text: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        try:  # older Amazon dumps: one Python dict literal per line
            obj = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise InputDataError(f"{path}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise InputDataError(f"{path}, line {lineno}: a JSON {type(obj).__name__}, expected one object per line")
    return obj


def _field(obj: dict[str, Any], key: str, kinds: tuple[type, ...], path: Path, lineno: int, what: str) -> Any:
    if key not in obj:
        raise InputDataError(f"{path}, line {lineno}: missing required field {key!r} ({what})")
    value = obj[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise InputDataError(f"{path}, line {lineno}: field {key!r} is {type(value).__name__} {value!r:.40}, expected {what}")
    return value


def _review_time(obj: dict[str, Any], path: Path, lineno: int) -> int:
    if "unixReviewTime" in obj:
        return int(_field(obj, "unixReviewTime", (int,), path, lineno, "an integer of seconds since 1970"))
    if "reviewTime" not in obj:
        raise InputDataError(f"{path}, line {lineno}: missing required field 'unixReviewTime' (or 'reviewTime' \"MM DD, YYYY\")")
    text = _field(obj, "reviewTime", (str,), path, lineno, 'a date "MM DD, YYYY"')
    try:
        day = datetime.strptime(text.strip(), REVIEW_TIME_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        raise InputDataError(f"{path}, line {lineno}: reviewTime {text!r} is not a date \"MM DD, YYYY\"") from None
    return int(day.timestamp())


def read_reviews(path: str | Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(reviewerID, asin, rating float32, timestamp int64) per review line, in file order."""
    path = Path(path)
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    times: list[int] = []
    for lineno, obj in _records(path):
        users.append(_field(obj, "reviewerID", (str,), path, lineno, "a string (the reviewer id)"))
        items.append(_field(obj, "asin", (str,), path, lineno, "a string (the product id)"))
        ratings.append(float(_field(obj, "overall", (int, float), path, lineno, "a number (the rating)")))
        times.append(_review_time(obj, path, lineno))
    return users, items, np.asarray(ratings, dtype=np.float32), np.asarray(times, dtype=np.int64)


def read_metadata(path: str | Path) -> dict[str, list[str]]:
    """asin -> attribute strings ("brand=...", "category=..."); repeated asins merge."""
    path = Path(path)
    attrs: dict[str, list[str]] = {}
    for lineno, obj in _records(path):
        asin = _field(obj, "asin", (str,), path, lineno, "a string (the product id)")
        mine = attrs.setdefault(asin, [])
        brand = obj.get("brand")
        if brand is not None:
            if not isinstance(brand, str):
                raise InputDataError(f"{path}, line {lineno}: field 'brand' is {type(brand).__name__}, expected a string")
            if brand.strip():
                mine.append(f"brand={brand.strip()}")
        for category in _categories(obj, path, lineno):
            mine.append(f"category={category}")
    return attrs


def _categories(obj: dict[str, Any], path: Path, lineno: int) -> list[str]:
    out: list[str] = []
    if "category" in obj:
        value = obj["category"]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise InputDataError(f"{path}, line {lineno}: field 'category' must be a list of strings, got {value!r:.60}")
        out.extend(value)
    if "categories" in obj:
        value = obj["categories"]
        ok = isinstance(value, list) and all(isinstance(p, list) and all(isinstance(c, str) for c in p) for p in value)
        if not ok:
            raise InputDataError(f"{path}, line {lineno}: field 'categories' must be a list of lists of strings, got {value!r:.60}")
        out.extend(c for p in value for c in p)
    return [c.strip() for c in out if c.strip()]


def load_amazon(reviews: str | Path, meta: str | Path | None = None, *, name: str = "amazon") -> InteractionData:
    """Amazon 5-core reviews (+ optional metadata) as InteractionData; ids are reviewerID / asin."""
    users, items, rating, timestamp = read_reviews(reviews)
    if not users:
        raise InputDataError(f"{reviews}: no reviews in the file; give the 5-core review file (JSON lines)")
    attributes = read_metadata(meta) if meta is not None else {}
    return build_interactions(name=name, user=users, item=items, rating=rating, timestamp=timestamp, item_attributes=attributes)
