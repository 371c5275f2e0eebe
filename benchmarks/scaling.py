"""Models per hour with 1 and N local devices (issue 16): the same `jaxunlearn train` run in fresh
processes, the models axis split across N devices (on a CPU: simulated host-platform devices, which
share the same cores, so the rate is expected to stay flat; the run proves the path works). On a
machine with several GPUs, pass --devices-list 1,2,4,8 without --simulate.

    python benchmarks/scaling.py [--models 64] [--model mlp] [--devices-list 1,2] [--repeats 2]

Prints a table and writes benchmarks/results/scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(models: int, model: str, devices: int, simulate: bool, epochs: int) -> dict:
    env = {"PYTHONPATH": REPO, **os.environ}  # this checkout's package unless PYTHONPATH names one (revisions.py)
    if simulate:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "run")
        cmd = [sys.executable, "-P", "-m", "jaxunlearn", "train", "--dataset", "digits", "--model", model,
               "--recipe", f"digits-{model}", "--models", str(models), "--epochs", str(epochs), "--out", out,
               "--no-progress", "--devices", str(devices)]
        t = time.time()
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.time() - t
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
    return {"devices": devices, "wall_s": wall, "train_s": s.get("wall_seconds"),
            "models_per_hour": s.get("models_per_hour"), "mean_test_accuracy": s.get("mean_test_accuracy")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=64)
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--devices-list", default="1,2")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-simulate", action="store_true", help="use the machine's real devices (GPUs)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "scaling.json"))
    args = p.parse_args(argv)
    counts = [int(x) for x in args.devices_list.split(",")]
    rows = []
    for rep in range(args.repeats):  # interleaved, so a busy machine slows every setting alike
        for n in counts:
            rows.append({**one_run(args.models, args.model, n, not args.no_simulate, args.epochs), "repeat": rep})
    best = {n: max(r["models_per_hour"] for r in rows if r["devices"] == n) for n in counts}
    res = {"machine": platform.machine(), "cpus": os.cpu_count(), "simulated": not args.no_simulate,
           "models": args.models, "model": args.model, "epochs": args.epochs, "runs": rows,
           "best_models_per_hour": best, "ratio_vs_1": {n: best[n] / best[counts[0]] for n in counts}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{'devices':>8}{'models/hour (best)':>20}{'vs 1':>8}")
    for n in counts:
        print(f"{n:>8}{best[n]:>20,.0f}{res['ratio_vs_1'][n]:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
