"""Recipe experiments on cached frozen-backbone features (features.py).

A recipe: which passes train the head, whether validation joins the fit pool, the head
trainer, TTA passes, K folds; the voter rules and calibration are all evaluated on the
same fitted heads. Results: per view and ensemble test accuracy, ECE before/after.
"""
from __future__ import annotations

import json
import os
import math
import sys
import time
from dataclasses import dataclass, field, asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from features import path_of  # noqa: E402

from triview import voter as vt  # noqa: E402
from triview.scoring import mean_log_loss  # noqa: E402

torch.set_num_threads(1)
#: where the crops, features and per-view caches live (scratch, not the repository)
ROOT = Path(os.environ.get("TRIVIEW_ENSEMBLE_BENCH", "/tmp/ensemble"))


# ----------------------------------------------------------------------------- data

@lru_cache(maxsize=None)
def view_pass(dataset: str, backbone: str, view: str, name: str):
    """(ids, x, y) of every split that has this pass, concatenated."""
    ids, xs, ys = [], [], []
    for split in ("train", "val", "test"):
        p = path_of(dataset, backbone, view, split, name)
        if p.exists():
            with np.load(p) as z:
                ids.append(z["ids"]), xs.append(z["x"]), ys.append(z["y"])
    ids = np.concatenate(ids)
    return ids, np.concatenate(xs).astype(np.float32), np.concatenate(ys)


@lru_cache(maxsize=None)
def index_of(dataset, backbone, view, name):
    ids = view_pass(dataset, backbone, view, name)[0]
    return {i: k for k, i in enumerate(ids)}


def rows(dataset, backbone, view, name, ids):
    idx = index_of(dataset, backbone, view, name)
    _, x, y = view_pass(dataset, backbone, view, name)
    k = np.array([idx[i] for i in ids])
    return x[k], y[k]


@lru_cache(maxsize=None)
def fixed_split(dataset: str):
    import pandas as pd

    t = pd.read_csv(ROOT / dataset / "views" / "views.csv")
    t = t[t["augmented"] == 0].drop_duplicates("image_id")
    return {s: np.array(sorted(t.loc[t["split"] == s, "image_id"])) for s in ("train", "val", "test")}


def views_of(dataset):
    import pandas as pd

    return list(dict.fromkeys(pd.read_csv(ROOT / dataset / "views" / "views.csv")["view"]))


def labels_of(dataset, ids):
    v = views_of(dataset)[0]
    return rows(dataset, "efficientnet_lite0", v, "clean", ids)[1]


# ----------------------------------------------------------------------------- heads

def class_weights(y, n):
    counts = np.bincount(y, minlength=n).astype(np.float64)
    w = len(y) / (n * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def fit_lbfgs(x, y, n, l2, smoothing=0.1, weighted=True, iters=100):
    x = torch.from_numpy(x)
    yt = torch.from_numpy(y).long()
    w = torch.zeros(x.shape[1], n, requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    crit = torch.nn.CrossEntropyLoss(weight=class_weights(y, n) if weighted else None,
                                     label_smoothing=smoothing)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure():
        opt.zero_grad()
        loss = crit(x @ w + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def fit_adamw(x, y, n, epochs=60, lr=1e-3, wd=1e-4, bs=32, smoothing=0.1, seed=0,
              val=None):
    """The current head phase: AdamW, cosine, minibatch; best epoch on ``val`` (x, y) if given."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], n)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    crit = torch.nn.CrossEntropyLoss(weight=class_weights(y, n), label_smoothing=smoothing)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * -(-len(y) // bs)
    sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    best, state = -1, None
    for e in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), bs):
            idx = order[i:i + bs]
            loss = crit(lin(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sch.step()
        if val is not None:
            with torch.no_grad():
                pred = lin(torch.from_numpy(val[0])).argmax(1).numpy()
            from triview.scoring import macro_f1
            f1 = macro_f1(val[1], pred)
            if f1 > best:
                best, state = f1, {k: v.clone() for k, v in lin.state_dict().items()}
    if state is not None:
        lin.load_state_dict(state)
    return lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy()


def logits(head, x):
    w, b = head
    return x @ w + b


def softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- calibration

def fit_temperature(z, y):
    """T > 0 minimising the NLL of softmax(z / T) (z: logits or log-probabilities)."""
    zt = torch.from_numpy(np.asarray(z, np.float64))
    yt = torch.from_numpy(np.asarray(y)).long()
    logt = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logt], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zt / logt.exp(), yt)
        loss.backward()
        return loss

    opt.step(closure)
    return float(logt.exp().clamp(0.05, 20))


def ece(prob, y, bins=15):
    conf = prob.max(1)
    correct = prob.argmax(1) == y
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(total)


# ----------------------------------------------------------------------------- recipe

@dataclass
class Recipe:
    dataset: str = "hym"
    backbone: str = "efficientnet_lite0"
    train_passes: tuple = ("clean",)
    tta: tuple = ("clean",)
    pool: bool = True            # validation joins the fit pool (cross-fitted over both)
    head: str = "lbfgs"          # lbfgs | adamw_best (val epoch) | adamw_fixed
    l2: float = 1e-3             # lbfgs; <0: choose from L2_GRID by OOF log-loss
    adamw_epochs: int = 60
    folds: int = 5
    smoothing: float = 0.1
    views: tuple = ()


from triview.train.head import L2_GRID  # noqa: E402


def _fit(r: Recipe, view, fit_ids, n, seed, l2, val_xy=None):
    xs, ys = [], []
    for p in r.train_passes:
        x, y = rows(r.dataset, r.backbone, view, p, fit_ids)
        xs.append(x), ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    if r.head == "lbfgs":
        return fit_lbfgs(x, y, n, l2, r.smoothing)
    if r.head == "adamw_best":
        return fit_adamw(x, y, n, epochs=r.adamw_epochs, seed=seed, smoothing=r.smoothing, val=val_xy)
    return fit_adamw(x, y, n, epochs=r.adamw_epochs, seed=seed, smoothing=r.smoothing)


def _predict(r: Recipe, view, head, ids):
    return np.mean([logits(head, rows(r.dataset, r.backbone, view, p, ids)[0]) for p in r.tta], axis=0)


def folds_of(ids, y, k, seed):
    skf = StratifiedKFold(k, shuffle=True, random_state=seed)
    return [(ids[a], ids[b]) for a, b in skf.split(ids, y)]


def _features(r: Recipe, view, ids):
    from triview.train.head import PassFeatures
    names = dict.fromkeys((*r.train_passes, *r.tta))
    passes = {("identity" if p == "clean" else p): rows(r.dataset, r.backbone, view, p, ids)[0] for p in names}
    return PassFeatures(ids, labels_of(r.dataset, ids), passes)


def _lib(p):
    return tuple("identity" if x == "clean" else x for x in p)


def run_view(r: Recipe, view, split, n, seed):
    """Logits of the voter set (OOF) and of test, for one view (triview.train.head)."""
    from triview.train import head as hd
    train, val, test = split["train"], split["val"], split["test"]
    pool = np.concatenate([train, val]) if r.pool else train
    y_pool = labels_of(r.dataset, pool)
    if r.head != "lbfgs":
        return run_view_adamw(r, view, split, n, seed)
    crit = torch.nn.CrossEntropyLoss(weight=class_weights(y_pool, n), label_smoothing=r.smoothing)
    grid = L2_GRID if r.l2 < 0 else (r.l2,)
    cf = hd.cross_fit(_features(r, view, pool), crit, "multiclass", n, train_passes=_lib(r.train_passes),
                      tta=_lib(r.tta), folds=r.folds, seed=seed, l2_grid=grid)
    tz = cf.head.logits(_features(r, view, test), _lib(r.tta))
    vz = cf.head.logits(_features(r, view, val), _lib(r.tta))
    if r.pool:
        voter_ids, voter_z = pool, cf.oof_logits
    else:
        voter_ids, voter_z = np.concatenate([train, val]), np.concatenate([cf.oof_logits, vz])
    return {"voter_ids": voter_ids, "voter_z": voter_z, "test_z": tz, "val_z": vz, "l2": cf.l2}


def run_view_adamw(r: Recipe, view, split, n, seed):
    train, val, test = split["train"], split["val"], split["test"]
    pool = np.concatenate([train, val]) if r.pool else train
    y_pool = labels_of(r.dataset, pool)
    folds = folds_of(pool, y_pool, r.folds, seed)
    val_xy = None
    if r.head == "adamw_best":  # the current recipe: the epoch chosen on validation
        val_xy = (rows(r.dataset, r.backbone, view, "clean", val)[0], labels_of(r.dataset, val))
    z = {}
    for fit_ids, held in folds:
        h = _fit(r, view, fit_ids, n, seed, 0, val_xy)
        for i, row in zip(held, _predict(r, view, h, held)):
            z[i] = row
    oof = np.stack([z[i] for i in pool])
    final = _fit(r, view, pool, n, seed, 0, val_xy)
    if r.pool:
        voter_ids, voter_z = pool, oof
    else:
        voter_ids = np.concatenate([train, val])
        voter_z = np.concatenate([oof, _predict(r, view, final, val)])
    return {"voter_ids": voter_ids, "voter_z": voter_z, "test_z": _predict(r, view, final, test),
            "val_z": _predict(r, view, final, val), "l2": 0}


# ----------------------------------------------------------------------------- voter rules

def candidates(probs_fit: dict, y_fit, n, seed):
    """Each candidate's cross-validated probabilities on the voter set and its params."""
    views = list(probs_fit)
    P = [probs_fit[v] for v in views]
    out = {}
    for method in vt.VOTERS.values():
        if method.name == "single":
            for k, v in enumerate(views):
                out[f"single:{v}"] = ({"view": v, "index": k}, P[k])
        elif not method.fitted:
            out[method.name] = ({}, method.apply({}, P, "multiclass"))
        else:
            res = method.fit(P, y_fit, n, seed)
            if res is not None:
                out[method.name] = res
    return out


def paired_worse(y, a, b, z=1.0):
    """Is prediction a worse than b by more than noise (paired sign test, z SEs)?"""
    ra, rb = a.argmax(1) == y, b.argmax(1) == y
    lose, win = int((rb & ~ra).sum()), int((ra & ~rb).sum())
    return (lose - win) > z * math.sqrt(max(lose + win, 1))


def choose(rule, cands, y, n_val=None):
    names = list(cands)
    P = {k: cands[k][1] for k in names}
    acc = {k: float((P[k].argmax(1) == y).mean()) for k in names}
    ll = {k: mean_log_loss(y, np.clip(P[k], 1e-7, 1)) for k in names}
    # log-loss after a temperature on the candidate itself (fair to over-confident rules)
    singles = [k for k in names if k.startswith("single:")]
    best_single_acc = max(singles, key=lambda k: (acc[k], -ll[k]))
    best_single_ll = min(singles, key=ll.get)
    if rule == "onese_acc":  # the current rule (on whatever set it is given)
        import pandas as pd
        from triview.scoring import macro_f1
        table = pd.DataFrame([{"candidate": k, "val_accuracy": acc[k],
                               "val_macro_f1": macro_f1(y, P[k].argmax(1))} for k in names])
        best = table.sort_values("val_macro_f1", ascending=False).iloc[0]
        a = float(best["val_accuracy"])
        se = max(np.sqrt(a * (1 - a) / len(y)), 1.0 / len(y))
        tied = table[table["val_macro_f1"] >= best["val_macro_f1"] - se]
        return str(min(tied["candidate"], key=vt.preference))
    if rule == "paired_onese":
        from triview.scoring import macro_f1
        f1 = {k: macro_f1(y, P[k].argmax(1)) for k in names}
        best = max(names, key=lambda k: (f1[k], -ll[k]))
        rb = P[best].argmax(1) == y
        tied = []
        for k in names:
            rk = P[k].argmax(1) == y
            lose, win = int((rb & ~rk).sum()), int((rk & ~rb).sum())
            if lose - win <= max(1.0, math.sqrt(lose + win)):
                tied.append(k)
        return min(tied, key=vt.preference)
    if rule == "min_ll":
        return min(names, key=ll.get)
    if rule == "min_ll_guard":  # lowest log-loss unless it is worse than the best view by noise
        best = min(names, key=ll.get)
        if paired_worse(y, P[best], P[best_single_acc]):
            return best_single_acc
        return best
    if rule == "max_acc_ll":
        return max(names, key=lambda k: (acc[k], -ll[k]))
    if rule == "best_view":
        return best_single_acc
    if rule == "geomean":
        return "geomean"
    if rule == "logistic":
        return "logistic" if "logistic" in names else "geomean"
    raise ValueError(rule)


RULES = ("paired_onese", "onese_acc", "min_ll", "min_ll_guard", "max_acc_ll", "best_view", "geomean", "logistic")


def apply_candidate(name, params, probs_test: dict, views):
    P = [probs_test[v] for v in views]
    method = vt.get_method(name.split(":")[0])
    return method.apply(params, P, "multiclass")


def refit_params(name, probs_fit, y, n, seed):
    method = vt.get_method(name.split(":")[0])
    views = list(probs_fit)
    if name.startswith("single:"):
        v = name.split(":")[1]
        return {"view": v, "index": views.index(v)}
    if not method.fitted:
        return {}
    return method.fit([probs_fit[v] for v in views], y, n, 0,
                      held_out=([probs_fit[v] for v in views], y))[0]


def evaluate(r: Recipe, seed=0, split=None, calibrate=True):
    split = split or fixed_split(r.dataset)
    views = list(r.views) or views_of(r.dataset)
    y_test = labels_of(r.dataset, split["test"])
    n = int(max(labels_of(r.dataset, split["train"]).max(), y_test.max()) + 1)
    t0 = time.perf_counter()
    import hashlib, pickle
    key = hashlib.sha256(repr((asdict(r), seed, [list(split[k]) for k in ("train", "val", "test")])).encode()).hexdigest()[:20]
    cache = ROOT / "viewcache" / f"{key}.pkl"
    if cache.exists():
        per = pickle.loads(cache.read_bytes())
    else:
        per = {v: run_view(r, v, split, n, seed) for v in views}
        cache.parent.mkdir(exist_ok=True)
        cache.write_bytes(pickle.dumps(per))
    voter_ids = per[views[0]]["voter_ids"]
    y_fit = labels_of(r.dataset, voter_ids)
    out = {"views": {}, "ensemble": {}, "seconds": 0.0, "l2": {v: per[v]["l2"] for v in views}}
    temps = {}
    fit_p, test_p, raw_test_p = {}, {}, {}
    for v in views:
        T = fit_temperature(per[v]["voter_z"], y_fit) if calibrate else 1.0
        temps[v] = T
        fit_p[v] = softmax(per[v]["voter_z"] / T)
        test_p[v] = softmax(per[v]["test_z"] / T)
        raw_test_p[v] = softmax(per[v]["test_z"])
        out["views"][v] = {"acc": float((test_p[v].argmax(1) == y_test).mean()),
                           "ece_before": ece(raw_test_p[v], y_test), "ece": ece(test_p[v], y_test),
                           "oof_acc": float((fit_p[v].argmax(1) == y_fit).mean()), "T": T}
    cands = candidates(fit_p, y_fit, n, seed)
    # the current voter input: validation predictions only, uncalibrated
    val_ids = split["val"]
    y_val = labels_of(r.dataset, val_ids)
    val_p = {v: softmax(per[v]["val_z"]) for v in views}
    val_cands = candidates(val_p, y_val, n, seed)
    best_view_test = max(views, key=lambda v: out["views"][v]["acc"])
    out["best_view_test_acc"] = out["views"][best_view_test]["acc"]
    for rule in RULES + ("val_onese",):
        if rule == "val_onese":
            name = choose("onese_acc", val_cands, y_val)
            params = refit_params(name, val_p, y_val, n, seed)
            p = apply_candidate(name, params, {v: raw_test_p[v] for v in views}, views)
            out["ensemble"][rule] = {"name": name, "acc": float((p.argmax(1) == y_test).mean()),
                                     "ece": ece(p, y_test)}
            continue
        name = choose(rule, cands, y_fit)
        params = refit_params(name, fit_p, y_fit, n, seed)
        p_fit_cv = cands[name][1]
        p = apply_candidate(name, params, test_p, views)
        res = {"name": name, "acc": float((p.argmax(1) == y_test).mean()), "ece_before": ece(p, y_test)}
        if calibrate:
            Te = fit_temperature(np.log(np.clip(p_fit_cv, 1e-7, 1)), y_fit)
            pc = softmax(np.log(np.clip(p, 1e-7, 1)) / Te)
            res.update(ece=ece(pc, y_test), T=Te, ll=mean_log_loss(y_test, pc))
        out["ensemble"][rule] = res
    out["seconds"] = time.perf_counter() - t0
    return out


def random_split(dataset, seed):
    """Outer 5-fold CV over every image (repetition seed // 5, fold seed % 5): the fold is
    the test split; the rest is split into train and val in the fixed split's ratio."""
    fs = fixed_split(dataset)
    ids = np.concatenate([fs["train"], fs["val"], fs["test"]])
    y = labels_of(dataset, ids)
    rep, fold = divmod(seed, 5)
    outer = StratifiedKFold(5, shuffle=True, random_state=100 + rep)
    rest, test = list(outer.split(ids, y))[fold]
    share_val = len(fs["val"]) / (len(fs["train"]) + len(fs["val"]))
    from sklearn.model_selection import train_test_split
    tr, va = train_test_split(ids[rest], test_size=share_val, stratify=y[rest], random_state=rep)
    return {"train": np.array(sorted(tr)), "val": np.array(sorted(va)), "test": np.array(sorted(ids[test]))}


def summarise(results: list[dict]):
    views = list(results[0]["views"])
    line = {}
    for v in views:
        a = [r["views"][v]["acc"] for r in results]
        line[v] = (np.mean(a), np.std(a, ddof=1) if len(a) > 1 else 0.0)
    ens = {}
    for rule in results[0]["ensemble"]:
        a = [r["ensemble"][rule]["acc"] for r in results]
        gap = [r["ensemble"][rule]["acc"] - r["best_view_test_acc"] for r in results]
        e = [r["ensemble"][rule].get("ece", np.nan) for r in results]
        eb = [r["ensemble"][rule].get("ece_before", np.nan) for r in results]
        ens[rule] = {"mean": float(np.mean(a)), "sd": float(np.std(a, ddof=1)) if len(a) > 1 else 0.0,
                     "gap_vs_best_view": float(np.mean(gap)), "worst_gap": float(np.min(gap)),
                     "ece": float(np.nanmean(e)), "ece_before": float(np.nanmean(eb)),
                     "names": [r["ensemble"][rule]["name"] for r in results]}
    return {"views": {v: {"mean": float(m), "sd": float(s)} for v, (m, s) in line.items()},
            "ensemble": ens, "seconds": float(np.mean([r["seconds"] for r in results]))}
