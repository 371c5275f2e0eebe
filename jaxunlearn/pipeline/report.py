"""Human-facing output of the pipeline: a table and the KLoM-vs-compute Pareto plot."""
from __future__ import annotations

import glob
import json
import os

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import save_figure_atomic

HIGHLIGHT = {"dmm": ("tab:red", "*", 260), "oracle-matching": ("tab:purple", "P", 180)}
MARKERS = "osD^v<>ph"


def _config_note(r: dict) -> str:
    c = r.get("config")
    if not c:
        return ""
    keys = [k for k in ("lr", "epochs", "beta", "ce_weight", "alpha", "max_steps", "l1", "saliency_fraction", "forget_multiplier")
            if k in c]
    return " ".join(f"{k}={c[k]:g}" for k in keys)


def table(res: dict, with_config: bool = False) -> str:
    w = max([16] + [len(r["method"]) + 2 for r in res["results"]])
    head = (f"{'forget set':<16}{'method':<{w}}{'KLoM forget':>12}{'retain':>9}{'val':>9}{'mean':>9}"
            f"{'acc F':>8}{'acc R':>8}{'acc test':>9}{'ToW':>7}{'compute':>9}{'MIA AUC':>9}")
    lines = [head, "-" * len(head)]
    for spec, nf in res["noise_floor"].items():
        lines.append(f"{spec:<16}{'(noise floor)':<{w}}{nf['forget']:>12.3f}{nf['retain']:>9.3f}{nf['val']:>9.3f}"
                     f"{nf['mean']:>9.3f}")
        for r in res["results"]:
            if r["forget_set"] != spec:
                continue
            note = f"  {_config_note(r)}" if with_config else ""
            if r.get("diverged_models"):
                lines.append(f"{'':<16}{r['method']:<{w}}  diverged: NaN/inf outputs in {r['diverged_models']} "
                             f"model(s){100 * r['compute_fraction']:>17.2f}%{'':>9}" + note)
                continue
            k, a = r["klom"], r["accuracy"]
            mia = (r.get("mia") or {}).get("auc", float("nan"))
            tow = r.get("tow", float("nan"))
            lines.append(f"{'':<16}{r['method']:<{w}}{k['forget']:>12.3f}{k['retain']:>9.3f}{k['val']:>9.3f}"
                         f"{k['mean']:>9.3f}{100 * a['forget']:>7.1f}%{100 * a['retain']:>7.1f}%"
                         f"{100 * a['test']:>8.1f}%{tow:>7.3f}{100 * r['compute_fraction']:>8.2f}%{mia:>9.3f}" + note)
    lines.append("LDS of datamodels: " + ", ".join(f"{k} {v:.3f}" for k, v in res["lds"].items()))
    return "\n".join(lines)


def sweep_table(res: dict) -> str:
    return f"sweep of {res['sweep']['method']} ({len(res['sweep']['configs'])} configs)\n" + table(res, True)


def pareto_plot(res: dict, path: str) -> None:
    """KLoM (mean of p95 over forget/retain/val) vs compute fraction, one panel per forget set: every
    method (every grid point of a sweep), DMM and OM highlighted, the noise floor as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(res["noise_floor"])
    fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs) + 1.8, 4.2), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in res["results"]))
    cmap = plt.get_cmap("tab10")
    for ax, spec in zip(axes[0], specs):
        for i, m in enumerate(methods):
            pts = [r for r in res["results"] if r["forget_set"] == spec and r["method"] == m and r["klom"]]
            if not pts:
                continue
            color, marker, size = HIGHLIGHT.get(m, (cmap(i % 10), MARKERS[i % len(MARKERS)], 70))
            xs = [max(100 * r["compute_fraction"], 0.05) for r in pts]
            ax.scatter(xs, [r["klom"]["mean"] for r in pts], s=size, marker=marker, color=color, label=m,
                       edgecolor="black", linewidth=0.6, zorder=3)
        front = res.get("frontier", {}).get(spec, {}).get("pareto_without_oracle_targets")
        if front:  # from `jaxunlearn report`: the frontier of every point, oracle targets excluded
            right = max(100 * r["compute_fraction"] for r in res["results"] if r["forget_set"] == spec)
            xs = [max(100 * r["compute_fraction"], 0.05) for r in front] + [max(right, 0.05)]
            ys = [r["klom"]["mean"] for r in front]
            ax.step(xs, ys + ys[-1:], where="post", color="black", alpha=0.45, lw=1.5,
                    label="frontier (without oracle targets)")
        ax.axhline(res["noise_floor"][spec]["mean"], color="gray", ls="--", lw=1.2, label="noise floor (oracle vs oracle)")
        ax.set_xscale("log")
        ax.set_xlabel("compute, % of re-training (0 shown at 0.05%)")
        ax.set_ylabel("KLoM (mean of p95 forget/retain/val)")
        size = next((r["forget_size"] for r in res["results"] if r["forget_set"] == spec), "?")
        ax.set_title(f"{res['dataset']}: forget {spec} (|F|={size})")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    effects = res.get("config", {}).get("forget_effects", "ridge")
    lds_note = ", ".join(f"{k} {v:.2f}" for k, v in res["lds"].items())
    fig.suptitle(f"Unlearning: KLoM vs compute (lower-left is better) — datamodel LDS {lds_note}; "
                 f"DM-Direct/DMM effects: {effects}")
    fig.tight_layout()
    save_figure_atomic(fig, path)


def _key(r: dict) -> str:
    return json.dumps([r["forget_set"], r["method"], r.get("config")], sort_keys=True)


def pareto_front(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both axes (compute fraction, mean KLoM; lower is better),
    sorted by compute. Diverged rows (no KLoM) never enter."""
    pts = sorted((r for r in rows if r.get("klom")), key=lambda r: (r["compute_fraction"], r["klom"]["mean"]))
    front, best = [], float("inf")
    for r in pts:
        if r["klom"]["mean"] < best:
            front.append(r)
            best = r["klom"]["mean"]
    return front


def merge_results(out: str) -> dict:
    """``out/results.json`` and every ``out/sweep-*.json`` made on the same ensembles, as one result
    (duplicate rows dropped) plus, per forget set, the Pareto frontier over every point and each
    method's best point. Oracle Matching uses oracle outputs, so the frontier is given with and
    without it."""
    if not os.path.isdir(out):
        raise JaxUnlearnError(f"--out {out!r} is not a folder")
    paths = sorted(glob.glob(os.path.join(out, "sweep-*.json")))
    main = os.path.join(out, "results.json")
    paths = ([main] if os.path.isfile(main) else []) + paths
    if not paths:
        raise JaxUnlearnError(f"no results.json or sweep-*.json in {out!r}; run `jaxunlearn pipeline` first")
    merged, seen = None, set()
    for path in paths:
        try:
            with open(path) as f:
                res = json.load(f)
            if not isinstance(res, dict) or not all(k in res for k in ("results", "forget_sets", "noise_floor", "lds")):
                raise ValueError("not a results file of `jaxunlearn pipeline` or `sweep`")
        except (OSError, ValueError) as e:
            raise JaxUnlearnError(f"cannot read {path}: {e}") from None
        if merged is None:
            merged = {k: v for k, v in res.items() if k not in ("results", "sweep", "wall_seconds", "compile")}
            merged["results"], merged["sources"] = [], []
        elif res["forget_sets"] != {s: merged["forget_sets"][s] for s in res["forget_sets"]
                                    if s in merged["forget_sets"]} or res["lds"] != merged["lds"]:
            raise JaxUnlearnError(f"{path} was made on other ensembles or forget sets than {paths[0]}")
        for s, f in res["forget_sets"].items():
            merged["forget_sets"].setdefault(s, f)
            merged["noise_floor"].setdefault(s, res["noise_floor"][s])
        merged["sources"].append(os.path.basename(path))
        for r in res["results"]:
            if _key(r) not in seen:
                seen.add(_key(r))
                merged["results"].append(r)
    summary = {}
    for spec in merged["noise_floor"]:
        rows = [r for r in merged["results"] if r["forget_set"] == spec]
        best = {}
        for r in rows:
            if r.get("klom") and (r["method"] not in best or r["klom"]["mean"] < best[r["method"]]["klom"]["mean"]):
                best[r["method"]] = r
        summary[spec] = {"pareto": pareto_front(rows),
                         "pareto_without_oracle_targets": pareto_front([r for r in rows
                                                                        if r["method"] != "oracle-matching"]),
                         "best_per_method": best, "points": len(rows),
                         "diverged_points": sum(1 for r in rows if r.get("diverged_models"))}
    merged["frontier"] = summary
    return merged


def frontier_table(res: dict) -> str:
    """Per forget set: each method's best point, marked * if on the frontier without oracle targets."""
    lines = []
    for spec, f in res["frontier"].items():
        on = {_key(r) for r in f["pareto_without_oracle_targets"]}
        none = f["best_per_method"].get("none")
        base = none["accuracy"]["test"] if none else None
        lines.append(f"{spec}: {f['points']} points ({f['diverged_points']} diverged), noise floor "
                     f"{res['noise_floor'][spec]['mean']:.3f}; best point of each method (* = on the frontier "
                     "of methods without oracle targets)")
        for m, r in sorted(f["best_per_method"].items(), key=lambda kv: kv[1]["klom"]["mean"]):
            drop = "" if base is None else f"  test acc {100 * (r['accuracy']['test'] - base):+5.1f}"
            lines.append(f"  {'*' if _key(r) in on else ' '} {m:<16}KLoM {r['klom']['mean']:7.3f}  compute "
                         f"{100 * r['compute_fraction']:6.2f}%  MIA AUC {r['mia']['auc']:.3f}{drop}  {_config_note(r)}")
        lines.append("  (test acc: change against the full models; a KLoM below the noise floor that comes with an "
                     "accuracy drop is a damaged ensemble whose wider margin spread the binned KL rewards)")
    return "\n".join(lines)


def write_report(out: str) -> dict:
    """``out/frontier.json`` and ``out/frontier.png`` (every point of every method, one panel per
    forget set); returns the merged result."""
    from jaxunlearn.utils import write_json_atomic

    res = merge_results(out)
    write_json_atomic(os.path.join(out, "frontier.json"), res)
    pareto_plot(res, os.path.join(out, "frontier.png"))
    return res
