"""The publish gate from files and from the command line: ``raybc consumers register|list|remove``
and ``raybc gate`` on a real local Ray, real Parquet files, a local folder and the loopback S3 server.

A v0 registry of users whose consumer labels are a function of the v0 embeddings; candidates v1:
- good: z1 = z0 Q (a 12-d lift), B_1 = pinv(Q^T) maps it back exactly (accepted, exit 0);
- bad: an unrelated random 12-d model with B_1 a truncation to its first 8 dims (refused, exit 1);
- square: an 8-d rotation, whose B's layout only the flag can tell.
The embeddings hold many more rows than the labels: the gate must read only the labelled ones.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybc import cli
from raybc.consumers import ConsumerOptions, TaskLabels, labels_from_table
from raybc.embeddings import make_table, write_table
from raybc.errors import ConfigError, RegistryError
from raybc.gate import ConsumerStore, GateOptions, PublishGate, group_files, parquet_files, read_version_embeddings
from raybc.registry import Registry
from raybc.storage import Storage

D0, D1 = 8, 12
ROWS = 2000  # embedding rows per version
LABELLED = 600  # of which the consumer labels these
FILES = 5
NAME = "activity-team"
TASK = "user-activity"
RECIPE = "hidden: [16]\ndropout: [0.0]\nseeds: [0]\nepochs: 150\n"


def flags(root: Storage) -> list[str]:
    """--root (and the S3 endpoint for the loopback server)."""
    out = ["--root", root.uri()]
    if root.options.endpoint_url:
        out += ["--endpoint-url", root.options.endpoint_url]
    return out


def write_files(store: Storage, ids: np.ndarray, z: np.ndarray, files: int = FILES) -> list[str]:
    names = []
    for i, part in enumerate(np.array_split(np.arange(len(ids)), files)):
        name = f"part-{i:05d}.parquet"
        with store.open_output(name) as f:
            write_table(f, make_table(ids[part], z[part]))
        names.append(name)
    return names


def put_npy(store: Storage, name: str, m: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, m)
    store.write_atomic(name, buf.getvalue())
    return store.uri(name)


def put_parquet(path, table: pa.Table) -> str:
    pq.write_table(table, str(path))
    return str(path)


@pytest.fixture
def world():
    """v0 embeddings, the labels (a function of them) and the three candidates, as arrays."""
    rng = np.random.default_rng(0)
    ids = np.arange(ROWS, dtype=np.int64) * 7 + 1000  # the data set's own ids, not positions
    z0 = rng.normal(size=(ROWS, D0)).astype(np.float32)
    lab = rng.choice(ROWS, LABELLED, replace=False)
    y = (z0[lab, 0] + z0[lab, 1] + 0.3 * rng.normal(size=LABELLED) > 0).astype(np.int8)
    split = rng.choice(["train", "val", "test"], LABELLED, p=[0.6, 0.2, 0.2])
    labels = pa.table({"id": ids[lab], "label": y, "split": split})
    q = rng.normal(size=(D0, D1))
    good_b = np.linalg.pinv(q.T)  # (8, 12), out_in: B z1 = z0 for z1 = Q^T z0
    rot, _ = np.linalg.qr(rng.normal(size=(D0, D0)))
    return {
        "ids": ids, "z0": z0, "labels": labels,
        "good": ((z0 @ q).astype(np.float32), good_b),
        "bad": (rng.normal(size=(ROWS, D1)).astype(np.float32), np.eye(D0, D1)),  # unrelated model, truncated
        "square": ((z0 @ rot).astype(np.float32), rot.T),  # in_out: z1 @ rot.T = z0 (rot orthogonal)
    }  # fmt: skip


def publish_v0(root: Storage, world) -> None:
    reg = Registry(root)
    names = write_files(reg.embeddings_storage(0, "users"), world["ids"], world["z0"])
    assert len(names) == FILES
    reg.publish(0, dim=D0, method="external", aligner=None)


def register_consumer(root: Storage, world, tmp_path, capsys) -> dict:
    """``raybc consumers register`` on v0: the recipe trains the consumer on v0's labelled rows."""
    labels = put_parquet(tmp_path / "labels.parquet", world["labels"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    code = cli.main(["consumers", "register", *flags(root), "--name", NAME, "--task", TASK, "--labels", labels,
                     "--version", "0", "--recipe", str(recipe), "--json"])  # fmt: skip
    out = capsys.readouterr()
    assert code == cli.EXIT_OK, out.err
    info = json.loads(out.out)
    assert info["name"] == NAME and info["version"] == 0 and info["label_rows"] == LABELLED
    assert info["baseline_auc"] > 0.85  # the labels depend on v0's embeddings
    return info


def candidate(root: Storage, world, kind: str, tmp_name: str | None = None) -> tuple[str, str]:
    """The candidate's files and B (.npy) in an incoming folder of the root's storage."""
    z1, b = world[kind]
    inbox = root.child("incoming", tmp_name or kind)
    write_files(inbox.child("users"), world["ids"], z1)
    return inbox.uri("users"), put_npy(inbox, "b1.npy", b)


def gate(root: Storage, capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["gate", *flags(root), "--version", "1", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- the gate end to end


@pytest.mark.cluster
@pytest.mark.slow
def test_gate_accepts_a_compatible_candidate_and_refuses_a_truncated_one(storage_root, world, tmp_path, capsys, ray_session):
    root = storage_root  # a local folder and an S3 bucket: the filter tasks read either
    publish_v0(root, world)
    register_consumer(root, world, tmp_path, capsys)

    emb, b = candidate(root, world, "good")
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b)
    assert code == cli.EXIT_OK, err
    assert "publish gate for v1" in out and "accepted" in out and f"ok  {NAME}" in out

    emb, b = candidate(root, world, "bad")
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b)
    assert code == cli.EXIT_FAILED
    assert "REFUSED" in out and f"BAD {NAME}" in out
    assert f"consumer {NAME!r} ({TASK}, trained on v0)" in err and "nothing was published" in err
    assert Registry(root).versions() == [0]
    assert not root.walk_files("registry/v1") and not root.walk_files("embeddings/v1")

    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b, "--json")
    assert code == cli.EXIT_FAILED
    report = json.loads(out)
    row = report["consumers"][0]
    assert report["ok"] is False and row["name"] == NAME and row["ok"] is False and row["degradation"] > 0.2
    # the tasks scanned every embedding row and kept exactly the held-out labelled ones
    held = int(np.sum(world["labels"].column("split").to_numpy(zero_copy_only=False) == "test"))
    scan = report["scanned"]["users"]
    assert scan == {"files": FILES, "rows": ROWS, "matched": held, "tasks": FILES}
    assert row["rows"] == held


@pytest.mark.cluster
def test_square_aligner_needs_its_layout(tmp_path, world, capsys, ray_session):
    root = Storage(str(tmp_path / "root"))
    publish_v0(root, world)
    register_consumer(root, world, tmp_path, capsys)
    emb, b = candidate(root, world, "square")  # (8, 8), stored in_out: z1 @ M = z0
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b)
    assert code == cli.EXIT_CONFIG and "--aligner-layout" in err and "square" in err and b in err
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b, "--aligner-layout", "in_out")
    assert code == cli.EXIT_OK, err + out
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b, "--aligner-layout", "out_in")
    assert code == cli.EXIT_FAILED and "REFUSED" in out  # read the other way round, B is a different map
    # a non-square matrix whose stored shape contradicts the flag
    emb, b = candidate(root, world, "good")
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b, "--aligner-layout", "in_out")
    assert code == cli.EXIT_CONFIG and "B has shape (8, 12), but layout in_out" in err and "needs (12, 8)" in err
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b, "--aligner-layout", "out_in")
    assert code == cli.EXIT_OK, err


@pytest.mark.cluster
def test_gate_checks_a_published_version_and_matches_the_in_memory_gate(tmp_path, world, capsys, ray_session):
    root = Storage(str(tmp_path / "root"))
    publish_v0(root, world)
    register_consumer(root, world, tmp_path, capsys)
    emb, b = candidate(root, world, "good")
    assert cli.main(["register", *flags(root), "--version", "1", "--embeddings", f"users={emb}", "--aligner", b]) == cli.EXIT_OK
    capsys.readouterr()
    code, out, err = gate(root, capsys)  # no --embeddings: the published v1 and its B_1
    assert code == cli.EXIT_OK and "accepted" in out, err
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b)
    assert code == cli.EXIT_CONFIG and "v1 is already published" in err
    # the file-based gate scores exactly what the in-memory gate scores on the whole table
    reg = Registry(root)
    g = PublishGate(root, options=GateOptions(max_degradation=0.02))
    store, names = parquet_files(emb)
    from_files = g.evaluate_files(1, aligner=reg.aligner(1), files={"users": (store, names)})
    in_memory = g.evaluate(1, aligner=reg.aligner(1), embeddings={"users": read_version_embeddings(reg, 1, "users")})
    assert [r.candidate_auc for r in from_files.rows] == pytest.approx([r.candidate_auc for r in in_memory.rows], abs=1e-9)
    assert from_files.ok and in_memory.scanned is None and from_files.scanned["users"]["rows"] == ROWS
    # check_files: the same report, and GateRefused past the threshold (here: B truncates instead of inverting)
    from raybc.gate import GateRefused
    from raybc.transforms import Affine

    shown: list[str] = []
    assert g.check_files(1, aligner=reg.aligner(1), files={"users": (store, names)}, echo=shown.append).ok and "accepted" in shown[-1]
    with pytest.raises(GateRefused, match=r"(?s)consumer 'activity-team' \(user-activity, trained on v0\).*nothing was published") as refused:
        g.check_files(1, aligner=Affine(np.eye(D0, D1, dtype=np.float32)), files={"users": (store, names)}, echo=shown.append)
    assert "REFUSED" in shown[-1] and not refused.value.report.ok and refused.value.report.scanned["users"]["rows"] == ROWS
    # the consumer's entity must be given
    with pytest.raises(ConfigError, match=r"no 'users' embeddings for candidate v2, but consumer\(s\) 'activity-team' need them"):
        g.evaluate_files(2, aligner=reg.aligner(1), files={"items": (store, names)})


@pytest.mark.cluster
def test_consumers_list_and_remove_round_trip(tmp_path, world, capsys, ray_session):
    root = Storage(str(tmp_path / "root"))
    publish_v0(root, world)
    info = register_consumer(root, world, tmp_path, capsys)
    assert cli.main(["consumers", "list", *flags(root)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert NAME in out and TASK in out and "v0" in out and f"{info['baseline_auc']:.4f}" in out and f"{LABELLED:,} label rows" in out
    assert cli.main(["consumers", "list", *flags(root), "--json"]) == cli.EXIT_OK
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["name"], row["task"], row["version"], row["label_rows"]) == (NAME, TASK, 0, LABELLED)
    # registering the name again is refused before any work
    labels = put_parquet(tmp_path / "again.parquet", world["labels"])
    code = cli.main(["consumers", "register", *flags(root), "--name", NAME, "--task", TASK, "--labels", labels, "--version", "0"])
    assert code == cli.EXIT_CONFIG and "already registered" in capsys.readouterr().err

    assert cli.main(["consumers", "remove", *flags(root), "--name", NAME]) == cli.EXIT_OK
    assert f"removed consumer {NAME!r}" in capsys.readouterr().out
    assert not root.walk_files("consumers") and ConsumerStore(root).names() == []
    assert cli.main(["consumers", "list", *flags(root)]) == cli.EXIT_OK
    assert "no consumers registered" in capsys.readouterr().out
    assert cli.main(["consumers", "remove", *flags(root), "--name", NAME]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"no consumer {NAME!r} registered" in err and "Traceback" not in err
    # registered again, with the recipe's fields as flags
    code = cli.main(["consumers", "register", *flags(root), "--name", NAME, "--task", TASK, "--labels", labels, "--version", "0",
                     "--hidden", "8", "--epochs", "60", "--json"])  # fmt: skip
    assert code == cli.EXIT_OK and json.loads(capsys.readouterr().out)["hidden"] == 8
    assert ConsumerStore(root).load(NAME).consumer.spec["recipe"]["epochs"] == 60
    assert cli.main(["consumers", "remove", *flags(root), "--name", NAME]) == cli.EXIT_OK
    capsys.readouterr()
    # with no consumer left, a candidate has nobody to refuse it
    emb, b = candidate(root, world, "bad")
    code, out, err = gate(root, capsys, "--embeddings", f"users={emb}", "--aligner", b)
    assert code == cli.EXIT_OK and "nothing to check" in out


def test_remove_drops_the_spec_first(storage_root, world):
    """A removal cut short after its first delete leaves an unlisted consumer, never a listed one
    without its files; removing again finishes. (Embeddings given directly: no Ray needed.)"""
    root = storage_root
    ids, z0 = world["ids"], world["z0"]
    labels = labels_from_table(world["labels"], TASK, version=0, source="labels")
    store = ConsumerStore(root)
    store.register(NAME, labels, version=0, recipe=ConsumerOptions(**_recipe()), embeddings={"users": make_table(ids, z0)})
    assert store.names() == [NAME]

    class Cut(Exception):
        pass

    real_remove, calls = root.remove, []

    def remove_once(rel, **kw):
        if calls:
            raise Cut(rel)
        calls.append(rel)
        real_remove(rel, **kw)

    root.remove = remove_once
    with pytest.raises(Cut):
        store.remove(NAME)
    root.remove = real_remove
    assert calls == [f"consumers/{NAME}/consumer.json"]
    assert store.names() == [] and root.exists(f"consumers/{NAME}/labels.parquet")
    with pytest.raises(RegistryError, match=f"no consumer {NAME!r} registered"):
        store.load(NAME)
    removed = store.remove(NAME)  # the leftovers
    assert len(removed) == 2 and not root.walk_files("consumers")
    with pytest.raises(RegistryError, match=r"no consumer 'activity-team' registered .*raybc consumers list"):
        store.remove(NAME)


def _recipe() -> dict:
    import yaml

    return yaml.safe_load(RECIPE)


# --------------------------------------------------------------------------- bad usage: exit 2, nothing started


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda t: t.drop_columns(["split"]), r"columns \['split'\] are missing"),
        (lambda t: t.set_column(1, "label", pa.array([2] + [0, 1] * 299 + [1], pa.int64())), r"column 'label' holds 2 at row 0 \(1 row\(s\) not 0/1\)"),
        (lambda t: t.set_column(2, "split", pa.array(["training"] * t.num_rows)), r"column 'split' holds 'training' at row 0"),
        (lambda t: t.set_column(0, "id", pa.array([1.5] * t.num_rows)), r"column 'id' has type double; ids must be integers or UTF-8"),
        (lambda t: t.rename_columns(["user_id", "label", "split"]), r"columns \['id'\] are missing .*user tasks need id"),
        (lambda t: t.set_column(1, "label", pa.array([1] * t.num_rows, pa.int8())), r"split 'train' has \d+ row\(s\) and a single class"),
    ],
)
def test_malformed_labels_exit_2_naming_the_file_and_column(tmp_path, world, capsys, change, named):
    root = Storage(str(tmp_path / "root"))
    publish_v0(root, world)  # a real registry: the labels are what is wrong
    path = put_parquet(tmp_path / "labels.parquet", change(world["labels"]))
    code = cli.main(["consumers", "register", "--root", root.uri(), "--name", NAME, "--task", TASK, "--labels", path, "--version", "0"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    assert path in err and "Traceback" not in err
    import re

    assert re.search(named, err), err
    assert ConsumerStore(root).names() == []


def test_labels_that_are_not_parquet_or_missing_exit_2(tmp_path, world, capsys):
    publish_v0(Storage(str(tmp_path / "r")), world)  # a real registry: the labels are what is wrong
    bogus = tmp_path / "labels.parquet"
    bogus.write_text("id,label,split\n1,0,train\n")
    for path, text in ((str(bogus), "is not a readable Parquet file"), (str(tmp_path / "nope.parquet"), "no such file")):
        code = cli.main(["consumers", "register", "--root", str(tmp_path / "r"), "--name", NAME, "--task", TASK, "--labels", path, "--version", "0"])
        err = capsys.readouterr().err
        assert code == cli.EXIT_CONFIG and f"--labels: {path}" in err and text in err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("hiden: [8]\nepochs: 0\n")
    code = cli.main(["consumers", "register", "--root", str(tmp_path / "r"), "--name", NAME, "--task", TASK, "--labels", str(bogus),
                     "--version", "0", "--recipe", str(recipe)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG and str(recipe) in err and "hiden: unknown field" in err and "epochs:" in err


def test_gate_usage_errors_exit_2_before_any_work(tmp_path, world, capsys):
    root = Storage(str(tmp_path / "root"))
    publish_v0(root, world)
    code, _, err = gate(root, capsys, "--embeddings", "users=/a/users", "--embeddings", "users=/b/users", "--aligner", "/b.npy")
    assert code == cli.EXIT_CONFIG and "--embeddings: entity 'users' is given twice (/a/users and /b/users)" in err
    code, _, err = gate(root, capsys, "--embeddings", "users", "--aligner", "/b.npy")
    assert code == cli.EXIT_CONFIG and "expected ENTITY=URI" in err
    code, _, err = gate(root, capsys, "--embeddings", f"users={tmp_path / 'absent'}", "--aligner", "/b.npy")
    assert code == cli.EXIT_CONFIG and "absent: no such file or folder" in err
    code, _, err = gate(root, capsys, "--embeddings", "users=/a", "--max-degradation", "1.5")
    assert code == cli.EXIT_CONFIG and "max_degradation" in err and "--aligner: a candidate given by --embeddings needs its B_1" not in err
    code, _, err = gate(root, capsys, "--embeddings", "users=/a")
    assert code == cli.EXIT_CONFIG and "--aligner: a candidate given by --embeddings needs its B_1" in err
    code, _, err = gate(root, capsys)
    assert code == cli.EXIT_CONFIG and "v1 is not published" in err and "--embeddings ENTITY=URI" in err
    assert cli.main(["gate", "--root", root.uri(), "--version", "0"]) == cli.EXIT_CONFIG
    assert "no older version" in capsys.readouterr().err
    assert cli.main(["consumers", "frobnicate"]) == cli.EXIT_CONFIG
    assert "unknown action 'frobnicate'" in capsys.readouterr().err
    assert cli.main(["--help"]) == cli.EXIT_OK
    helptext = capsys.readouterr().out
    assert "  consumers " in helptext and "  gate " in helptext


# --------------------------------------------------------------------------- pure pieces


def test_group_files_cuts_consecutive_near_equal_runs():
    names = [f"f{i}" for i in range(10)]
    assert group_files(names, 3) == [names[0:3], names[3:7], names[7:10]]
    assert group_files(names, 40) == [[n] for n in names]
    assert group_files(names[:1], 8) == [names[:1]]
    assert sum(group_files(names, 4), []) == names


def test_labels_from_table_normalises_types():
    t = pa.table({
        "user_id": pa.array([1, 2, 3, 4], pa.int32()), "item_id": ["a", "b", "c", "d"],
        "label": [True, False, True, False], "split": ["train", "train", "val", "val"],
    })  # fmt: skip
    lab = labels_from_table(t, "binary-edge-rating", version=3, source="x.parquet")
    assert isinstance(lab, TaskLabels) and lab.version == 3 and lab.kind == "edge"
    assert lab.table.schema.field("user_id").type == pa.int64() and lab.table.schema.field("label").type == pa.int8()
    assert lab.table.column_names == ["user_id", "item_id", "label", "split"]
    with pytest.raises(ConfigError, match=r"(?s)in x\.parquet .*columns \['item_id'\] are missing"):
        labels_from_table(t.drop_columns(["item_id"]), "binary-edge-rating", version=0, source="x.parquet")


def test_filter_files_keeps_labelled_rows_by_hash_and_by_search(tmp_path):
    """The filter task's body in process: the same rows whichever matcher the id set's size picks;
    NaN refused in a labelled row only; label and file id kinds must agree."""
    from raybc.errors import InputDataError
    from raybc.gate import SORTED_MATCH_MIN_IDS, filter_files

    rng = np.random.default_rng(1)
    store = Storage(str(tmp_path / "z"))
    ids = np.arange(3000, dtype=np.int64) * 3
    z = rng.normal(size=(3000, 4)).astype(np.float32)
    z[7, 2] = np.nan  # an unlabelled row: not the gate's business
    names = write_files(store, ids, z, files=3)
    wanted = rng.choice(np.delete(ids, 7), 50, replace=False)
    absent = np.arange(SORTED_MATCH_MIN_IDS + 10, dtype=np.int64) * 3 + 1  # never an id in the files
    small = filter_files(store, names, pa.array(wanted), None)
    large = filter_files(store, names, pa.array(np.concatenate([absent, wanted])), None)
    assert small["rows"] == large["rows"] == 3000 and small["dim"] == 4
    assert small["table"].equals(large["table"]) and small["table"].num_rows == 50
    got = small["table"].column("id").to_numpy()
    np.testing.assert_array_equal(np.sort(got), np.sort(wanted))
    np.testing.assert_array_equal(np.stack(small["table"].column("embedding").to_numpy(zero_copy_only=False)), z[got // 3])
    with pytest.raises(InputDataError, match=r"part-00000\.parquet: row 7 \(id 21\) holds NaN or Inf"):
        filter_files(store, names, pa.array(np.r_[wanted, 21]), None)
    with pytest.raises(InputDataError, match=r"part-00000\.parquet: ids are integers but the consumers' labels name rows by string ids"):
        filter_files(store, names, pa.array(["a", "b"]), None)
    with pytest.raises(InputDataError, match=r"part-00000\.parquet: column 'embedding' has dimension 4, but this version's embeddings have 6"):
        filter_files(store, names, pa.array(wanted), 6)


@pytest.mark.cluster
@pytest.mark.slow
def test_register_runs_the_gate_and_a_refused_version_publishes_nothing(tmp_path, world, capsys, ray_session):
    root = Storage(str(tmp_path / "root"))
    publish_v0(root, world)
    register_consumer(root, world, tmp_path, capsys)
    reg = Registry(root)
    emb, b = candidate(root, world, "bad")  # an unrelated model's z_1, B_1 its truncation
    # the measured check alone refuses it (it maps z_1 further from z_0 than zeros would) ...
    assert cli.main(["register", *flags(root), "--version", "1", "--embeddings", f"users={emb}", "--aligner", b]) == cli.EXIT_FAILED
    assert "further from the stored z_0 than mapping every vector to zeros" in capsys.readouterr().err
    # ... and with the check skipped, the publish gate refuses it, naming the consumer
    code = cli.main(["register", *flags(root), "--version", "1", "--embeddings", f"users={emb}", "--aligner", b, "--check-rows", "0"])
    out = capsys.readouterr()
    assert code == cli.EXIT_FAILED and "publish gate refused v1" in out.err and NAME in out.err, out.err
    assert "REFUSED" in out.out
    assert reg.versions() == [0] and not root.exists("registry/v1/aligner.safetensors") and not root.walk_files("embeddings/v1")
    # a B that passes the check but drops the two dimensions the consumer reads: the gate refuses it too
    z1, good = world["good"]
    broken = good.copy()
    broken[:2] = 0  # B z_1 = z_0 with dims 0 and 1 zeroed: relative error ~0.25 < 1, the consumer's signal gone
    inbox = root.child("incoming", "broken")
    write_files(inbox.child("users"), world["ids"], z1)
    code = cli.main(["register", *flags(root), "--version", "1", "--embeddings", f"users={inbox.uri('users')}",
                     "--aligner", put_npy(inbox, "b1.npy", broken)])  # fmt: skip
    out = capsys.readouterr()
    assert code == cli.EXIT_FAILED and "publish gate refused v1" in out.err, out.err
    assert reg.versions() == [0] and not root.walk_files("embeddings/v1")
    # the compatible candidate passes the check and the gate, and is published
    emb, b = candidate(root, world, "good")
    assert cli.main(["register", *flags(root), "--version", "1", "--embeddings", f"users={emb}", "--aligner", b]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "publish gate for v1" in out and "accepted" in out
    assert Registry(root).versions() == [0, 1]
