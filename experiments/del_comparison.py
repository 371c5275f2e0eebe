"""The DEL paper's comparison on our data: localization × base method at equal budget.

    python experiments/del_comparison.py --grid experiments/del_digits_cnn_grid.json --out runs/del-digits \
        --results experiments/results/del_digits_cnn [--set full_models=16 ...] [--redo]

1. ``jaxunlearn pipeline`` on the grid's pipeline config (ensembles, oracles, the reference rows and
   ``del`` at its configured point), unless the folder has its ``results.json`` already (one made
   for other forget sets is refused: give the comparison a folder of its own, with another run's
   ``datamodels/``, ``datamodel-fits/`` and ``full/`` copied in to reuse its ensembles);
2. one ``jaxunlearn sweep`` per ``METHOD@MASK`` (every localization × base method) and for ``del``,
   over the grid's learning rates (a sweep already on disk is reused unless ``--redo``);
3. each cell's best grid point by tug-of-war (the DEL paper's selection; KLoM breaks ties), written
   to ``--results`` as ``comparison.json``, ``comparison.png`` and ``table.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from jaxunlearn.cli import main as cli
from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.pipeline.unlearn import prepare, safe_name, sweep_experiment
from jaxunlearn.unlearning import parse_grid


def cell_rows(out: str, method: str) -> list[dict]:
    with open(os.path.join(out, f"sweep-{safe_name(method)}.json")) as f:
        return [r for r in json.load(f)["results"] if r["method"] == method]


def best(rows: list[dict], spec: str, select: str) -> dict | None:
    """The best row on forget set ``spec``: highest ToW (``select="tow"``) or lowest mean KLoM."""
    ok = [r for r in rows if r["forget_set"] == spec and r.get("klom")]
    if not ok:
        return None
    key = (lambda r: (-r["tow"], r["klom"]["mean"])) if select == "tow" else (lambda r: (r["klom"]["mean"], -r["tow"]))
    return min(ok, key=key)


def summary(r: dict | None) -> dict | None:
    if r is None:
        return None
    return {"tow": r["tow"], "klom_mean": r["klom"]["mean"], "klom_forget": r["klom"]["forget"],
            "accuracy": r["accuracy"], "accuracy_gap": r["accuracy_gap"], "mia_auc": r["mia"]["auc"],
            "compute_fraction": r["compute_fraction"], "lr": (r.get("config") or {}).get("lr")}


def markdown(res: dict) -> str:
    lines = []
    for spec, cells in res["cells"].items():
        nf = res["noise_floor"][spec]["mean"]
        lines.append(f"**{spec}** (mean memorization {res['forget_memorization'][spec]['mean']:.3f}; KLoM noise "
                     f"floor {nf:.3f}). Each cell: ToW / mean KLoM (best lr by ToW), compute as % of re-training.\n")
        locs = res["localizations"]
        lines.append("| method | " + " | ".join(locs) + " |")
        lines.append("| --- |" + " --- |" * len(locs))
        for m in res["methods"]:
            row = []
            for loc in locs:
                c = cells[f"{m}@{loc}"]
                row.append("—" if c is None else f"{c['tow']:.3f} / {c['klom_mean']:.2f} ({100 * c['compute_fraction']:.0f} %)")
            lines.append(f"| {m} | " + " | ".join(row) + " |")
        d = cells.get("del")
        if d:
            lines.append(f"| **DEL** (reset + fine-tune) | {d['tow']:.3f} / {d['klom_mean']:.2f} "
                         f"({100 * d['compute_fraction']:.0f} %, lr {d['lr']:g}) |" + " |" * (len(locs) - 1))
        for ref in ("none", "oracle-matching", "dmm", "dm-direct"):
            r = res["references"][spec].get(ref)
            if r:
                lines.append(f"| {ref} | {r['tow']:.3f} / {r['klom_mean']:.2f} ({100 * r['compute_fraction']:.0f} %) |"
                             + " |" * (len(locs) - 1))
        lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs, locs, methods = list(res["cells"]), res["localizations"], res["methods"]
    fig, axes = plt.subplots(2, len(specs), figsize=(6.5 * len(specs) + 2.5, 7.5), squeeze=False)
    width = 0.8 / len(locs)
    cmap = plt.get_cmap("tab10")
    for j, spec in enumerate(specs):
        for row, (key, label) in enumerate((("tow", "tug-of-war (higher is better)"),
                                            ("klom_mean", "mean KLoM (lower is better)"))):
            ax = axes[row][j]
            for i, loc in enumerate(locs):
                vals = [(res["cells"][spec][f"{m}@{loc}"] or {}).get(key, np.nan) for m in methods]
                ax.bar(np.arange(len(methods)) + (i - (len(locs) - 1) / 2) * width, vals, width, label=loc,
                       color=cmap(i))
            d = res["cells"][spec].get("del")
            if d:
                ax.axhline(d[key], color="k", ls="--", lw=1, label="DEL (reset + fine-tune)")
            if key == "klom_mean":
                ax.axhline(res["noise_floor"][spec]["mean"], color="gray", ls=":", lw=1, label="oracle noise floor")
            ax.set_xticks(np.arange(len(methods)), methods)
            ax.set_ylabel(label)
            ax.set_title(spec)
            if key == "tow":
                lo = np.nanmin([c["tow"] for c in res["cells"][spec].values() if c] + [1.0])
                ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    axes[0][-1].legend(fontsize=8, title="localization", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    axes[1][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(res["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True)
    p.add_argument("--out", required=True, help="the pipeline folder (ensembles reused)")
    p.add_argument("--results", required=True, help="where comparison.json/.png and table.md go")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="pipeline overrides, as for pipeline")
    p.add_argument("--redo", action="store_true", help="re-run sweeps already on disk")
    args = p.parse_args(argv)
    with open(args.grid) as f:
        spec = json.load(f)
    config = os.path.join(os.path.dirname(os.path.abspath(args.grid)), spec["pipeline"])
    sets = ["--set", *args.set] if args.set else []
    cfg = PipelineConfig.from_json(config).with_overrides(args.set or None)
    made = os.path.join(args.out, "results.json")
    if os.path.isfile(made) and not args.redo:  # another pipeline's results in the folder would mix in
        with open(made) as f:
            have = list(json.load(f).get("forget_sets", {}))
        if have != list(cfg.forget_sets):
            print(f"del_comparison: {made} holds forget sets {have}, not this grid's {list(cfg.forget_sets)}; "
                  "give --out a folder of its own (copy another pipeline's datamodels/, datamodel-fits/ and full/ "
                  "into it to reuse those ensembles)", file=sys.stderr)
            return 2
    if args.redo or not os.path.isfile(made):
        rc = cli(["pipeline", "--config", config, "--out", args.out, *sets])
        if rc:
            return rc
    names = [f"{m}@{loc}" for m in spec["methods"] for loc in spec["localizations"]] + ["del"]
    todo = [n for n in names if args.redo or not os.path.isfile(os.path.join(args.out, f"sweep-{safe_name(n)}.json"))]
    if todo:  # one prepare (ensembles, fits, oracles loaded once), then every sweep on it
        exp = prepare(cfg, args.out)
        for name in todo:
            grid = spec["grids"][name.partition("@")[0]]
            sweep_experiment(exp, args.out, name, parse_grid(name, grid, base=cfg.method_kwargs(name)))
    with open(os.path.join(args.out, "results.json")) as f:
        pipe = json.load(f)
    specs = list(pipe["forget_sets"])
    res = {"title": f"DEL comparison: {os.path.basename(args.grid)}", "grid": spec,
           "localizations": spec["localizations"], "methods": spec["methods"], "select": spec.get("select", "tow"),
           "noise_floor": pipe["noise_floor"], "forget_memorization": pipe["forget_memorization"],
           "oracle_accuracy": pipe["oracle_accuracy"], "ensemble": pipe["ensemble"], "config": pipe["config"],
           "cells": {s: {n: summary(best(cell_rows(args.out, n), s, spec.get("select", "tow"))) for n in names}
                     for s in specs},
           "references": {s: {r["method"]: summary(r) for r in pipe["results"] if r["forget_set"] == s and r.get("klom")}
                          for s in specs}}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "comparison.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.results, "table.md"), "w") as f:
        f.write(markdown(res))
    plot(res, os.path.join(args.results, "comparison.png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
