"""Human-facing output of the pipeline: a table and the KLoM-vs-compute Pareto plot."""
from __future__ import annotations

import os

HIGHLIGHT = {"dmm": ("tab:red", "*", 260), "oracle-matching": ("tab:purple", "P", 180)}
MARKERS = "osD^v<>ph"


def _config_note(r: dict) -> str:
    c = r.get("config")
    if not c:
        return ""
    keys = [k for k in ("lr", "epochs", "beta", "alpha", "max_steps", "l1", "saliency_fraction") if k in c]
    return " ".join(f"{k}={c[k]:g}" for k in keys)


def table(res: dict, with_config: bool = False) -> str:
    head = (f"{'forget set':<16}{'method':<16}{'KLoM forget':>12}{'retain':>9}{'val':>9}{'mean':>9}"
            f"{'acc F':>8}{'acc R':>8}{'acc test':>9}{'compute':>9}{'MIA AUC':>9}")
    lines = [head, "-" * len(head)]
    for spec, nf in res["noise_floor"].items():
        lines.append(f"{spec:<16}{'(noise floor)':<16}{nf['forget']:>12.3f}{nf['retain']:>9.3f}{nf['val']:>9.3f}"
                     f"{nf['mean']:>9.3f}")
        for r in res["results"]:
            if r["forget_set"] != spec:
                continue
            note = f"  {_config_note(r)}" if with_config else ""
            if r.get("diverged_models"):
                lines.append(f"{'':<16}{r['method']:<16}  diverged: NaN/inf outputs in {r['diverged_models']} "
                             f"model(s){100 * r['compute_fraction']:>17.2f}%{'':>9}" + note)
                continue
            k, a = r["klom"], r["accuracy"]
            mia = (r.get("mia") or {}).get("auc", float("nan"))
            lines.append(f"{'':<16}{r['method']:<16}{k['forget']:>12.3f}{k['retain']:>9.3f}{k['val']:>9.3f}"
                         f"{k['mean']:>9.3f}{100 * a['forget']:>7.1f}%{100 * a['retain']:>7.1f}%"
                         f"{100 * a['test']:>8.1f}%{100 * r['compute_fraction']:>8.2f}%{mia:>9.3f}" + note)
    lines.append(f"LDS of datamodels: ridge {res['lds']['ridge']:.3f}, lasso {res['lds']['lasso']:.3f}")
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
        ax.axhline(res["noise_floor"][spec]["mean"], color="gray", ls="--", lw=1.2, label="noise floor (oracle vs oracle)")
        ax.set_xscale("log")
        ax.set_xlabel("compute, % of re-training (0 shown at 0.05%)")
        ax.set_ylabel("KLoM (mean of p95 forget/retain/val)")
        size = next((r["forget_size"] for r in res["results"] if r["forget_set"] == spec), "?")
        ax.set_title(f"{res['dataset']}: forget {spec} (|F|={size})")
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.suptitle(f"Unlearning: KLoM vs compute (lower-left is better) — LDS ridge {res['lds']['ridge']:.2f}")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
