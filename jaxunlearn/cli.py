"""The ``jaxunlearn`` command line: train, demo (and the unlearning pipeline commands)."""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
import time

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.progress import Progress

# placeholders in help texts, filled in when help is shown: every method a pipeline runs, and those
# that update parameters (all but "none" and "dm-direct")
METHODS_HELP, UPDATING_METHODS_HELP = "{methods}", "{updating methods}"


class _HelpFormatter(argparse.HelpFormatter):
    """Fills in the method names only when help is printed: the registry imports every method (and
    JAX), which a plain ``train`` does not need."""

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        if text and (METHODS_HELP in text or UPDATING_METHODS_HELP in text):
            from jaxunlearn.unlearning.registry import ALL_METHODS

            updating = [m for m in ALL_METHODS if m not in ("none", "dm-direct")]
            text = text.replace(METHODS_HELP, " ".join(ALL_METHODS)).replace(UPDATING_METHODS_HELP, " ".join(updating))
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one clear line, exit 2
        self.exit(2, f"jaxunlearn: error: {message}\n")


def add_train_args(p):
    p.add_argument("--dataset", default="digits", help="digits (embedded), cifar10, cifar100, svhn")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python archive folder (cifar-10-batches-py) or tfds dir")
    p.add_argument("--models", type=int, default=64, help="ensemble size M")
    p.add_argument("--alpha", type=float, default=0.5, help="subset fraction of each model, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default=None, help="built-in recipe name or .json (default: DATASET-MODEL if built "
                   "in, e.g. digits-cnn for --model cnn, else the data set's; the one used is printed)")
    p.add_argument("--model", default=None, help="override the recipe's model: resnet9, resnet18, cnn, mlp, vit")
    p.add_argument("--width", type=float, default=None, help="override the recipe's width multiplier")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--chunk", type=int, default=None, help="models trained at once (default: from free memory)")
    p.add_argument("--conv-impl", default=None, help="im2col, xla, xla_canonical, shift, xla_nchw, winograd or xla_s2d "
                   "(default: the measured best for the backend, training/strategy.py)")
    p.add_argument("--vmap-width", type=int, default=None,
                   help="models vmapped together on each device (a chunk goes to only as many devices as keep this "
                        "many on each)")
    p.add_argument("--forget-idx", default=None,
                   help="train oracles: every model on all points but these (.npy file or comma list)")
    p.add_argument("--out", required=True)
    p.add_argument("--worker", default=None, metavar="I/N",
                   help="one of N processes sharing --out (a job array): train only chunks c with c %% N == I; "
                        "whoever finishes last assembles the run")
    p.add_argument("--devices", type=int, default=None,
                   help="local devices that share each chunk's models (default: all)")
    p.add_argument("--assemble", action="store_true", help="train nothing: assemble a run whose chunks are all there")
    p.add_argument("--no-progress", action="store_true")


def load_npy(path: str, flag: str):
    """An array from a .npy file given on the command line, or one clear error naming the flag."""
    import numpy as np

    if not os.path.isfile(path):
        raise JaxUnlearnError(f"{flag} file {path!r} does not exist")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise JaxUnlearnError(f"{flag} file {path!r} is not a readable .npy array: {e}") from None


def _parse_indices(spec: str):
    import numpy as np

    if spec.endswith(".npy"):
        return load_npy(spec, "--forget-idx")
    try:
        return np.array([int(s) for s in spec.split(",") if s.strip()], dtype=np.int64)
    except ValueError:
        raise JaxUnlearnError(f"--forget-idx {spec!r}: expected a .npy file or comma-separated integers") from None


def run_config_from_args(args):
    """Validates every argument and builds (RunConfig, Dataset) before anything is written."""
    from jaxunlearn.data import load_dataset
    from jaxunlearn.models import CONV_IMPLS, MODELS
    from jaxunlearn.training import RunConfig, load_recipe
    from jaxunlearn.training.recipe import default_recipe
    from jaxunlearn.utils import check_indices

    if args.models < 1:
        raise JaxUnlearnError(f"--models must be >= 1, got {args.models}")
    if not 0 < args.alpha <= 1:
        raise JaxUnlearnError(f"--alpha must lie in (0, 1], got {args.alpha}")
    if args.model is not None and args.model not in MODELS:
        raise JaxUnlearnError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")
    if args.conv_impl is not None and args.conv_impl not in CONV_IMPLS:
        raise JaxUnlearnError(f"unknown --conv-impl {args.conv_impl!r}; choose one of {', '.join(CONV_IMPLS)}")
    for flag, value in (("--chunk", args.chunk), ("--vmap-width", args.vmap_width)):
        if value is not None and value < 1:
            raise JaxUnlearnError(f"{flag} must be >= 1, got {value}")
    dataset = load_dataset(args.dataset, args.data_dir)
    recipe_name = args.recipe or default_recipe(args.dataset, args.model)
    recipe = load_recipe(recipe_name)
    if args.epochs is not None and args.epochs < 1:
        raise JaxUnlearnError(f"--epochs must be >= 1, got {args.epochs}")
    changed = {k: v for k, v in (("model", args.model), ("width", args.width), ("epochs", args.epochs),
                                 ("batch_size", args.batch_size)) if v is not None and v != getattr(recipe, k)}
    recipe = recipe.with_epochs(args.epochs).replace(model=args.model, width=args.width,
                                                     batch_size=args.batch_size).validate()
    args.recipe_used = recipe_name + "".join(f" {k}={v}" for k, v in changed.items())
    forget = None
    if args.forget_idx is not None:
        forget = tuple(int(i) for i in check_indices(_parse_indices(args.forget_idx), dataset.n_train))
    cfg = RunConfig(dataset=args.dataset, models=args.models, recipe=recipe, seed=args.seed,
                    alpha=args.alpha if forget is None else 1.0, forget=forget, chunk=args.chunk,
                    conv_impl=args.conv_impl, vmap_width=args.vmap_width)
    return cfg, dataset


def cmd_train(args) -> int:
    from jaxunlearn.training import train_run
    from jaxunlearn.training.run import parse_worker

    worker = parse_worker(args.worker)
    cfg, dataset = run_config_from_args(args)
    print(f"recipe: {args.recipe_used}", file=sys.stderr, flush=True)
    t = time.time()
    bar = Progress(cfg.models, f"train {cfg.dataset}/{cfg.recipe.model}", not args.no_progress)
    try:
        summary = train_run(cfg, dataset, args.out, progress=bar, worker=worker, assemble_only=args.assemble,
                            devices=args.devices)
    finally:
        bar.close()
    wall = time.time() - t
    if not summary["complete"]:
        print(f"worker {args.worker}: trained {summary['models_trained_now']} models in {wall:.1f}s; "
              f"{summary['chunks_missing']} of {summary['chunks']} chunks still to come from the other workers "
              f"(the last one to finish assembles the run, or run the same command with --assemble) -> {args.out}")
        return 0
    mph = summary["models_per_hour"]
    print(f"trained {summary['models']} models ({summary['models_trained_now']} now) in {wall:.1f}s: "
          f"mean test accuracy {100 * summary['mean_test_accuracy']:.2f}%, "
          f"{'n/a' if mph is None else f'{mph:,.0f}'} models/hour -> {args.out}")
    return 0


def cmd_demo(args) -> int:
    from jaxunlearn.pipeline.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


def cmd_pipeline(args) -> int:
    import dataclasses

    from jaxunlearn.pipeline.unlearn import run_pipeline

    cfg = pipeline_config(args)
    over = {"forget_sets": tuple(args.forget) if args.forget else None,
            "methods": tuple(args.methods) if args.methods else None, "data_dir": args.data_dir}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None}).validate()
    if args.worker:
        from jaxunlearn.pipeline.unlearn import train_share
        from jaxunlearn.training.run import parse_worker

        worker = parse_worker(args.worker)
        done = train_share(cfg, args.out, worker, progress=not args.no_progress)
        print(f"worker {args.worker}: " + ("every ensemble is complete; run `pipeline` without --worker to go on"
                                           if done else "my chunks are done; other workers' chunks still to come"))
        return 0
    run_pipeline(cfg, args.out, progress=not args.no_progress)
    return 0


def pipeline_config(args):
    """The experiment config of ``pipeline`` and ``sweep``: --config FILE (default: the digits demo's, or
    the quick demo's with --quick), then every --set KEY=VALUE."""
    from jaxunlearn.pipeline.config import PipelineConfig
    from jaxunlearn.pipeline.demo import demo_config

    cfg = PipelineConfig.from_json(args.config) if args.config else demo_config(args.quick)
    return cfg.with_overrides(args.set)


def cmd_sweep(args) -> int:
    import dataclasses

    from jaxunlearn.pipeline.unlearn import run_sweep
    from jaxunlearn.unlearning import parse_grid

    cfg = pipeline_config(args)
    # the pipeline's own settings for the method, under the grid; bad names / values fail before any training
    configs = parse_grid(args.method, args.grid, base=cfg.method_kwargs(args.method))
    if args.forget:
        cfg = dataclasses.replace(cfg, forget_sets=tuple(args.forget)).validate()
    run_sweep(cfg, args.out, args.method, configs, progress=not args.no_progress)
    return 0


def cmd_evaluate(args) -> int:
    """KLoM of given unlearned margins against an oracle run."""
    import json

    import numpy as np

    from jaxunlearn.metrics.klom import klom, klom_groups, klom_half_sample_spread, klom_summary
    from jaxunlearn.training import load_run

    oracle = load_run(args.oracle)
    margins = load_npy(args.margins, "--margins")
    if not np.issubdtype(margins.dtype, np.number) or np.issubdtype(margins.dtype, np.complexfloating):
        raise JaxUnlearnError(f"--margins must hold real numbers, got dtype {margins.dtype}")
    cfg = oracle["config"]
    if cfg["run"]["forget"] is None:
        raise JaxUnlearnError(f"{args.oracle!r} is not an oracle run (it was trained without --forget-idx)")
    n, n_test = cfg["n_train"], cfg["n_test"]
    if margins.ndim != 2 or margins.shape[1] != n + n_test:
        raise JaxUnlearnError(f"--margins must be [models, {n + n_test}] (train then test points), got {margins.shape}")
    groups = klom_groups(cfg["run"]["forget"], n, n_test)
    kw = {"binning": args.klom_binning, "direction": args.klom_direction}
    out = {"klom": klom_summary(klom(oracle["margins"], margins, **kw), groups)}
    if args.spread_draws:
        out["half_sample_spread"] = klom_half_sample_spread(oracle["margins"], margins, groups, args.spread_draws, **kw)
    print(json.dumps(out, indent=2))
    return 0


def cmd_report(args) -> int:
    """Every result and sweep of a pipeline folder on one plot, with the Pareto frontier."""
    from jaxunlearn.pipeline.report import frontier_table, write_report

    res = write_report(args.out)
    print(frontier_table(res))
    print(f"-> {os.path.join(args.out, 'frontier.json')}, {os.path.join(args.out, 'frontier.png')}")
    return 0


def cmd_unrolling(args) -> int:
    """The Unrolling SGD study: verification error, unlearning error, single-gradient unlearning, SD loss."""
    import dataclasses

    from jaxunlearn.pipeline.unrolling import UnrollingConfig, run_unrolling, summary_table

    cfg = UnrollingConfig.from_json(args.config) if args.config else UnrollingConfig()
    over = {"dataset": args.dataset, "data_dir": args.data_dir}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None})
    cfg = cfg.with_overrides(args.set)
    res = run_unrolling(cfg, args.out, progress=not args.no_progress)
    print(summary_table(res))
    print(f"-> {os.path.join(args.out, 'results.json')}, unlearning_vs_verification.png, sd_loss.png")
    return 0


def cmd_dkvb(args) -> int:
    """DKVB heads, zero-gradient class unlearning (activations / examples) vs SCRUB on a linear head."""
    import dataclasses

    from jaxunlearn.pipeline.dkvb import DKVBExperiment, default_config, results_table, run_dkvb, summary_lines

    cfg = DKVBExperiment.from_json(args.config) if args.config else default_config(args.dataset or "digits")
    over = {"dataset": args.dataset, "data_dir": args.data_dir}
    if args.forget_class is not None:
        try:
            over["forget_classes"] = tuple(int(c) for c in args.forget_class.split(","))
        except ValueError:
            raise JaxUnlearnError(f"--forget-class {args.forget_class!r}: expected an integer or a comma list"
                                  ) from None
    cfg = dataclasses.replace(cfg, **{k: v for k, v in over.items() if v is not None}).with_overrides(args.set)
    res = run_dkvb(cfg, args.out, progress=not args.no_progress)
    print(results_table(res))
    print("\n".join(summary_lines(res)))
    print(f"-> {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'dkvb.png')}")
    return 0


def build_parser():
    p = _Parser(prog="jaxunlearn", description="Fast JAX machine unlearning: ensembles, datamodels, KLoM.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train an ensemble of subset (or oracle) models")
    add_train_args(t)
    t.set_defaults(func=cmd_train)
    d = sub.add_parser("demo", help="the main job on the embedded digits data (under 5 minutes on 2 CPU cores)")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--quick", action="store_true", help="smaller ensembles (for tests)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)
    u = sub.add_parser("pipeline", help="ensembles -> datamodels -> unlearning methods -> KLoM (resumes)")
    u.add_argument("--config", default=None, help="a pipeline .json (see experiments/); default: the digits demo's")
    u.add_argument("--quick", action="store_true", help="without --config: the quick demo's config (for tests)")
    u.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override any setting: forget_effects=lasso full_models=100 methods.dmm.lr=0.01")
    u.add_argument("--out", required=True)
    u.add_argument("--data-dir", default=None)
    u.add_argument("--forget", nargs="+", default=None, help="forget sets: random:N class:C cluster:K:J classes:A,B:N memorized:N")
    u.add_argument("--methods", nargs="+", default=None, help=METHODS_HELP + " or METHOD@MASK")
    u.add_argument("--worker", default=None, metavar="I/N",
                   help="one of N processes of a job array sharing --out: train only this worker's chunks of every "
                        "ensemble, then stop; `pipeline` without --worker goes on from the finished folders")
    u.add_argument("--no-progress", action="store_true")
    u.set_defaults(func=cmd_pipeline)
    w = sub.add_parser("sweep", help="a hyperparameter grid of one method, every point evaluated (resumes the "
                       "pipeline's ensembles in --out)")
    w.add_argument("--method", required=True, help=UPDATING_METHODS_HELP)
    w.add_argument("--grid", nargs="+", required=True, help="NAME=V1,V2,... e.g. lr=0.001,0.01 epochs=2,4")
    w.add_argument("--out", required=True, help="a pipeline/demo folder (its ensembles are reused)")
    w.add_argument("--config", default=None, help="pipeline .json; default: the demo's")
    w.add_argument("--quick", action="store_true", help="the quick demo's config (with demo --quick)")
    w.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", help="override any setting, as for pipeline")
    w.add_argument("--forget", nargs="+", default=None)
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(func=cmd_sweep)
    e = sub.add_parser("evaluate", help="KLoM of unlearned margins (.npy [models, points]) against an oracle run")
    e.add_argument("--oracle", required=True, help="an oracle run folder (train --forget-idx)")
    e.add_argument("--margins", required=True)
    e.add_argument("--klom-binning", default="inclusive",
                   help="inclusive (default) or reference (data-unlearning-bench's np.digitize binning)")
    e.add_argument("--klom-direction", default="oracle||unlearned", help="oracle||unlearned (default) or unlearned||oracle")
    e.add_argument("--spread-draws", type=int, default=0, metavar="N",
                   help="also the KLoM mean's spread over N half-samples of the models of each side (N >= 2; "
                        "metrics.klom_half_sample_spread): the size of a difference that is noise here")
    e.set_defaults(func=cmd_evaluate)
    k = sub.add_parser("dkvb", help="discrete key-value bottleneck heads: zero-gradient class unlearning "
                       "(activations / examples) against SCRUB on a linear head, KLoM vs retrained heads (resumes)")
    k.add_argument("--dataset", default=None, help="digits, cifar10 or cifar100 (default: the config's, else digits)")
    k.add_argument("--data-dir", default=None)
    k.add_argument("--forget-class", default=None, help="class to forget, or a comma list (default: the config's)")
    k.add_argument("--config", default=None, help="a dkvb .json (see experiments/dkvb_*.json); default: "
                   "experiments/dkvb_digits.json for digits, the papers' head sizes otherwise")
    k.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override any setting: heads=4 pairs=512 n_a=[100,1000] scrub_grid=[] scrub.lr=0.01")
    k.add_argument("--out", required=True)
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=cmd_dkvb)
    r = sub.add_parser("report", help="merge a folder's results.json and sweep-*.json: frontier.json + frontier.png "
                       "(every point, the Pareto frontier, each method's best)")
    r.add_argument("--out", required=True, help="a pipeline folder")
    r.set_defaults(func=cmd_report)
    o = sub.add_parser("unrolling", help="Unrolling SGD: verification vs unlearning error, single-gradient "
                       "unlearning and the SD loss over a grid of lr, epochs, batch size, λ (resumes)")
    o.add_argument("--dataset", default=None, help="digits or cifar10 (default: the config's, else digits)")
    o.add_argument("--data-dir", default=None)
    o.add_argument("--config", default=None, help="an unrolling .json (see experiments/unrolling_*.json)")
    o.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="override any setting: std_losses=[0,5,25] models=8 methods.ga.lr=0.01 recipe.width=0.5")
    o.add_argument("--out", required=True)
    o.add_argument("--no-progress", action="store_true")
    o.set_defaults(func=cmd_unrolling)
    for sp in (t, d, u, w, e, k, r, o):
        add_cache_args(sp)
    return p


def add_cache_args(p):
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="persistent XLA compilation cache folder (default: $JAXUNLEARN_CACHE_DIR, else "
                        "~/.cache/jaxunlearn/jax; 'off' switches it off); safe to share between your own "
                        "processes; it holds compiled code, so use only a folder you trust")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, cache nothing")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from jaxunlearn.compile_cache import enable_compile_cache, resolve_cache_dir
        from jaxunlearn.cpu_devices import use_one_cpu_device_per_core

        use_one_cpu_device_per_core()  # before JAX starts: the models axis split across the cores

        enable_compile_cache(resolve_cache_dir(getattr(args, "compile_cache", None),
                                               getattr(args, "no_compile_cache", False)))
        return args.func(args)
    except JaxUnlearnError as e:
        print(f"jaxunlearn: error: {e}", file=sys.stderr)
        return 2


def run(argv=None) -> None:
    """The ``jaxunlearn`` command (and ``python -m jaxunlearn``); it ends the process. :func:`main`,
    then, once the output is flushed and the exit handlers have run, ``os._exit``: Python's
    module-by-module teardown of JAX, flax, optax and orbax is 0.2 s of a 2 s warm ``train``
    (measured). Everything a command writes is closed before it returns. The usual exit instead while
    another non-daemon thread is alive (it would be joined) or a profiler or tracer is attached (it
    writes its output at exit); an uncaught exception ends the process the usual way."""
    code = main(argv)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if others or sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)
    atexit._run_exitfuncs()  # what a normal exit runs: logging's flush, JAX's own handlers
    sys.stdout.flush()  # after them: what they print too
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
