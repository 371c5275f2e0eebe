"""A cold `jaxunlearn demo` at two revisions of this repository, side by side in one run.

Start-up work (what is compiled, and how) changes from commit to commit; this measures it the way a
new user meets it: a fresh compilation cache, a fresh output folder, the whole process timed. Each
revision is checked out into a temporary git worktree and run from there (its own package on
``PYTHONPATH``), alternating revisions when ``--repeats`` > 1. The KLoM rows of the two revisions
are compared too: a start-up change must not move a result. Then the attribution step alone
(``fit_attribution`` on the first demo's ensembles, in a fresh process without a compilation cache,
the two revisions alternating ``--repeats`` times): its wall time and how many programs it compiled.

    python benchmarks/demo_startup.py --revs 26d51e0 HEAD --json benchmarks/results/cpu_demo_startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from worktrees import resolve, worktrees

RUN = ("import sys; sys.path.insert(0, {src!r}); import jaxunlearn; "
       "assert jaxunlearn.__file__.startswith({src!r}), jaxunlearn.__file__; "
       "from jaxunlearn.cli import main; sys.exit(main(['demo', '--out', {out!r}, '--no-progress']))")


ATTRIBUTION = """
import json, os, sys, time
sys.path.insert(0, {src!r})
import jax, numpy as np
import jaxunlearn; assert jaxunlearn.__file__.startswith({src!r}), jaxunlearn.__file__
from jaxunlearn.compile_cache import CompileCounter
from jaxunlearn.pipeline.demo import demo_config
from jaxunlearn.pipeline.unlearn import fit_attribution
res = json.load(open(os.path.join({demo!r}, "results.json")))
forget = {{s: np.asarray(f) for s, f in res["forget_sets"].items()}}
jax.block_until_ready(jax.numpy.zeros(1))
c, t = CompileCounter(), time.perf_counter()
effects, _ = fit_attribution(demo_config(), os.path.join({demo!r}, "datamodels"), forget, {fits!r})
jax.block_until_ready(effects)
s = c.snapshot()
print(json.dumps({{"wall_s": round(time.perf_counter() - t, 2), "programs": s["programs"],
                  "compile_s": round(s["seconds"], 2)}}))
"""


def attribution_step(src: str, demo: str, scratch: str, tag: str) -> dict:
    env = {**os.environ, "PYTHONPATH": src, "JAXUNLEARN_CACHE_DIR": "off"}
    fits = os.path.join(scratch, f"fits-{tag}")
    r = subprocess.run([sys.executable, "-c", ATTRIBUTION.format(src=src, demo=demo, fits=fits)], env=env, check=True,
                       capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def cold_demo(src: str, scratch: str, tag: str) -> dict:
    out, cache = os.path.join(scratch, f"out-{tag}"), os.path.join(scratch, f"cache-{tag}")
    env = {**os.environ, "PYTHONPATH": src, "JAXUNLEARN_CACHE_DIR": cache}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN.format(src=src, out=out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    compile_ = {k: v for k, v in res.get("compile", {}).items() if k not in ("names", "cache_dir")}
    return {"whole_process_s": round(wall, 2), "job_wall_s": round(res["wall_seconds"], 2), "compile": compile_ or None,
            "klom": {f"{r['forget_set']} {r['method']}": r["klom"]["mean"] for r in res["results"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--revs", nargs=2, default=["HEAD~1", "HEAD"], help="two git revisions (before, after)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.revs = resolve(args.revs)
    with tempfile.TemporaryDirectory(prefix="demo-startup-") as scratch, worktrees(args.revs, scratch) as trees:
        runs: dict = {rev: [] for rev in args.revs}
        for i in range(args.repeats):
            for j, rev in enumerate(args.revs):
                r = cold_demo(trees[rev], scratch, f"{j}-{i}")
                runs[rev].append(r)
                print(f"{rev}: whole process {r['whole_process_s']} s, compile {r['compile']}", flush=True)
        demo = os.path.join(scratch, "out-0-0")
        steps: dict = {rev: [] for rev in args.revs}
        for i in range(max(2, args.repeats)):
            for j, rev in enumerate(args.revs):
                steps[rev].append(attribution_step(trees[rev], demo, scratch, f"{j}-{i}"))
                print(f"{rev}: attribution step {steps[rev][-1]}", flush=True)
    before, after = (runs[r] for r in args.revs)
    best = lambda rs: min(r["whole_process_s"] for r in rs)  # noqa: E731
    diff = max(abs(before[0]["klom"][k] - after[0]["klom"][k]) for k in before[0]["klom"])
    step = lambda rev: min(s["wall_s"] for s in steps[rev])  # noqa: E731
    summary = {"revs": args.revs, "whole_process_best_s": [best(before), best(after)],
               "ratio_before_over_after": round(best(before) / best(after), 3), "max_klom_difference": diff,
               "attribution_best_s": [step(r) for r in args.revs],
               "attribution_ratio_before_over_after": round(step(args.revs[0]) / step(args.revs[1]), 3),
               "attribution_programs": [steps[r][0]["programs"] for r in args.revs]}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "runs": {r: [{k: v for k, v in x.items() if k != "klom"} for x in rs]
                                                    for r, rs in runs.items()}, "attribution_step": steps}, f, indent=1)


if __name__ == "__main__":
    main()
