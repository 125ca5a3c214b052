"""Consumer tasks: the paper's five unintended tasks, their labels, the consumer MLP and ROC-AUC.

A *consumer* is a model someone else trained on one version's embeddings and never retrains. The
paper measures backward compatibility with five of them (DESIGN.md), each built from the window
that follows a version's cut, W_k = (t_k, t_{k+1}] of :class:`~raybc.data.slicing.VersionSlice` k:

- ``binary-edge-rating``: every W_k edge; label rating >= 4; input concat(user, item).
- ``user-activity``: users that existed at t_k; label: any interaction in W_k.
- ``user-positive-activity``: the same users; label: max W_k rating >= 4 (0 without interactions).
- ``binary-item-rating-avg``: items with >= ``min_item_ratings`` W_k ratings; label: their mean
  rating >= the median of those means.
- ``binary-item-rating-std``: the same items; label: rating std >= 1.

Labels carry the data set's own ids (never internal indices), so features are joined from any
snapshot exactly as a consumer would. :class:`Consumer` is the MLP (standardisation with the
training features' statistics, hidden layer, ReLU, dropout, logit), with hidden size and dropout
chosen on a validation split and one model per seed; its score is the mean ROC-AUC over seeds.
:func:`roc_auc` is the rank-based ROC-AUC (ties get average ranks).

This module does not read storage and does not decide about publishing (see ``gate``) or run the
protocol (see ``experiment``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import Field, field_validator
from torch import nn

from raybc.data.interactions import InteractionData
from raybc.data.slicing import VersionSlice
from raybc.embeddings import read_matrix
from raybc.errors import ConfigError, InputDataError
from raybc.options import Options

TASKS: tuple[str, ...] = (
    "binary-edge-rating",
    "user-activity",
    "user-positive-activity",
    "binary-item-rating-avg",
    "binary-item-rating-std",
)
# What a task's rows are: the entities whose embeddings make its input.
TASK_KIND: dict[str, Literal["edge", "user", "item"]] = {
    "binary-edge-rating": "edge",
    "user-activity": "user",
    "user-positive-activity": "user",
    "binary-item-rating-avg": "item",
    "binary-item-rating-std": "item",
}
# A rating of 4 or 5 (of 5) is a positive rating, as in the paper.
POSITIVE_RATING = 4.0
# Ratings an item needs in the window before its mean and spread count as labels (the paper's 10).
MIN_ITEM_RATINGS = 10
# Rating standard deviation that makes an item "controversial".
STD_THRESHOLD = 1.0
# Share of version-0 labels held out for choosing hidden/dropout and for the reported v0 score.
VAL_FRACTION, TEST_FRACTION = 0.2, 0.2
SPLITS = ("train", "val", "test")


class ConsumerOptions(Options):
    """The consumer recipe: grid searched on version-0 validation, seeds, optimisation."""

    hidden: list[int] = Field(default=[32, 128], description="Hidden sizes tried on the validation split.")
    dropout: list[float] = Field(default=[0.0, 0.3], description="Dropout rates tried on the validation split.")
    seeds: list[int] = Field(default=[0, 1, 2], description="One model per seed; scores are averaged over them.")
    epochs: int = Field(default=300, ge=1, le=100_000, description="Full-batch Adam steps.")
    eval_every: int = Field(default=10, ge=1, description="Validation ROC-AUC checks; the best step's weights are kept.")
    lr: float = Field(default=3e-3, gt=0, le=1)
    weight_decay: float = Field(default=1e-4, ge=0)
    min_item_ratings: int = Field(default=MIN_ITEM_RATINGS, ge=1)
    split_seed: int = 0
    layers: int = Field(default=1, ge=1, le=8, description="Hidden layers (the authors' MLP: 2).")
    batch_norm: bool = Field(default=False, description="BatchNorm after each hidden layer's linear map (the authors' MLP: true).")
    select_on_next_version: list[str] = Field(
        default_factory=list,
        description="Tasks trained on every version-0 row, with hidden/dropout and the early stop chosen on version 1's rows "
        "(the authors' rule for user-activity and user-positive-activity); their version-1 scores are left out of the averages.",
    )

    @field_validator("select_on_next_version")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if t not in TASKS]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
        return list(dict.fromkeys(v))

    @field_validator("hidden", "seeds")
    @classmethod
    def _non_empty_ints(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one value")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropouts(cls, v: list[float]) -> list[float]:
        if not v or any(not (0.0 <= p < 1.0) for p in v):
            raise ValueError("give dropout rates in [0, 1)")
        return v


# --------------------------------------------------------------------------- metric


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC by ranks (Mann-Whitney U); tied scores share their average rank. NaN with one class."""
    y = np.asarray(y).astype(bool).reshape(-1)
    s = np.asarray(score, dtype=np.float64).reshape(-1)
    assert y.shape == s.shape, f"labels {y.shape} and scores {s.shape} must have one entry per row"
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    # average rank (1-based) of each group of equal scores
    uniq_start = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    uniq_end = np.r_[uniq_start[1:], s.size]
    avg = (uniq_start + uniq_end + 1) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, uniq_end - uniq_start)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# --------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class TaskLabels:
    """One task's labelled rows at one version, by the data set's own ids.

    ``table`` columns: ``id`` (user or item tasks) or ``user_id`` + ``item_id`` (edge tasks),
    ``label`` (int8, 0/1) and ``split`` ("train", "val", "test"; only meaningful where a consumer
    is trained, i.e. version 0).
    """

    task: str
    version: int
    table: pa.Table

    @property
    def kind(self) -> str:
        return TASK_KIND[self.task]

    @property
    def labels(self) -> np.ndarray:
        return self.table.column("label").to_numpy().astype(np.int8)

    def split(self, name: str) -> TaskLabels:
        return TaskLabels(self.task, self.version, self.table.filter(pc.equal(self.table.column("split"), name)))

    @property
    def rows(self) -> int:
        return self.table.num_rows


def window_edges(data: InteractionData, sl: VersionSlice) -> np.ndarray:
    """Positions of the edges in W_k = (t_k, t_{k+1}] (both the new users' and the validation edges)."""
    lo = np.searchsorted(data.timestamp, sl.t_end, side="right")
    hi = np.searchsorted(data.timestamp, sl.t_next, side="right")
    return np.arange(lo, hi, dtype=np.int64)


def _splits(n: int, seed: int) -> pa.Array:
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    out = np.where(u < TEST_FRACTION, "test", np.where(u < TEST_FRACTION + VAL_FRACTION, "val", "train"))
    return pa.array(out.astype(object), type=pa.string())


def build_labels(
    data: InteractionData, sl: VersionSlice, task: str, *, min_item_ratings: int = MIN_ITEM_RATINGS, split_seed: int = 0
) -> TaskLabels:
    """The labelled rows of ``task`` for version ``sl.version`` (see the module doc)."""
    if task not in TASK_KIND:
        raise ConfigError([f"task: unknown consumer task {task!r}; choose one of: {', '.join(TASKS)}"])
    w = window_edges(data, sl)
    wu, wi, wr = data.user[w], data.item[w], data.rating[w]
    if task == "binary-edge-rating":
        cols = {"user_id": data.user_ids.take(pa.array(wu)), "item_id": data.item_ids.take(pa.array(wi)), "label": (wr >= POSITIVE_RATING)}
    elif task in ("user-activity", "user-positive-activity"):
        users = sl.existing_users
        if task == "user-activity":
            label = np.isin(users, wu)
        else:
            best = np.zeros(data.n_users, dtype=np.float32)
            np.maximum.at(best, wu, wr)
            label = best[users] >= POSITIVE_RATING
        cols = {"id": data.user_ids.take(pa.array(users)), "label": label}
    else:
        count = np.bincount(wi, minlength=data.n_items)
        total = np.bincount(wi, weights=wr, minlength=data.n_items)
        sq = np.bincount(wi, weights=wr.astype(np.float64) ** 2, minlength=data.n_items)
        items = np.flatnonzero(count >= min_item_ratings)
        mean = total[items] / count[items]
        if task == "binary-item-rating-avg":
            label = mean >= (np.median(mean) if len(mean) else 0.0)
        else:
            std = np.sqrt(np.maximum(sq[items] / count[items] - mean**2, 0.0))
            label = std >= STD_THRESHOLD
        cols = {"id": data.item_ids.take(pa.array(items)), "label": label}
    n = len(cols["label"])
    table = pa.table({**{k: v for k, v in cols.items() if k != "label"}, "label": pa.array(np.asarray(cols["label"], dtype=np.int8)), "split": _splits(n, split_seed + sl.version)})
    return TaskLabels(task, sl.version, table)


def build_all_labels(data: InteractionData, sl: VersionSlice, *, tasks: Sequence[str] = TASKS, min_item_ratings: int = MIN_ITEM_RATINGS, split_seed: int = 0) -> dict[str, TaskLabels]:
    return {t: build_labels(data, sl, t, min_item_ratings=min_item_ratings, split_seed=split_seed) for t in tasks}


def id_columns(task: str) -> tuple[str, ...]:
    """The id columns of ``task``'s labels: ``user_id`` + ``item_id`` for edge tasks, else ``id``."""
    return ("user_id", "item_id") if TASK_KIND[task] == "edge" else ("id",)


def labels_from_table(table: pa.Table, task: str, *, version: int, source: str) -> TaskLabels:
    """Labels written by someone else, checked against the layout of :class:`TaskLabels`.

    Every problem is reported at once (:class:`ConfigError` naming ``source`` and the column) before
    any training starts. Ids become int64 (integers) or stay UTF-8; labels become int8.
    """
    if task not in TASK_KIND:
        raise ConfigError([f"task: unknown consumer task {task!r}; choose one of: {', '.join(TASKS)}"], source=source)
    problems: list[str] = []
    need = (*id_columns(task), "label", "split")
    absent = [c for c in need if c not in table.column_names]
    if absent:
        hint = "edge tasks need user_id and item_id" if TASK_KIND[task] == "edge" else f"{TASK_KIND[task]} tasks need id"
        problems.append(f"columns {absent} are missing (found {table.column_names}); {task} labels need {list(need)} ({hint})")
    if table.num_rows == 0:
        problems.append("the file holds no rows; a consumer needs labelled rows")
    cols: dict[str, pa.Array] = {}
    for c in id_columns(task):
        if c not in table.column_names:
            continue
        a = table.column(c).combine_chunks()
        if pa.types.is_integer(a.type):
            a = a.cast(pa.int64())
        elif not (pa.types.is_string(a.type) or pa.types.is_large_string(a.type)):
            problems.append(f"column {c!r} has type {a.type}; ids must be integers or UTF-8 strings, as in the embeddings")
        if a.null_count:
            problems.append(f"column {c!r} has {a.null_count} null id(s) (first at row {_first_null(a)}); every row needs its id")
        cols[c] = a
    if "label" in table.column_names:
        a = table.column("label").combine_chunks()
        if not (pa.types.is_integer(a.type) or pa.types.is_boolean(a.type) or pa.types.is_floating(a.type)):
            problems.append(f"column 'label' has type {a.type}; give 0/1 integers")
        elif a.null_count:
            problems.append(f"column 'label' has {a.null_count} null(s) (first at row {_first_null(a)}); give every row 0 or 1")
        else:
            v = a.to_numpy(zero_copy_only=False).astype(np.float64)
            bad = np.flatnonzero((v != 0) & (v != 1))
            if bad.size:
                problems.append(f"column 'label' holds {a[int(bad[0])].as_py()!r} at row {int(bad[0])} ({bad.size} row(s) not 0/1); labels are 0 or 1")
            else:
                cols["label"] = pa.array(v.astype(np.int8))
    if "split" in table.column_names:
        a = table.column("split").combine_chunks()
        if not (pa.types.is_string(a.type) or pa.types.is_large_string(a.type)):
            problems.append(f"column 'split' has type {a.type}; give the strings {', '.join(SPLITS)}")
        else:
            ok = pc.fill_null(pc.is_in(a, value_set=pa.array(SPLITS, a.type)), False).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~ok)
            if bad.size:
                problems.append(
                    f"column 'split' holds {a[int(bad[0])].as_py()!r} at row {int(bad[0])} ({bad.size} row(s)); "
                    f"each row's split is one of {', '.join(SPLITS)}"
                )
            else:
                cols["split"] = a.cast(pa.string())
    if "label" in cols and "split" in cols:
        y, split = cols["label"].to_numpy(), np.asarray(cols["split"].to_pylist())
        for s in ("train", "val"):  # the consumer is fitted on train and chosen on val
            ys = y[split == s]
            if len(np.unique(ys)) < 2:
                problems.append(f"split {s!r} has {len(ys)} row(s) and {'no' if not len(ys) else 'a single'} class; it needs both 0 and 1 labels")
    if problems:
        raise ConfigError(problems, source=source)
    return TaskLabels(task, int(version), pa.table({**{c: cols[c] for c in id_columns(task)}, "label": cols["label"], "split": cols["split"]}))


def _first_null(a: pa.Array) -> int:
    return int(np.flatnonzero(a.is_null().to_numpy(zero_copy_only=False))[0])


# --------------------------------------------------------------------------- features


def _lookup(ids: pa.Array, table: pa.Table, *, what: str, source: str) -> np.ndarray:
    """Rows of ``table`` (id, embedding) for ``ids``; InputDataError names the first missing id."""
    tids = table.column("id").combine_chunks()
    if pa.types.is_integer(tids.type):
        ids = ids.cast(pa.int64())
        tids = tids.cast(pa.int64())
    idx = pc.index_in(ids, value_set=tids)
    if idx.null_count:
        missing = ids.filter(pc.is_null(idx))
        raise InputDataError(
            f"{source}: {idx.null_count} {what} id(s) of the labels have no embedding (first: {missing[0].as_py()!r}); "
            "the labels must come from the same data set and a version whose graph holds them"
        )
    _, mat = read_matrix(table)
    return mat[idx.to_numpy()]


def features(labels: TaskLabels, embeddings: Mapping[str, pa.Table], *, source: str = "embeddings") -> np.ndarray:
    """The consumer input of every labelled row, joined by id from ``{"users": table, "items": table}``."""
    t = labels.table
    if labels.kind == "edge":
        u = _lookup(t.column("user_id").combine_chunks(), embeddings["users"], what="user", source=source)
        i = _lookup(t.column("item_id").combine_chunks(), embeddings["items"], what="item", source=source)
        return np.concatenate([u, i], axis=1)
    entity = "users" if labels.kind == "user" else "items"
    return _lookup(t.column("id").combine_chunks(), embeddings[entity], what=labels.kind, source=source)


# --------------------------------------------------------------------------- the consumer model


class _MLP(nn.Module):
    """Standardise -> [linear (-> BatchNorm) -> ReLU -> dropout] x layers -> logit.

    One layer without BatchNorm is raybc's first consumer (tensor names fc1/fc2 unchanged); the
    authors' ``recsys/models/mlp.py`` is two layers with BatchNorm (here each hidden layer also gets
    the ReLU the authors' second layer lacks).
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float, *, layers: int = 1, batch_norm: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.fc1 = nn.Linear(in_dim, hidden)
        self.more = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers - 1))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers if batch_norm else 0))
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, in_dim) -> (n,) logits
        h = (x - self.mean) / self.std
        for j, lin in enumerate([self.fc1, *self.more]):
            h = lin(h)
            if self.norms:
                h = self.norms[j](h)
            h = self.drop(torch.relu(h)) if j < len(self.more) else torch.relu(h)
        return self.fc2(self.drop(h)).squeeze(-1)


def _fit_one(x_tr, y_tr, x_va, y_va, *, hidden: int, dropout: float, seed: int, options: ConsumerOptions) -> tuple[_MLP, float]:
    """Full-batch Adam with BCE; keeps the weights of the best validation ROC-AUC check."""
    torch.manual_seed(seed)
    m = _MLP(x_tr.shape[1], hidden, dropout, layers=options.layers, batch_norm=options.batch_norm)
    mean = x_tr.mean(0)
    m.mean.copy_(mean)
    m.std.copy_(x_tr.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(m.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    pos = float(y_tr.sum())
    # class balance: positives weigh as much as negatives in total, so rare labels still train
    pos_weight = torch.tensor((len(y_tr) - pos) / max(pos, 1.0))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    best, best_state = -1.0, None
    for step in range(1, options.epochs + 1):
        m.train()
        loss = loss_fn(m(x_tr), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % options.eval_every == 0 or step == options.epochs:
            m.eval()
            with torch.no_grad():
                auc = roc_auc(y_va.numpy(), m(x_va).numpy())
            if np.isnan(auc):
                auc = 0.5
            if auc > best:
                best, best_state = auc, {k: v.clone() for k, v in m.state_dict().items()}
    assert best_state is not None
    m.load_state_dict(best_state)
    m.eval()
    return m, best


class Consumer:
    """A trained consumer: one MLP per seed with the chosen hidden size and dropout.

    ``spec`` holds everything that rebuilds it from its tensors (task, input dim, hidden, dropout,
    seeds, the version it was trained on, its validation/test scores).
    """

    def __init__(self, spec: dict, models: list[_MLP]):
        self.spec = dict(spec)
        self.models = models

    @property
    def task(self) -> str:
        return str(self.spec["task"])

    @property
    def version(self) -> int:
        return int(self.spec["version"])

    @property
    def in_dim(self) -> int:
        return int(self.spec["in_dim"])

    @staticmethod
    def fit(
        labels: TaskLabels, x: np.ndarray, *, options: ConsumerOptions | None = None, validation: tuple[np.ndarray, np.ndarray, int] | None = None
    ) -> Consumer:
        """Choose hidden/dropout by mean validation ROC-AUC over seeds; keep one model per seed.

        ``validation`` = (features, labels, version): choose and early-stop on these rows (another
        version's, e.g. version 1 through the same embedding model) and train on every row of
        ``labels``, all splits; ``spec["selected_on_version"]`` records it and ``test_auc`` is None.
        """
        options = options or ConsumerOptions()
        y = labels.labels.astype(np.float32)
        split = np.asarray(labels.table.column("split").to_pylist())
        as_t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a, dtype=dt))  # noqa: E731
        parts = {s: (as_t(x[split == s], np.float32), torch.from_numpy(y[split == s])) for s in SPLITS}
        if validation is not None:
            parts["train"] = (as_t(x, np.float32), torch.from_numpy(y))
            parts["val"] = (as_t(validation[0], np.float32), as_t(validation[1], np.float32))
        for s in ("train", "val"):
            yy = parts[s][1].numpy()
            if len(yy) == 0 or yy.min() == yy.max():
                raise InputDataError(
                    f"consumer task {labels.task} at v{labels.version}: the {s} split has {len(yy)} rows of a single class; "
                    "use more data or lower min_item_ratings"
                )
        scores: dict[tuple[int, float], list[float]] = {}
        fitted: dict[tuple[int, float], list[_MLP]] = {}
        for h in options.hidden:
            for p in options.dropout:
                runs = [_fit_one(*parts["train"], *parts["val"], hidden=h, dropout=p, seed=s, options=options) for s in options.seeds]
                fitted[(h, p)] = [m for m, _ in runs]
                scores[(h, p)] = [a for _, a in runs]
        (h, p) = max(scores, key=lambda k: (float(np.mean(scores[k])), -k[0], -k[1]))
        c = Consumer(
            {
                "task": labels.task, "kind": labels.kind, "version": labels.version, "in_dim": int(x.shape[1]),
                "hidden": h, "dropout": p, "seeds": list(options.seeds), "val_auc": float(np.mean(scores[(h, p)])),
                "layers": options.layers, "batch_norm": options.batch_norm,
                "grid": {f"hidden={k[0]},dropout={k[1]}": float(np.mean(v)) for k, v in scores.items()},
                "recipe": options.model_dump(),
                **({} if validation is None else {"selected_on_version": int(validation[2])}),
            },
            fitted[(h, p)],
        )  # fmt: skip
        if validation is not None:  # every v0 row was trained on: nothing is held out
            c.spec["test_auc"] = None
            return c
        c.spec["test_auc"] = c.score(parts["test"][0].numpy(), parts["test"][1].numpy())["auc"]
        return c

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n_seeds, n) scores."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise InputDataError(
                f"consumer {self.task} (trained on v{self.version}) takes {self.in_dim}-dim inputs, got {tuple(x.shape)}; "
                f"give it version-{self.version}-compatible embeddings"
            )
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        with torch.no_grad():
            return np.stack([m(xt).numpy() for m in self.models])

    def score(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """ROC-AUC per seed, their mean and standard deviation."""
        per_seed = [roc_auc(y, s) for s in self.predict(x)]
        return {"auc": float(np.mean(per_seed)), "auc_std": float(np.std(per_seed)), "rows": int(len(y)), "positives": int(np.sum(y))}

    # -- persistence: tensors (safetensors) + spec (JSON), loadable without pickle

    def tensors(self) -> dict[str, np.ndarray]:
        return {f"seed{i}.{k}": v.detach().cpu().numpy() for i, m in enumerate(self.models) for k, v in m.state_dict().items()}

    def spec_json(self) -> str:
        return json.dumps(self.spec, sort_keys=True, indent=1)

    @staticmethod
    def from_tensors(spec: dict, tensors: Mapping[str, np.ndarray]) -> Consumer:
        models = []
        for i in range(len(spec["seeds"])):
            m = _MLP(int(spec["in_dim"]), int(spec["hidden"]), float(spec["dropout"]), layers=int(spec.get("layers", 1)), batch_norm=bool(spec.get("batch_norm", False)))
            state = {k[len(f"seed{i}.") :]: torch.as_tensor(v) for k, v in tensors.items() if k.startswith(f"seed{i}.")}
            m.load_state_dict(state)
            m.eval()
            models.append(m)
        return Consumer(spec, models)


__all__ = [
    "TASKS", "TASK_KIND", "Consumer", "ConsumerOptions", "TaskLabels", "build_all_labels", "build_labels", "features",
    "id_columns", "labels_from_table", "roc_auc", "window_edges",
]  # fmt: skip
