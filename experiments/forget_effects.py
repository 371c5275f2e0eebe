"""How well do datamodels predict what removing a forget set does? (The question behind DM-Direct/DMM.)

For every forget set F of a finished pipeline folder, estimates datamodels of the margins of (a) the
points of F and (b) a sample of other training points by every estimator -- ridge and lasso (on the
80 % of the datamodel ensemble the pipeline fits them on) and the denoised subsampling influence
(on every datamodel model, at the threshold the pipeline chose by LDS) -- and compares the predicted
shift of removing F, -Σ_{i∈F} w_i, with the measured one: mean oracle margin − mean full-model
margin, per point.

    python experiments/forget_effects.py --out runs/mini-cpu [--others 200] [--json FILE]

Prints, per forget set and datamodel: Pearson r between predicted and measured shifts, the slope of
predicted on measured (1 = right size; ridge shrinkage pulls it towards 0) and both means.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from jaxunlearn.attribution import fit_lasso, fit_ridge, influence_estimates
from jaxunlearn.pipeline.unlearn import fitting_models, safe_name
from jaxunlearn.utils import write_json_atomic


def shift_stats(pred: np.ndarray, true: np.ndarray) -> dict:
    """pred, true: f32[P] -> Pearson r, slope of pred on true, means."""
    tc = true - true.mean()
    slope = float(np.dot(tc, pred - pred.mean()) / max(np.dot(tc, tc), 1e-12))
    return {"pearson_r": float(np.corrcoef(pred, true)[0, 1]), "slope": slope,
            "mean_predicted": float(pred.mean()), "mean_measured": float(true.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="a finished pipeline folder (results.json, datamodels/, full/, oracle-*/)")
    p.add_argument("--others", type=int, default=200, help="other training points sampled per forget set")
    p.add_argument("--lasso-iters", type=int, default=50)
    p.add_argument("--json", default=None, help="write the figures here (default: OUT/forget_effects.json)")
    args = p.parse_args(argv)
    with open(os.path.join(args.out, "results.json")) as f:
        res = json.load(f)
    masks = np.load(os.path.join(args.out, "datamodels", "masks.npy")).astype(np.float32)
    margins = np.load(os.path.join(args.out, "datamodels", "margins.npy"), mmap_mode="r")
    full = np.load(os.path.join(args.out, "full", "margins.npy"), mmap_mode="r")
    n_fit = fitting_models(len(masks))  # the pipeline's split
    n = masks.shape[1]
    rng = np.random.default_rng(0)
    out = {"datamodel_models_fit": n_fit, "forget_sets": {}}
    for spec, f_idx in res["forget_sets"].items():
        f_idx = np.asarray(f_idx)
        oracle = np.load(os.path.join(args.out, "oracle-" + safe_name(spec), "margins.npy"), mmap_mode="r")
        others = rng.choice(np.setdiff1d(np.arange(n), f_idx), args.others, replace=False)
        pts = np.concatenate([f_idx, others])
        measured = np.asarray(oracle[:, pts]).mean(0) - np.asarray(full[:, pts]).mean(0)
        y = np.asarray(margins[:n_fit][:, pts])
        row = {}
        tau = res["lds_detail"].get("influence_threshold", 0.0)
        for kind, dm in (("ridge", fit_ridge(masks[:n_fit], y)),
                         ("lasso", fit_lasso(masks[:n_fit], y, iters=args.lasso_iters)),
                         ("influence", influence_estimates(masks, np.asarray(margins[:, pts]), tau))):
            pred = -np.asarray(dm.weights)[:, f_idx].sum(1)
            row[kind] = {"forget_points": shift_stats(pred[:len(f_idx)], measured[:len(f_idx)]),
                         "other_points": shift_stats(pred[len(f_idx):], measured[len(f_idx):])}
            for group, s in row[kind].items():
                print(f"{spec:14s} {kind:9s} {group:13s} r {s['pearson_r']:+.2f}  slope {s['slope']:.2f}  "
                      f"mean shift predicted {s['mean_predicted']:+.3f} vs measured {s['mean_measured']:+.3f}")
        out["forget_sets"][spec] = row
    path = args.json or os.path.join(args.out, "forget_effects.json")
    write_json_atomic(path, out)
    print("->", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
