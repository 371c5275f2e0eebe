"""One benchmark script at two revisions of this repository, side by side in one run.

A change meant to make something faster is measured against the revision before it, on the same machine,
in the same run: each revision is checked out into a temporary git worktree, and the benchmark script of
the *newer* revision (so both run the very same measurement) is run with each revision's ``jaxunlearn`` on
``PYTHONPATH``, alternating revisions ``--repeats`` times. Every run writes its own JSON; ``--metric`` (a
dotted path into it, higher is better) is read from each, and the best of the repeats is compared.

    python benchmarks/revisions.py --revs d56b02c HEAD --repeats 2 --json OUT.json -- \\
        ensemble_throughput.py --cpu-devices 2 --recipe cifar10-resnet9 --model resnet9 ...

The script's own ``--json`` is supplied; every other argument after ``--`` is passed through unchanged, and
relative paths in them read from the folder this is run in. A script that starts ``jaxunlearn`` in processes of
its own must let ``PYTHONPATH`` choose the package (``python -P -m jaxunlearn``, as ``peer_torch.py`` and
``scaling.py`` do).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from worktrees import resolve, worktrees


def read_metric(doc: dict, path: str) -> float:
    for key in path.split("."):
        if not isinstance(doc, dict) or key not in doc:
            raise SystemExit(f"--metric {path!r}: no {key!r} in the benchmark's JSON")
        doc = doc[key]
    return float(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--revs", nargs=2, default=["HEAD~1", "HEAD"], help="two git revisions (before, after)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--metric", default="ensemble_models_per_s", help="dotted path into the script's JSON; higher is better")
    ap.add_argument("--json", default=None)
    ap.add_argument("script", help="a script in benchmarks/, then its arguments (after --)")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    name = os.path.basename(a.script)
    if a.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {a.repeats}")
    revs = resolve(a.revs)
    if revs[0] == revs[1]:
        raise SystemExit(f"--revs: both name commit {revs[0]}; for the noise of one revision, run its script twice")
    runs: dict = {rev: [] for rev in revs}
    with tempfile.TemporaryDirectory(prefix="revisions-") as scratch, worktrees(revs, scratch) as trees:
        script = os.path.join(trees[revs[1]], "benchmarks", name)
        if not os.path.isfile(script):
            raise SystemExit(f"no benchmark script benchmarks/{name} at {revs[1]}")
        envs = {rev: {**os.environ, "PYTHONPATH": trees[rev]} for rev in revs}
        for rev in revs:  # each revision's own package is the one imported (run outside the repository root)
            probe = f"import jaxunlearn; assert jaxunlearn.__file__.startswith({trees[rev]!r}), jaxunlearn.__file__"
            subprocess.run([sys.executable, "-c", probe], env=envs[rev], check=True, cwd=scratch)
        for i in range(a.repeats):
            for j, rev in enumerate(revs):
                out = os.path.join(scratch, f"run-{j}-{i}.json")
                env = envs[rev]
                subprocess.run([sys.executable, script, *a.args, "--json", out], env=env, check=True,
                               stdout=subprocess.DEVNULL)  # in this folder: relative paths given read as here
                with open(out) as f:
                    doc = json.load(f)
                runs[rev].append(doc)
                print(f"{rev} (repeat {i + 1}): {a.metric} = {read_metric(doc, a.metric):.4g}", flush=True)
    best = {rev: max(read_metric(d, a.metric) for d in runs[rev]) for rev in revs}
    summary = {"revs": revs, "script": name, "args": a.args, "metric": a.metric,
               "values": {rev: [read_metric(d, a.metric) for d in runs[rev]] for rev in revs}, "best": best,
               "ratio_after_over_before": round(best[revs[1]] / best[revs[0]], 3)}
    print(json.dumps(summary))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": summary, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
