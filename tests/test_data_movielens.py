"""MovieLens-100K: both raw layouts (GroupLens, RecBole), the cache, fallback order, bad lines, the real data."""

from __future__ import annotations

import numpy as np
import pytest

from raybc.data import movielens
from raybc.data.movielens import fetch_movielens_100k, load_movielens_100k, load_movielens_users, year_bucket
from raybc.data.slicing import temporal_versions
from raybc.errors import InputDataError, StorageError

RECBOLE_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "7\t2\t5\t300\n"
    "3\t1\t4\t100\n"
    "3\t2\t2\t200\n"
)
RECBOLE_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tLand Before Time III: The Time of the Great Giving (1975)\tV\tAnimation\n"
)
RECBOLE_USER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n3\t24\tM\ttechnician\t85711\n7\t53\tF\tother\t94043\n"


def genre_flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in movielens.GROUPLENS_GENRES)


GROUPLENS_DATA = "7\t2\t5\t300\n3\t1\t4\t100\n3\t2\t2\t200\n"
TOY_STORY_FLAGS = genre_flags("Animation", "Children's", "Comedy")
GROUPLENS_ITEM = (
    f"1|Toy Story (1995)|01-Jan-1995||http://x|{TOY_STORY_FLAGS}\n"
    f"2|Caf\xe9 (1975)|||http://y|{genre_flags('Animation')}\n"
)


def write_recbole(folder, inter: str = RECBOLE_INTER) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.inter").write_text(inter)
    (folder / "ml-100k.item").write_text(RECBOLE_ITEM)
    (folder / "ml-100k.user").write_text(RECBOLE_USER)


def check_tiny(data) -> None:
    assert data.user_ids.to_pylist() == [3, 7] and data.item_ids.to_pylist() == [1, 2]
    assert data.timestamp.tolist() == [100, 200, 300]
    assert data.user.tolist() == [0, 0, 1] and data.item.tolist() == [0, 1, 1]
    assert data.rating.tolist() == [4, 2, 5]
    names = data.attribute_names
    assert [names[j] for j in data.item_attributes(0)] == ["genre=Animation", "genre=Children's", "genre=Comedy", "year=1990s"]
    assert [names[j] for j in data.item_attributes(1)] == ["genre=Animation", "year=1970s"]


def test_recbole_layout_loads(tmp_path):
    write_recbole(tmp_path / "ml")
    check_tiny(load_movielens_100k(tmp_path / "ml"))
    users = load_movielens_users(tmp_path / "ml")
    assert users.column("user_id").to_pylist() == [3, 7] and users.column("occupation").to_pylist() == ["technician", "other"]


def test_grouplens_layout_loads_to_the_same_data(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "u.data").write_text(GROUPLENS_DATA)
    (folder / "u.item").write_bytes(GROUPLENS_ITEM.encode("latin-1"))
    (folder / "u.user").write_text("3|24|M|technician|85711\n7|53|F|other|94043\n")
    check_tiny(load_movielens_100k(folder))
    assert load_movielens_users(folder).column("age").to_pylist() == [24, 53]


def test_year_buckets():
    assert year_bucket("1995") == "year=1990s" and year_bucket("01-Jan-2001") == "year=2000s"
    assert year_bucket("unkonwn") == year_bucket("V") == year_bucket("") == "year=unknown"


def test_fetch_falls_back_to_recbole_then_uses_the_cache(tmp_path, monkeypatch):
    calls = []

    def grouplens_down(folder):
        calls.append("grouplens")
        raise OSError("Could not resolve host")

    def recbole(folder):
        calls.append("recbole")
        write_recbole(folder)

    monkeypatch.setattr(movielens, "_fetch_grouplens", grouplens_down)
    monkeypatch.setattr(movielens, "_fetch_recbole", recbole)
    monkeypatch.setenv(movielens.CACHE_ENV, str(tmp_path / "cache"))
    assert fetch_movielens_100k() == tmp_path / "cache" / "ml-100k"
    check_tiny(load_movielens_100k())
    check_tiny(load_movielens_100k())
    assert calls == ["grouplens", "recbole"]  # loading again never downloads again


def test_fetch_failure_names_every_source(tmp_path, monkeypatch):
    def down(folder):
        raise OSError("unreachable")

    monkeypatch.setattr(movielens, "_fetch_grouplens", down)
    monkeypatch.setattr(movielens, "_fetch_recbole", down)
    with pytest.raises(StorageError, match=r"(?s)GroupLens archive.*recbole==1\.2\.1.*by hand"):
        fetch_movielens_100k(tmp_path / "empty")


def test_malformed_line_names_file_and_line(tmp_path):
    write_recbole(tmp_path / "ml", inter=RECBOLE_INTER + "3\tabc\t4\t400\n")
    with pytest.raises(InputDataError, match=r"ml-100k\.inter, line 5: item_id 'abc' is not a number"):
        load_movielens_100k(tmp_path / "ml")
    write_recbole(tmp_path / "ml2", inter=RECBOLE_INTER + "9\t99\t4\t400\n")
    with pytest.raises(InputDataError, match="missing from the item file"):
        load_movielens_100k(tmp_path / "ml2")


@pytest.mark.slow
def test_real_movielens_100k():
    """The real data (from the cache, else GroupLens, else the RecBole wheel on PyPI)."""
    data = load_movielens_100k()
    assert (data.n_users, data.n_items, data.n_edges) == (943, 1682, 100_000)
    assert data.user_ids.to_pylist() == list(range(1, 944)) and data.item_ids.to_pylist() == list(range(1, 1683))
    assert set(np.unique(data.rating).tolist()) == {1, 2, 3, 4, 5}
    names = data.attribute_names
    assert sum(n.startswith("genre=") for n in names) == 19 and "year=1990s" in names
    assert np.all(np.diff(data.item_attr_indptr) >= 2)  # every movie: at least one genre and a year bucket
    users = load_movielens_users()
    assert users.num_rows == 943 and set(users.column("gender").to_pylist()) == {"M", "F"}
    versions = temporal_versions(data)
    assert [len(v.users) for v in versions] == [590, 674, 751, 867, 943]
    for v in versions:
        # The authors' new-user rule adds roughly as many validation users as the existing ones give.
        val_users = np.unique(v.val_user)
        existing = np.isin(val_users, v.existing_users).sum()
        assert 70 <= existing <= 100 and len(val_users) - existing >= 70
