"""Storage primitives over a local folder and a real S3 server (moto, loopback)."""

from __future__ import annotations

import pickle
import threading

import pyarrow as pa
import pytest

from raybc.errors import AlreadyExistsError, StorageError
from raybc.storage import Storage, StorageOptions, split_uri


def test_write_atomic_replaces_and_reads_back(storage_root):
    storage_root.write_atomic("a/b/x.json", b'{"v": 1}')
    storage_root.write_atomic("a/b/x.json", b'{"v": 2}')
    assert storage_root.read_json("a/b/x.json") == {"v": 2}
    assert storage_root.list("a/b") == ["x.json"]  # no temporaries left behind


def test_create_exclusive_refuses_second_writer(storage_root):
    storage_root.create_exclusive("m.json", b"first")
    with pytest.raises(AlreadyExistsError, match="m.json already exists"):
        storage_root.create_exclusive("m.json", b"second")
    assert storage_root.read_bytes("m.json") == b"first"


def test_create_exclusive_race_has_one_winner(storage_root):
    wins, losses = [], []
    barrier = threading.Barrier(6)

    def publish(i):
        barrier.wait()
        try:
            storage_root.create_exclusive("race.json", str(i).encode())
            wins.append(i)
        except AlreadyExistsError:
            losses.append(i)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 5
    assert storage_root.read_bytes("race.json") == str(wins[0]).encode()


def test_open_output_is_invisible_until_success(storage_root):
    with pytest.raises(RuntimeError):
        with storage_root.open_output("big/part.bin") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("crash mid-write")
    assert not storage_root.exists("big/part.bin")
    assert [n for n in storage_root.list("big") if not n.startswith(".")] == []
    with storage_root.open_output("big/part.bin") as f:
        f.write(b"y" * 1000)
    assert storage_root.read_bytes("big/part.bin") == b"y" * 1000


def test_paths_refuse_traversal(storage_root):
    for bad in ("../escape", "a/../../b", ".hidden/x", "a/-rf"):
        with pytest.raises(StorageError, match="invalid path segment"):
            storage_root.path(bad)


def test_uri_forms_resolve_to_one_code_path(tmp_path):
    assert split_uri(str(tmp_path)) == ("file", str(tmp_path))
    assert split_uri(f"file://{tmp_path}") == ("file", str(tmp_path))
    assert split_uri("s3://bucket/prefix/") == ("s3", "bucket/prefix")
    assert split_uri("gs://bucket/p") == ("gs", "bucket/p")
    with pytest.raises(StorageError, match="names no bucket"):
        split_uri("s3://")
    with pytest.raises(StorageError, match="contains '..'"):
        split_uri("s3://bucket/../other")


def test_open_input_maps_local_files_on_request_and_reads_the_same_bytes(storage_root):
    """``memory_map=True`` maps a local file (the backfill's reads: no heap copy of each column
    chunk) and is ignored elsewhere; either way the bytes are the file's, seek and all."""
    data = bytes(range(256)) * 64
    storage_root.write_atomic("m/blob.bin", data)
    for mapped in (False, True):
        with storage_root.open_input("m/blob.bin", memory_map=mapped) as f:
            assert isinstance(f, pa.MemoryMappedFile) == (mapped and storage_root.is_local)
            f.seek(1000)
            assert f.read(24) == data[1000:1024]
            f.seek(0)
            assert f.read() == data


def test_memory_filesystem_works_through_the_same_code():
    s = Storage("memory://raybc-test-root")
    s.create_exclusive("x/m.json", b"{}")
    with pytest.raises(AlreadyExistsError):
        s.create_exclusive("x/m.json", b"{}")
    s.write_atomic("x/c.json", b'{"a": 1}')
    assert s.read_json("x/c.json") == {"a": 1}


def test_gs_without_gcsfs_says_how_to_fix():
    pytest.importorskip  # gcsfs is an optional extra; the message must name it when absent
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match=r"raybc\[gcs\]"):
            Storage("gs://bucket/prefix").exists("x")
    else:
        assert Storage("gs://bucket/prefix").protocol == "gs"


def test_credentials_never_in_repr_and_in_a_pickle_only_when_the_options_gave_them(s3_server, s3_bucket, monkeypatch):
    """What a pickled Storage (sent to Ray workers) carries: a secret given explicitly in the
    options travels (documented in raybc/storage.py); one from the environment never does."""
    from ray import cloudpickle

    explicit = "EXPLICIT-SECRET-VALUE-123"
    from_env = "ENV-SECRET-VALUE-456"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key-id-789")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", from_env)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "ENV-SESSION-TOKEN-000")

    given = Storage(
        f"s3://{s3_bucket}/r",
        StorageOptions(endpoint_url=s3_server, access_key_id="testing-key-id", secret_access_key=explicit),
    )
    for text in (repr(given), repr(given.options), str(given.options.model_dump())):
        assert explicit not in text and from_env not in text
    given.write_atomic("x", b"1")  # the secret reaches the client
    for dumps in (pickle.dumps, cloudpickle.dumps):
        blob = dumps(given)
        assert explicit.encode() in blob, "an explicitly given secret is documented as travelling to workers"
        assert from_env.encode() not in blob
        assert pickle.loads(blob).read_bytes("x") == b"1"

    resolved = Storage(f"s3://{s3_bucket}/r", StorageOptions(endpoint_url=s3_server))
    assert resolved.read_bytes("x") == b"1"  # credentials from the environment work here...
    for dumps in (pickle.dumps, cloudpickle.dumps):
        blob = dumps(resolved)
        for value in (from_env, "env-key-id-789", "ENV-SESSION-TOKEN-000"):
            assert value.encode() not in blob, f"{value} from the environment was pickled"
        # ...and on the receiving side, which resolves its own (a Ray worker: its environment or role)
        assert pickle.loads(blob).read_bytes("x") == b"1"
    assert resolved.options.secret_access_key is None and resolved.options.access_key_id is None


def test_missing_bucket_is_a_clear_error(s3_server):
    s = Storage("s3://no-such-bucket-raybc/root", StorageOptions(endpoint_url=s3_server))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-raybc'.*does not exist"):
        s.read_bytes("registry/v0/manifest.json")
    with pytest.raises(StorageError, match="does not exist"):
        s.write_atomic("x.json", b"{}")


def test_endpoint_url_option_is_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must start with http"):
        StorageOptions(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ValidationError, match="extra"):
        StorageOptions(endpoint="http://x")  # unknown field
