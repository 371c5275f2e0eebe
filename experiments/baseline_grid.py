"""Run a method grid file (e.g. experiments/cifar10_baseline_grid.json): one `jaxunlearn sweep` per
method, all on the same pipeline folder (its ensembles are trained once and reused).

    python experiments/baseline_grid.py --grid experiments/cifar10_baseline_grid.json --out runs/cifar10 \
        [--data-dir /data/cifar10] [--methods ga scrub]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from jaxunlearn.cli import main as cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=None, help="overrides the pipeline config's data_dir")
    p.add_argument("--methods", nargs="+", default=None, help="a subset of the grid's methods")
    args = p.parse_args(argv)
    with open(args.grid) as f:
        spec = json.load(f)
    config = os.path.join(os.path.dirname(os.path.abspath(args.grid)), spec["pipeline"])
    if args.data_dir:  # a copy of the pipeline config with the data folder swapped in
        with open(config) as f:
            cfg = json.load(f)
        cfg["data_dir"] = os.path.abspath(args.data_dir)
        os.makedirs(args.out, exist_ok=True)
        config = os.path.join(args.out, "pipeline-config.json")
        with open(config, "w") as f:
            json.dump(cfg, f, indent=2)
    for method in args.methods or list(spec["grids"]):
        if method not in spec["grids"]:
            print(f"baseline_grid: no grid for {method!r} in {args.grid}", file=sys.stderr)
            return 2
        rc = cli(["sweep", "--config", config, "--out", args.out, "--method", method, "--grid", *spec["grids"][method]])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
