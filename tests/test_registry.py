"""The version registry over local and S3 storage: publish, read, lineage, immutability, register."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybc.data.synthetic import build_registry, embedding_tables, random_aligner
from raybc.embeddings import make_table, read_matrix
from raybc.gate import read_version_embeddings
from raybc.errors import AlreadyExistsError, InputDataError, IntegrityError, RegistryError
from raybc.registry import ALIGNER_FILE, ModelWeights, Registry
from raybc.storage import Storage
from raybc.transforms import Linear


def test_publish_read_list_and_lineage(storage_root):
    reg = build_registry(storage_root, dims=[8, 12, 16], rows=1000, entities=["items"], rows_per_file=400)
    assert reg.versions() == [0, 1, 2]
    assert reg.lineage(2) == [2, 1, 0]
    v2 = reg.get(2)
    assert (v2.dim, v2.parent, v2.method) == (16, 1, "synthetic")
    assert v2.embeddings["items"].rows == 1000 and len(v2.embeddings["items"].files) == 3
    assert v2.aligner is not None and len(v2.aligner.sha256) == 64
    assert reg.get(0).aligner is None and reg.get(0).embeddings == {}
    # B_2 comes back exactly as published
    b = reg.aligner(2)
    assert (b.in_dim, b.out_dim) == (16, 12)
    # a fresh Registry (no cache) reads the same thing
    again = Registry(storage_root.uri(), storage_root.options)
    np.testing.assert_array_equal(again.aligner(2).weight, b.weight)


def test_published_version_is_immutable(storage_root):
    reg = build_registry(storage_root, dims=[8, 12], rows=10, entities=["items"])
    with pytest.raises(AlreadyExistsError, match="v1 is already published.*publish v2"):
        reg.publish(1, dim=12, method="again", aligner=random_aligner(12, 8, seed=9), embeddings={})
    assert reg.get(1).method == "synthetic"


def test_every_published_embedding_file_is_stamped_and_a_change_before_publishing_is_refused(storage_root):
    """Each path that publishes z_k records every file's size and stamp (ETag or mtime): the files
    write_embeddings wrote (raybc train), those publish scans itself, and a listing given without
    stamps. A file that changed between being described and being published is refused."""
    from raybc.registry import EntityFiles, FileEntry
    from raybc.storage import file_stamp

    reg = Registry(storage_root)

    def stamped_as_listed(k: int, entity: str) -> bool:
        infos = {i["basename"]: i for i in reg.embeddings_storage(k, entity).list(detail=True)}
        files = reg.get(k).embeddings[entity].files
        return bool(files) and all(f.stamp and f.stamp == file_stamp(infos[f.path]) and f.bytes == infos[f.path]["size"] for f in files)

    written = reg.write_embeddings(0, "items", embedding_tables(30, 8, rows_per_file=10))
    reg.publish(0, dim=8, method="m", aligner=None, embeddings={"items": written})
    assert stamped_as_listed(0, "items")
    with reg.embeddings_storage(1, "items").open_output("z.parquet") as f:  # files put there by another job
        pq.write_table(make_table(np.arange(5), np.ones((5, 12), np.float32)), f)
    reg.publish(1, dim=12, method="m", aligner=random_aligner(12, 8, seed=1))  # embeddings=None: scanned
    assert stamped_as_listed(1, "items")
    listed = reg.write_embeddings(2, "items", embedding_tables(30, 16, rows_per_file=30))
    bare = EntityFiles("items", 16, "int64", tuple(FileEntry(f.path, f.rows, f.bytes) for f in listed.files))
    reg.publish(2, dim=16, method="m", aligner=random_aligner(16, 12, seed=2), embeddings={"items": bare})
    assert stamped_as_listed(2, "items")

    described = reg.write_embeddings(3, "items", embedding_tables(30, 16, rows_per_file=30))
    with reg.embeddings_storage(3, "items").open_output("part-00000.parquet") as f:
        pq.write_table(make_table(np.arange(29), np.ones((29, 16), np.float32)), f)
    with pytest.raises(InputDataError, match=r"part-00000.parquet changed while v3 was being published .* publish again once the file is final"):
        reg.publish(3, dim=16, method="m", aligner=random_aligner(16, 16, seed=3), embeddings={"items": described})
    assert reg.versions() == [0, 1, 2]


def test_concurrent_publishers_of_one_version_have_one_winner(storage_root):
    reg = build_registry(storage_root, dims=[8], rows=10, entities=["items"])
    results: dict[int, object] = {}
    barrier = threading.Barrier(4)

    def publisher(i):
        r = Registry(storage_root.uri(), storage_root.options)
        barrier.wait()
        try:
            r.publish(1, dim=12, method=f"publisher-{i}", aligner=random_aligner(12, 8, seed=100 + i), embeddings={})
            results[i] = "won"
        except AlreadyExistsError as exc:
            results[i] = str(exc)

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    losers = [r for r in results.values() if r != "won"]
    assert all("another publisher" in r or "already published" in r for r in losers), losers
    # the winner's manifest and weights agree (checksum verified on load)
    assert reg.get(1).method == f"publisher-{winners[0]}"
    reg.aligner(1)


def test_interrupted_publish_can_be_retried_or_discarded(storage_root):
    reg = build_registry(storage_root, dims=[8], rows=10, entities=["items"])
    b = random_aligner(12, 8, seed=1)
    from raybc.transforms import to_bytes

    storage_root.create_exclusive(f"registry/v1/{ALIGNER_FILE}", to_bytes(b))  # weights written, then a crash
    assert reg.versions() == [0]
    # the same publish, retried, completes
    reg.publish(1, dim=12, method="retry", aligner=b, embeddings={})
    assert reg.versions() == [0, 1]
    # a different publish over leftovers is refused with the fix
    storage_root.create_exclusive(f"registry/v2/{ALIGNER_FILE}", to_bytes(random_aligner(16, 12, seed=2)))
    with pytest.raises(AlreadyExistsError, match="raybc registry discard|raybc discard|discard"):
        reg.publish(2, dim=16, method="other", aligner=random_aligner(16, 12, seed=3), embeddings={})
    assert reg.discard_unpublished(2)
    reg.publish(2, dim=16, method="other", aligner=random_aligner(16, 12, seed=3), embeddings={})
    with pytest.raises(RegistryError, match="immutable"):
        reg.discard_unpublished(2)


def test_publish_checks_lineage_and_dimensions(storage_root):
    reg = Registry(storage_root)
    with pytest.raises(RegistryError, match="parent v0 is not published"):
        reg.publish(1, dim=12, method="m", aligner=random_aligner(12, 8, seed=0), embeddings={})
    reg.publish(0, dim=8, method="m", aligner=None, embeddings={})
    with pytest.raises(RegistryError, match="v0 is the oldest version"):
        Registry(storage_root.child("other")).publish(0, dim=8, method="m", aligner=random_aligner(8, 8, seed=0), embeddings={})
    with pytest.raises(RegistryError, match=r"B_1 maps 12->7 but v1 has dim 12 and v0 has dim 8"):
        reg.publish(1, dim=12, method="m", aligner=random_aligner(12, 7, seed=0), embeddings={})
    with pytest.raises(RegistryError, match="needs a backward transform"):
        reg.publish(1, dim=12, method="m", aligner=None, embeddings={})
    with pytest.raises(RegistryError, match="version 5 is not published.*published: v0"):
        reg.get(5)


def test_tampered_weights_fail_the_checksum(storage_root):
    reg = build_registry(storage_root, dims=[8, 12], rows=10, entities=["items"])
    data = bytearray(storage_root.read_bytes(f"registry/v1/{ALIGNER_FILE}"))
    data[-1] ^= 0x01  # flip one bit of a weight
    storage_root.write_atomic(f"registry/v1/{ALIGNER_FILE}", bytes(data))
    with pytest.raises(IntegrityError, match="sha256 .* does not match the manifest"):
        Registry(storage_root).aligner(1)
    storage_root.write_atomic(f"registry/v1/{ALIGNER_FILE}", bytes(data[:-20]))
    with pytest.raises(IntegrityError, match="truncated or replaced"):
        Registry(storage_root).aligner(1)


def test_tampered_manifest_is_refused(storage_root):
    build_registry(storage_root, dims=[8, 12], rows=10, entities=["items"])
    m = storage_root.read_json("registry/v1/manifest.json")
    m["version"] = 7
    storage_root.write_json_atomic("registry/v1/manifest.json", m)
    with pytest.raises(IntegrityError, match="tampered or damaged manifest: names version 7"):
        Registry(storage_root).get(1)


def test_model_weights_round_trip_with_spec(storage_root):
    reg = Registry(storage_root)
    tensors = {"layer.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    reg.publish(0, dim=8, method="m", aligner=None, embeddings={}, model=ModelWeights(tensors, {"arch": "gnn", "dim": 8}))
    back = Registry(storage_root).model(0)
    assert back.spec == {"arch": "gnn", "dim": 8}
    np.testing.assert_array_equal(back.tensors["layer.weight"], tensors["layer.weight"])


@pytest.mark.cluster
def test_register_a_version_trained_elsewhere(ray_session, storage_root, tmp_path):
    reg = build_registry(storage_root, dims=[8, 12], rows=10, entities=["items"])
    # the user's z_2 (two files) and B_2 (in (in, out) layout) in a folder of their own
    src = tmp_path / "outside"
    src.mkdir()
    tables = list(embedding_tables(700, 16, rows_per_file=400, seed=3))
    for i, t in enumerate(tables):
        pq.write_table(t, src / f"z-{i}.parquet")
    # B_2 in (in, out) layout, consistent with the stored z_1 on the 10 ids both versions hold
    z1 = dict(zip(*read_matrix(read_version_embeddings(reg, 1, "items"))))
    z2 = dict(zip(*read_matrix(pa.concat_tables(tables))))
    shared = sorted(set(z1) & set(z2))
    b = np.linalg.lstsq(np.stack([z2[i] for i in shared]), np.stack([z1[i] for i in shared]), rcond=None)[0].astype(np.float32)
    np.save(tmp_path / "b2.npy", b)
    v = reg.register(2, embeddings={"items": str(src)}, aligner=str(tmp_path / "b2.npy"))
    assert v.manifest["aligner_check"]["pairs"]["items"]["shared"] == 10
    assert v.manifest["aligner_check"]["relative_error"]["items"]["v1"] < 1e-6
    assert (v.version, v.dim, v.method) == (2, 16, "external")
    assert v.embeddings["items"].rows == 700
    np.testing.assert_allclose(reg.aligner(2).weight, b.T)


@pytest.mark.cluster
def test_register_refuses_bad_inputs(ray_session, storage_root, tmp_path):
    reg = build_registry(storage_root, dims=[8, 12], rows=10, entities=["items"])
    good = tmp_path / "z.parquet"
    pq.write_table(make_table(np.arange(5), np.zeros((5, 16), np.float32)), good)
    np.save(tmp_path / "wrong.npy", np.zeros((16, 10), np.float32))
    with pytest.raises(Exception, match=r"wrong.npy: B has shape \(16, 10\)"):
        reg.register(2, embeddings={"items": str(good)}, aligner=str(tmp_path / "wrong.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputDataError, match="obj.npy: not a plain .npy matrix"):
        reg.register(2, embeddings={"items": str(good)}, aligner=str(tmp_path / "obj.npy"))
    with pytest.raises(InputDataError, match="needs B_2"):
        reg.register(2, embeddings={"items": str(good)}, aligner=None)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputDataError, match="bad.parquet is not a readable Parquet file"):
        reg.register(2, embeddings={"items": str(tmp_path / "bad.parquet")}, aligner=str(tmp_path / "wrong.npy"))
    assert reg.versions() == [0, 1]  # nothing published by the failed attempts


def test_backward_transform_for_online_use(tmp_path):
    reg = build_registry(Storage(str(tmp_path)), dims=[8, 12, 16], rows=10, entities=["items"])
    t = reg.transform(2, 0)
    z = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    ref = reg.aligner(1).apply(reg.aligner(2).apply(z.astype(np.float64)))
    np.testing.assert_allclose(t(z), ref, rtol=1e-5, atol=1e-6)
    torch = pytest.importorskip("torch")
    out = t(torch.from_numpy(z))
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (4, 8)
    assert (t.in_dim, t.out_dim) == (16, 8)
    assert isinstance(reg.aligner(2), type(Linear(np.zeros((1, 1)))))
