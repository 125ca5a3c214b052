"""Amazon reviews + metadata loader: gzip/plain JSON lines, both category layouts, malformed lines."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from raybc.data.amazon import load_amazon
from raybc.errors import InputDataError

REVIEWS = [
    {"overall": 5.0, "verified": True, "reviewTime": "10 17, 2015", "reviewerID": "A2", "asin": "B001", "unixReviewTime": 1445040000, "reviewText": "great"},
    {"overall": 3.0, "reviewerID": "A1", "asin": "B002", "unixReviewTime": 1400000000},
    {"overall": 4, "reviewerID": "A1", "asin": "B001", "reviewTime": "01 2, 2014"},  # no unixReviewTime
    {"overall": 2.0, "reviewerID": "A3", "asin": "B003", "unixReviewTime": 1500000000},
]
META = [
    {"asin": "B001", "brand": "Fender", "category": ["Musical Instruments", "Guitars"], "title": "x"},
    {"asin": "B002", "brand": "", "categories": [["Musical Instruments", "Amplifiers"], ["Sale"]]},
    {"asin": "B999", "brand": "Nobody", "category": ["Unreviewed"]},
]


def write_lines(path, rows, *, gz: bool = True) -> None:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text)


def test_loads_reviews_and_metadata(tmp_path):
    write_lines(tmp_path / "reviews_5.json.gz", REVIEWS)
    write_lines(tmp_path / "meta.json.gz", META)
    data = load_amazon(tmp_path / "reviews_5.json.gz", tmp_path / "meta.json.gz", name="Musical_Instruments")
    assert data.name == "Musical_Instruments"
    assert data.user_ids.to_pylist() == ["A1", "A2", "A3"] and data.item_ids.to_pylist() == ["B001", "B002", "B003"]
    # 01 2, 2014 (UTC midnight) = 1388620800 sorts between 1400000000 and the rest.
    assert data.timestamp.tolist() == [1388620800, 1400000000, 1445040000, 1500000000]
    assert data.user.tolist() == [0, 0, 1, 2] and data.item.tolist() == [0, 1, 0, 2]
    assert data.rating.tolist() == [4, 3, 5, 2]
    names = data.attribute_names
    attrs = [[names[j] for j in data.item_attributes(i)] for i in range(3)]
    assert attrs[0] == ["brand=Fender", "category=Guitars", "category=Musical Instruments"]
    assert attrs[1] == ["category=Amplifiers", "category=Musical Instruments", "category=Sale"]  # empty brand dropped
    assert attrs[2] == []  # no metadata
    assert "brand=Nobody" not in names  # metadata of unreviewed items is ignored


def test_plain_json_lines_and_no_metadata(tmp_path):
    write_lines(tmp_path / "reviews.json", REVIEWS, gz=False)
    data = load_amazon(tmp_path / "reviews.json")
    assert data.n_edges == 4 and data.n_attributes == 0 and np.all(data.item_attr_indptr == 0)


def test_python_literal_metadata_of_older_dumps(tmp_path):
    write_lines(tmp_path / "r.json.gz", REVIEWS)
    write_lines(tmp_path / "m.json.gz", ["{'asin': 'B003', 'categories': [['Musical Instruments', 'Drums']]}"])
    data = load_amazon(tmp_path / "r.json.gz", tmp_path / "m.json.gz")
    assert [data.attribute_names[j] for j in data.item_attributes(2)] == ["category=Drums", "category=Musical Instruments"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"overall": 5.0, "reviewerID": "A9", "asin": ', r"line 3: not valid JSON"),
        ({"overall": 5.0, "asin": "B001", "unixReviewTime": 1}, r"line 3: missing required field 'reviewerID'"),
        ({"overall": "five", "reviewerID": "A9", "asin": "B001", "unixReviewTime": 1}, r"line 3: field 'overall' is str .*expected a number"),
        ({"overall": 5.0, "reviewerID": "A9", "asin": "B001"}, r"line 3: missing required field 'unixReviewTime'"),
        ({"overall": 5.0, "reviewerID": "A9", "asin": "B001", "reviewTime": "2015-10-17"}, r"line 3: reviewTime '2015-10-17' is not a date"),
        ("[1, 2]", r"line 3: a JSON list, expected one object"),
    ],
)
def test_malformed_review_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "reviews.json.gz"
    write_lines(path, [REVIEWS[0], "", bad, REVIEWS[1]])  # line 2 is blank: numbering still counts it
    with pytest.raises(InputDataError, match=r"reviews\.json\.gz, " + message):
        load_amazon(path)


def test_malformed_metadata_line(tmp_path):
    write_lines(tmp_path / "r.json.gz", REVIEWS)
    write_lines(tmp_path / "m.json.gz", [META[0], {"asin": "B002", "category": "Guitars"}])
    with pytest.raises(InputDataError, match=r"m\.json\.gz, line 2: field 'category' must be a list of strings"):
        load_amazon(tmp_path / "r.json.gz", tmp_path / "m.json.gz")
    with pytest.raises(InputDataError, match=r"missing\.json\.gz: no such file"):
        load_amazon(tmp_path / "missing.json.gz")
