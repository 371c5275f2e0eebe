"""jaxunlearn vs the PyTorch script a researcher already has, side by side, each run as its own process.

    python benchmarks/peer_torch.py [--json benchmarks/results/cpu_peer_torch.json]
                                    [--configs mlp:64 mlp:256 cnn:64 cnn:256] [--repeats 1]

    python benchmarks/peer_torch.py --configs resnet9:4 --width 0.25 --epochs 4 --data-dir ../shared/data/cifar10-mini
    python benchmarks/peer_torch.py --configs resnet9:32 --device cuda --data-dir DIR --skip torch-vmap@resnet9:32

Needs PyTorch (``pip install -e .[peers]``); the library and its tests never import it.

For every configuration (model × ensemble size: mlp and cnn on the embedded digits data, resnet9 on
CIFAR-10 from ``--data-dir``) this runs, each as a separate process so that the whole-process wall
time includes imports, start-up and compiling:

* ``ours cold``: ``jaxunlearn train --dataset digits --model M --models K`` with an empty compilation
  cache folder; ``ours warm``: the same command again with that folder now filled;
* ``ours steady``: our ensemble engine (the layout ``train`` picks), every epoch timed to completion;
* ``torch loop``: the same recipe in PyTorch, a plain Python loop over models (each model trained for
  all its epochs, ``torch.optim.SGD``);
* ``torch vmap``: ``torch.func``: ``stack_module_state`` + ``vmap(grad(functional_call))`` over all K
  models at once, one ``torch.optim.SGD`` over the stacked parameters.

The same work in each: the recipe of ``train`` for that model (``jaxunlearn.training.recipe``: digits-mlp /
digits-cnn: SGD with Nesterov momentum 0.9, coupled weight decay, the per-step triangle learning-rate
schedule that is 0 at the first step, batch 64, translation by up to ``crop_pad`` pixels), the same
train/test split, normalisation and α = 0.5 subset masks (made by our own code here and handed to the
torch processes as NumPy arrays), the same number of steps per epoch (the last batch wrapping around
the model's subset), PyTorch's default init (which ours copies; biases zero, as ours), and after training
the logits and margins of every train and test point, what ``train`` writes (until 2026-11-26 the torch
workers evaluated the test points only: ResNet-9 JSON files before then gave torch that less work). Per-model data
order and augmentation draws come from each framework's own generator. Torch's thread count is pinned
to the cores this process may use (what XLA's CPU client uses). ResNet-9 is our ``ResNet9`` ported channel
for channel (``_torch_resnet9``), with the recipe's flip + crop augmentation. ``--device cuda`` runs the
torch workers on the GPU as a fast PyTorch script does (data and augmentation on the GPU, channels-last,
bf16 autocast, ``cudnn.benchmark``) and ours in bfloat16 (the recipe's dtype) on JAX's GPU. Torch keeps OpenMP's default spin-waiting
unless ``--omp-wait-policy PASSIVE`` is given: use that only on a machine shared with other work, where
spinning made torch 100-200x slower per epoch here (4 MLPs: 5.5 s vs 0.027 s); on an idle machine PASSIVE
costs torch 2x per epoch (digits CNN x16: 1.42 vs 0.66 s). The load average cannot decide it: this
script's own processes raise it. A configuration whose mean test accuracies differ by more than 0.5
point is marked void. Each subprocess's 1-minute load average before and after is in the JSON.

Before timing, each configuration checks the port: our flax model's initial weights (and random running
statistics) copied into the torch model must give the same logits, eval and train mode, on the CPU in
float32, to 1e-4 relative to logits above 1 (they agree to about 1e-7), or the script stops.

Reported per configuration: whole-process wall (s, median over repeats), start-up = wall − epochs ×
steady s/epoch (imports, data, init, compiling), steady s/epoch for all K models, mean test
accuracy, and ``ratio`` = best torch ÷ ours (above 1: we are faster) for the whole process (cold and
warm cache) and for the steady state.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from jaxunlearn.cpu_devices import cpu_cores as cores  # imports no JAX: the torch workers stay JAX-free

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# model -> (data set, built-in recipe): the recipe `jaxunlearn train` uses for that model on that data
PEER_MODELS = {"mlp": ("digits", "digits-mlp"), "cnn": ("digits", "digits-cnn"),
               "resnet9": ("cifar10", "cifar10-resnet9")}


def peer_recipe(model: str, width=None, epochs=None, dtype=None):
    """The built-in recipe of ``model`` with the benchmark's overrides (``epochs`` moves the lr peak to the
    same fraction of training, as ``train --epochs`` does)."""
    from jaxunlearn.training.recipe import load_recipe

    return load_recipe(PEER_MODELS[model][1]).with_epochs(epochs).replace(width=width, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# the data every implementation trains on (made with our code, saved as NumPy)

def write_data(path: str, recipe, models: int, seed: int, data_dir=None) -> dict:
    """Writes the data set of ``recipe.model``, normalisation and α = 0.5 masks to ``path`` (npz); returns
    the recipe's fields plus ``steps_per_epoch``, as every worker receives them."""
    import numpy as np

    from jaxunlearn.data import load_dataset
    from jaxunlearn.training.subsets import random_subset_masks, steps_per_epoch

    d = load_dataset(PEER_MODELS[recipe.model][0], data_dir)
    masks = random_subset_masks(d.n_train, models, 0.5, seed)
    np.savez(path, train_images=d.train_images, train_labels=d.train_labels, test_images=d.test_images,
             test_labels=d.test_labels, mean=np.asarray(d.mean, np.float32), std=np.asarray(d.std, np.float32),
             masks=masks)
    return {**recipe.to_dict(), "steps_per_epoch": steps_per_epoch(masks, recipe.batch_size)}


def tiled_cifar10_archive(src: str, reps: int, dst: str) -> str:
    """Writes the CIFAR-10 python archive at ``src`` with its training images repeated ``reps`` times
    (test batch unchanged) to ``dst``, in the official layout, so that ``train --data-dir`` and every
    worker read the same data. With ``reps`` = 10 on cifar10-mini's 5,085 real images: 25,425 images per
    model at α = 0.5, 50 steps an epoch of batch 512, about the paper recipe's per-model work (α = 0.5 of
    50,000: 49 steps). Returns ``dst``."""
    import pickle

    import numpy as np

    from jaxunlearn.data.datasets import load_cifar10_archive

    d = load_cifar10_archive(src)
    rows = lambda x: np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), -1))  # noqa: E731  (channel-major)
    x, y = np.tile(rows(d.train_images), (reps, 1)), np.tile(d.train_labels, reps)
    os.makedirs(dst, exist_ok=True)
    batches = [(f"data_batch_{i + 1}", part) for i, part in enumerate(np.array_split(np.arange(len(x)), 5))]
    for name, idx in batches + [("test_batch", None)]:
        data, labels = (x[idx], y[idx]) if idx is not None else (rows(d.test_images), d.test_labels)
        with open(os.path.join(dst, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": data}, f,
                        protocol=2)
    return dst


# ----------------------------------------------------------------------------------------------------
# workers (each its own process)

def worker_ours(a) -> dict:
    """Our engine as ``train_run`` lays it out (one chunk of K models, split across one CPU device per
    core as the CLI does), every epoch timed to completion."""
    import jax
    import numpy as np

    from jaxunlearn.cpu_devices import use_one_cpu_device_per_core

    use_one_cpu_device_per_core()

    from step_variants import _variant, variant_chunk

    from jaxunlearn.data import load_dataset
    from jaxunlearn.training.recipe import recipe_from_fields

    fields = json.loads(a.recipe)
    fields.pop("steps_per_epoch")
    recipe = recipe_from_fields(fields)
    d = load_dataset(PEER_MODELS[recipe.model][0], a.data_dir)
    variant = a.ours_variant or "fused_bn"  # fused_bn: the library as it is (train_chunk's layout and optimizer)
    with _variant(variant):  # the programs are compiled inside
        c = variant_chunk(variant, recipe, d, a.models, a.seed)
        states, keys = jax.block_until_ready(c.fns.init_models(np.int32(a.seed), c.ids))
        epochs = []
        for e in range(recipe.epochs):
            t = time.perf_counter()
            states, _ = c.fns.epoch(states, c.images, c.labels, c.masks, keys, np.int32(e))
            jax.block_until_ready(states)
            epochs.append(time.perf_counter() - t)
        logits = np.asarray(c.fns.logits(states.params, states.batch_stats, jax.device_put(d.test_images)))
    acc = float((logits.argmax(-1) == d.test_labels[None]).mean())
    return {"epoch_seconds": epochs, "test_accuracy": acc,
            "layout": c.layout, "jax_device": c.devices[0].device_kind}


def _torch_setup(a):
    """torch, the data on ``a.device`` (normalised f32[n, C, H, W]; channels-last memory on CUDA) and
    the options of that device and recipe: bf16 autocast when the recipe's dtype (ours) is bfloat16,
    float32 otherwise; on CUDA cuDNN autotuning and channels-last, as a fast PyTorch script does."""
    import numpy as np
    import torch

    torch.set_num_threads(cores())
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    bf16 = json.loads(a.recipe).get("dtype") == "bfloat16"
    if cuda:
        torch.backends.cudnn.benchmark = True
    z = np.load(a.data)
    mean, std = torch.from_numpy(z["mean"]).to(dev), torch.from_numpy(z["std"]).to(dev)
    fmt = torch.channels_last if cuda else torch.contiguous_format

    def prep(u8):  # u8[n, H, W, C] -> normalised f32[n, C, H, W]
        x = (torch.from_numpy(u8).to(dev).float() - mean) / std
        return x.permute(0, 3, 1, 2).contiguous(memory_format=fmt)

    data = {"x": prep(z["train_images"]), "y": torch.from_numpy(z["train_labels"]).long().to(dev),
            "xt": prep(z["test_images"]), "yt": torch.from_numpy(z["test_labels"]).long().to(dev),
            "masks": z["masks"], "device": dev, "format": fmt,
            "autocast": (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext,
            "sync": torch.cuda.synchronize if cuda else (lambda: None)}
    return torch, data


def _torch_resnet9(nn, c_in: int, width: float, num_classes: int):
    """Our ResNet-9 (jaxunlearn.models.nets.ResNet9) in PyTorch, channel for channel."""
    c = lambda n: max(1, int(round(n * width)))  # noqa: E731

    def cbn(i, o, k=3, stride=1, pad=1):
        return nn.Sequential(nn.Conv2d(i, o, k, stride, pad, bias=False), nn.BatchNorm2d(o, eps=1e-5, momentum=0.1),
                             nn.ReLU())

    class Residual(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.f = f

        def forward(self, x):
            return x + self.f(x)

    class Scale(nn.Module):
        def forward(self, x):
            return x * 0.2

    return nn.Sequential(cbn(c_in, c(64)), cbn(c(64), c(128), 5, 2, 2),
                         Residual(nn.Sequential(cbn(c(128), c(128)), cbn(c(128), c(128)))),
                         cbn(c(128), c(256)), nn.MaxPool2d(2),
                         Residual(nn.Sequential(cbn(c(256), c(256)), cbn(c(256), c(256)))),
                         cbn(c(256), c(128), pad=0), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(c(128), num_classes, bias=False), Scale())


def _torch_model(torch, model: str, in_shape, width: float = 1.0, num_classes: int = 10):
    nn = torch.nn
    c, h, w = in_shape
    if model == "mlp":
        u = max(1, int(round(128 * width)))
        net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, u), nn.ReLU(), nn.Linear(u, u), nn.ReLU(),
                            nn.Linear(u, num_classes))
    elif model == "cnn":
        k = lambda n: max(1, int(round(n * width)))  # noqa: E731

        def cbn(i, o):
            return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o, eps=1e-5, momentum=0.1), nn.ReLU()]
        net = nn.Sequential(*cbn(c, k(16)), *cbn(k(16), k(32)), nn.MaxPool2d(2), *cbn(k(32), k(64)),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(k(64), num_classes))
    elif model == "resnet9":
        net = _torch_resnet9(nn, c, width, num_classes)
    else:
        raise SystemExit(f"no PyTorch peer for model {model!r}; choose one of {', '.join(PEER_MODELS)}")
    for mod in net.modules():  # PyTorch's default weight init (ours copies it); biases zero, as ours
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            nn.init.zeros_(mod.bias)
    return net


def _lr(recipe: dict, step: int) -> float:
    """The triangle schedule as optax applies it: step t uses schedule(t), so the first step has lr 0."""
    spe = recipe["steps_per_epoch"]
    peak, total = recipe["peak_epoch"] * spe, recipe["epochs"] * spe
    if step <= peak:
        f = step / peak if peak > 0 else 1.0
    else:
        f = max(0.0, (total - step) / (total - peak))
    return recipe["peak_lr"] * f


def _batches(np_masks, model: int, epoch: int, seed: int, batch: int, steps: int):
    """i64[steps, batch]: a fresh permutation of the model's subset, wrapping around at the end."""
    import numpy as np

    idx = np.flatnonzero(np_masks[model])
    order = np.random.default_rng([seed, model, epoch, 7]).permutation(idx)
    return order[np.arange(steps * batch) % len(order)].reshape(steps, batch)


def _augment(torch, x, pad: int, flip: bool, gen):
    """Per-example random translation by up to ``pad`` pixels (zero padding), then a horizontal flip with
    probability 1/2 when ``flip``: ``jaxunlearn.data.augment`` in PyTorch. x: f32[..., B, C, H, W]."""
    if pad == 0 and not flip:
        return x
    *lead, b, c, h, w = x.shape
    x = x.reshape(-1, c, h, w)
    n, dev = x.shape[0], x.device
    if pad:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen, device=dev)
        r = off[:, 0, None] + torch.arange(h, device=dev)  # [n, h]
        q = off[:, 1, None] + torch.arange(w, device=dev)  # [n, w]
        ni = torch.arange(n, device=dev)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[ni, r[:, :, None], q[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        coin = torch.rand(n, generator=gen, device=dev) < 0.5
        x = torch.where(coin[:, None, None, None], x.flip(-1), x)
    return x.reshape(*lead, b, c, h, w)


def _outputs(torch, logits_of, d, autocast, batch: int = 1024):
    """What ``train`` writes for every model: logits and margins of every train and test point (eval mode), in
    batches. logits_of(x f32[b, C, H, W]) -> f32[..., b, classes]. Returns (margins f32[..., n_train + n_test]
    as NumPy, the mean test accuracy)."""
    xs, ys = torch.cat([d["x"], d["xt"]]), torch.cat([d["y"], d["yt"]])
    with torch.no_grad(), autocast():
        out = torch.cat([logits_of(xs[i:i + batch]).float() for i in range(0, len(xs), batch)], -2)
    true = out.gather(-1, ys.expand(*out.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    other = out.scatter(-1, ys.expand(*out.shape[:-1]).unsqueeze(-1), float("-inf")).amax(-1)
    test = out[..., len(d["x"]):, :]
    return (true - other).cpu().numpy(), float((test.argmax(-1) == d["yt"]).float().mean())


def worker_torch_loop(a) -> dict:
    torch, d = _torch_setup(a)
    recipe = json.loads(a.recipe)
    masks, steps, bs = d["masks"], recipe["steps_per_epoch"], recipe["batch_size"]
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    dev, autocast, sync = d["device"], d["autocast"], d["sync"]
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    in_shape = tuple(d["x"].shape[1:])
    per_model, training, accs = [], [], []
    for m in range(a.models):
        sync()
        t = time.perf_counter()
        torch.manual_seed(a.seed * 1_000_003 + m)
        net = _torch_model(torch, recipe["model"], in_shape, recipe["width"]).to(dev, memory_format=d["format"])
        opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=recipe["momentum"], nesterov=recipe["nesterov"],
                              weight_decay=recipe["weight_decay"])
        net.train()
        step = 0
        sync()
        t_train = time.perf_counter()
        for e in range(recipe["epochs"]):
            idx = torch.from_numpy(_batches(masks, m, e, a.seed, bs, steps)).to(dev)
            for s in range(steps):
                xb = _augment(torch, d["x"][idx[s]], recipe["crop_pad"], recipe["flip"], gen)
                xb = xb.contiguous(memory_format=d["format"])
                for g in opt.param_groups:
                    g["lr"] = _lr(recipe, step)
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = loss_fn(net(xb), d["y"][idx[s]])
                loss.backward()
                opt.step()
                step += 1
        sync()
        training.append(time.perf_counter() - t_train)
        net.eval()
        _, acc = _outputs(torch, net, d, autocast)  # the margins reach the host there, as train's do
        accs.append(acc)
        sync()
        per_model.append(time.perf_counter() - t)
    # steady: the training epochs of the median model (the first one carries the warm-up; construction
    # and the outputs left out, as ours leaves out init and outputs), as s/epoch of all K models
    rest = training[1:] or training
    per_epoch = lambda model_s: model_s * a.models / recipe["epochs"]  # noqa: E731
    return {"model_seconds": per_model, "training_seconds": training,
            "steady_epoch_seconds": per_epoch(statistics.median(rest)),
            "fastest_model_epoch_seconds": per_epoch(min(rest)),
            "test_accuracy": float(sum(accs) / len(accs)), "threads": torch.get_num_threads(),
            "device": str(dev)}


def worker_torch_vmap(a) -> dict:
    import numpy as np

    torch, d = _torch_setup(a)
    from torch.func import functional_call, grad, stack_module_state, vmap

    recipe = json.loads(a.recipe)
    masks, steps, bs, k = d["masks"], recipe["steps_per_epoch"], recipe["batch_size"], a.models
    dev, autocast, sync = d["device"], d["autocast"], d["sync"]
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    in_shape = tuple(d["x"].shape[1:])
    nets = []
    for m in range(k):
        torch.manual_seed(a.seed * 1_000_003 + m)
        nets.append(_torch_model(torch, recipe["model"], in_shape, recipe["width"]).to(dev))
    params, buffers = stack_module_state(nets)
    base = _torch_model(torch, recipe["model"], in_shape, recipe["width"]).to("meta")
    ls = recipe["label_smoothing"]

    def loss(p, b, x, y):
        with autocast():
            out = functional_call(base, (p, b), (x,))
            return torch.nn.functional.cross_entropy(out, y, label_smoothing=ls)

    grads_of = vmap(grad(loss), in_dims=(0, 0, 0, 0))
    opt = torch.optim.SGD(list(params.values()), lr=0.0, momentum=recipe["momentum"], nesterov=recipe["nesterov"],
                          weight_decay=recipe["weight_decay"], foreach=True)
    base.train()
    epochs, step = [], 0
    for e in range(recipe["epochs"]):
        sync()
        t = time.perf_counter()
        idx = torch.from_numpy(np.stack([_batches(masks, m, e, a.seed, bs, steps) for m in range(k)], 1)).to(dev)
        for s in range(steps):  # idx: [S, K, B]
            xb = _augment(torch, d["x"][idx[s]], recipe["crop_pad"], recipe["flip"], gen)  # [K, B, C, H, W]
            g = grads_of(params, buffers, xb, d["y"][idx[s]])
            for name, p in params.items():
                p.grad = g[name]
            for group in opt.param_groups:
                group["lr"] = _lr(recipe, step)
            opt.step()
            step += 1
        sync()
        epochs.append(time.perf_counter() - t)
    base.eval()
    _, acc = _outputs(torch, lambda x: vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers), d,
                      autocast)
    return {"epoch_seconds": epochs, "steady_epoch_seconds": statistics.median(epochs[1:] or epochs),
            "test_accuracy": acc, "threads": torch.get_num_threads(), "device": str(dev)}


def worker_check_port(a) -> dict:
    """Our flax model's initial weights copied into the torch port: the logits of both on the same
    normalised images, in eval mode (running statistics) and in train mode (batch statistics), must agree
    to float32 rounding, or the port is not our model. Returns the largest absolute differences."""
    import flax.linen as nn
    import jax
    import numpy as np
    import torch

    from jaxunlearn.models import make_model
    from jaxunlearn.models.layers import ConvBN

    torch.set_num_threads(cores())
    recipe = json.loads(a.recipe)
    z = np.load(a.data)
    x = ((z["test_images"][:64].astype(np.float32) - z["mean"]) / z["std"]).astype(np.float32)
    model = make_model(recipe["model"], 10, recipe["width"], "xla", "float32")
    variables = model.init(jax.random.key(a.seed), x[:1], train=False)
    params = variables["params"]
    rng = np.random.default_rng(a.seed)  # running statistics far from their init (0 and 1), so eval mode tests them
    stats = {k: v for k, v in variables.get("batch_stats", {}).items()}
    stats = jax.tree_util.tree_map_with_path(
        lambda path, t: (rng.normal(0, 0.5, t.shape) if path[-1].key == "mean" else rng.uniform(0.5, 1.5, t.shape))
        .astype(np.float32), stats)
    variables = {"params": params, "batch_stats": stats}
    # the flax modules in the order they run: a module's intermediates are recorded when its call returns
    def is_layer(mdl, _name):
        return isinstance(mdl, (ConvBN, nn.Dense))
    _, captured = model.apply(variables, x, train=False, capture_intermediates=is_layer)
    order: list = []

    def walk(tree, path):
        for k, v in tree.items():
            if k == "__call__":
                order.append(path)
            elif isinstance(v, dict):
                walk(v, path + (k,))
    walk(captured["intermediates"], ())

    def at(tree, path):
        for k in path:
            tree = tree[k]
        return tree
    n, h, w, c = x.shape
    net = _torch_model(torch, recipe["model"], (c, h, w), recipe["width"])
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    flax_convs = [p for p in order if "Dense" not in p[-1]]
    flax_dense = [p for p in order if "Dense" in p[-1]]
    if (len(flax_convs), len(flax_dense)) != (len(convs), len(linears)) or len(bns) != len(convs):
        raise SystemExit(f"port has {len(convs)} convs / {len(linears)} linears, ours {len(flax_convs)} / {len(flax_dense)}")
    t = lambda v: torch.from_numpy(np.asarray(v, np.float32).copy())  # noqa: E731
    with torch.no_grad():
        for conv, bn, path in zip(convs, bns, flax_convs):
            p, s = at(params, path), at(stats, path)
            conv.weight.copy_(t(p["Conv_0"]["kernel"]).permute(3, 2, 0, 1))
            bn.weight.copy_(t(p["BatchNorm_0"]["scale"]))
            bn.bias.copy_(t(p["BatchNorm_0"]["bias"]))
            bn.running_mean.copy_(t(s["BatchNorm_0"]["mean"]))
            bn.running_var.copy_(t(s["BatchNorm_0"]["var"]))
        for lin, path in zip(linears, flax_dense):
            p = at(params, path)
            lin.weight.copy_(t(p["kernel"]).T)
            if lin.bias is not None:
                lin.bias.copy_(t(p["bias"]))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # [n, C, H, W]
    out = {}
    for mode, train in (("eval", False), ("train", True)):
        ours = model.apply(variables, x, train=train, mutable=["batch_stats"] if train else False)
        ours = np.asarray(ours[0] if train else ours)
        net.train(train)
        with torch.no_grad():
            theirs = net(xt).numpy()
        out[f"max_abs_diff_{mode}"] = float(np.abs(ours - theirs).max())
        out[f"max_abs_logit_{mode}"] = float(np.abs(ours).max())
    return out


WORKERS = {"check-port": worker_check_port, "ours": worker_ours, "torch-loop": worker_torch_loop,
           "torch-vmap": worker_torch_vmap}


# ----------------------------------------------------------------------------------------------------
# the side-by-side run

def _timed(cmd, env=None, timeout=None) -> tuple[float, str | None, dict]:
    """Wall seconds of a subprocess, its stdout (None when it ran past ``timeout``), and the machine's
    1-minute load average before and after (this machine may be shared)."""
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t, None, {"load_before": load0, "load_after": os.getloadavg()[0]}
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, r.stdout, {"load_before": load0, "load_after": os.getloadavg()[0]}


OMP_WAIT_POLICY = ""  # set by --omp-wait-policy; given to the torch processes


def _worker(name: str, models: int, seed: int, data: str, recipe: dict, opts, timeout=None):
    env = dict(os.environ)
    if name == "check-port":  # float32 to the last bit on both sides: the host, not a GPU's TF32 matmuls
        env["JAX_PLATFORMS"] = "cpu"
    if name.startswith("torch") and OMP_WAIT_POLICY:
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--models", str(models), "--seed", str(seed),
           "--data", data, "--recipe", json.dumps(recipe), "--device", opts.device]
    if opts.data_dir:
        cmd += ["--data-dir", opts.data_dir]
    if name == "ours" and opts.ours_variant:
        cmd += ["--ours-variant", opts.ours_variant]
    wall, out, load = _timed(cmd, env=env, timeout=timeout)
    if out is None:
        return wall, {"timed_out": True, **load}
    return wall, {**json.loads(out.strip().splitlines()[-1]), **load}


def _steady(epoch_seconds: list) -> float:
    """Median epoch time, the first epoch (which carries compiling and warm-up) left out when there are more."""
    return statistics.median(epoch_seconds[1:] or epoch_seconds)


def run_config(model: str, models: int, seed: int, repeats: int, skip: set, log, opts, timeout=None) -> dict:
    """One configuration, side by side: ours cold, warm and steady, then each torch variant, ``repeats``
    times. ``opts``: width, epochs, dtype (overrides of the built-in recipe), device (of the torch
    workers) and data_dir (for CIFAR-10). Its data, runs and caches live in a temporary folder,
    removed at the end."""
    tmp = tempfile.mkdtemp(prefix="peer-torch-")
    try:
        return _run_config(tmp, model, models, seed, repeats, skip, log, opts, timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_config(tmp: str, model: str, models: int, seed: int, repeats: int, skip: set, log, opts, timeout) -> dict:
    import numpy as np

    data = os.path.join(tmp, "data.npz")
    rec = peer_recipe(model, opts.width, opts.epochs, opts.dtype)
    recipe = write_data(data, rec, models, seed, opts.data_dir)
    recipe_file = os.path.join(tmp, "recipe.json")
    with open(recipe_file, "w") as f:
        json.dump(rec.to_dict(), f)
    dataset, epochs = PEER_MODELS[model][0], recipe["epochs"]
    with np.load(data) as z:
        n_train = int(z["masks"].shape[1])
    _, port = _worker("check-port", models, seed, data, {**recipe, "dtype": "float32"},
                      argparse.Namespace(**{**vars(opts), "device": "cpu"}))
    worst = max(port[f"max_abs_diff_{m}"] / max(1.0, port[f"max_abs_logit_{m}"]) for m in ("eval", "train"))
    log(f"  {model}: the torch port on our initial weights: logits differ by at most {worst:.1e} (relative)")
    if worst > 1e-4:
        raise SystemExit(f"the PyTorch {model} is not our model: its logits on our weights differ by {worst:.3g}")
    runs = {k: [] for k in ("ours_cold", "ours_warm", "ours_steady", "torch-loop", "torch-vmap")}
    acc: dict = {}
    for r in range(repeats):
        cache = os.path.join(tmp, f"cache{r}")
        env = {"PYTHONPATH": REPO, **{k: v for k, v in os.environ.items() if k != "JAXUNLEARN_CACHE_DIR"}}
        for phase in () if opts.steady_only else ("cold", "warm"):
            out = os.path.join(tmp, f"run-{r}-{phase}")
            # -P: not the working folder first on sys.path, so that PYTHONPATH (revisions.py) picks the package
            cmd = [sys.executable, "-P", "-m", "jaxunlearn", "train", "--dataset", dataset, "--recipe", recipe_file,
                   "--models", str(models), "--seed", str(seed), "--out", out, "--no-progress", "--compile-cache", cache]
            wall, _, load = _timed(cmd + (["--data-dir", opts.data_dir] if opts.data_dir else []), env)
            summary = json.load(open(os.path.join(out, "summary.json")))
            runs[f"ours_{phase}"].append({"wall": wall, "compile": summary["compile"], **load})
            acc["ours"] = summary["mean_test_accuracy"]
            log(f"  {model}/{models} ours {phase}: {wall:.1f}s (compiled {summary['compile']['compiled']} programs)")
        wall, res = _worker("ours", models, seed, data, recipe, opts)
        runs["ours_steady"].append({"wall": wall, **res})
        acc.setdefault("ours", res["test_accuracy"])
        log(f"  {model}/{models} ours steady: {_steady(res['epoch_seconds']):.3f}s/epoch ({res['layout']}"
            f"{', variant ' + opts.ours_variant if opts.ours_variant else ''})")
        for name in ("torch-loop", "torch-vmap"):
            if f"{name}@{model}:{models}" in skip:
                continue
            wall, res = _worker(name, models, seed, data, recipe, opts, timeout)
            runs[name].append({"wall": wall, **res})
            if res.get("timed_out"):
                log(f"  {model}/{models} {name}: still running after {wall:.0f}s: stopped")
                continue
            acc[name] = res["test_accuracy"]
            log(f"  {model}/{models} {name}: {wall:.1f}s, {res['steady_epoch_seconds']:.3f}s/epoch, "
                f"acc {100 * res['test_accuracy']:.2f}%")

    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    ours_steady = med([_steady(x["epoch_seconds"]) for x in runs["ours_steady"]])
    row = {"model": model, "models": models, "epochs": epochs, "recipe": PEER_MODELS[model][1],
           "recipe_fields": rec.to_dict(), "dataset": dataset, "n_train": n_train,
           "tile_train": opts.tile_train if dataset == "cifar10" else 1,
           "jax_device": runs["ours_steady"][-1].get("jax_device"),
           "torch_device": opts.device, "repeats": repeats, "port_check": port,
           "ours": {"wall_cold": med([x["wall"] for x in runs["ours_cold"]]),
                    "wall_warm": med([x["wall"] for x in runs["ours_warm"]]),
                    "steady_epoch_seconds": ours_steady, "test_accuracy": acc["ours"], "variant": opts.ours_variant,
                    "compile_cold": runs["ours_cold"][-1]["compile"] if runs["ours_cold"] else None,
                    "compile_warm": runs["ours_warm"][-1]["compile"] if runs["ours_warm"] else None},
           "raw": runs}
    for phase in ("cold", "warm"):  # None with --steady-only
        wall = row["ours"][f"wall_{phase}"]
        row["ours"][f"startup_{phase}"] = None if wall is None else wall - epochs * ours_steady
    per_hour = lambda epoch_seconds: 3600 * models / (epochs * epoch_seconds)  # noqa: E731  (steady, whole recipe)
    row["ours"]["models_per_hour"] = per_hour(ours_steady)
    for name in ("torch-loop", "torch-vmap"):
        done = [x for x in runs[name] if not x.get("timed_out")]
        if not done:  # left out, or stopped: its wall time is at least the timeout
            row[name] = {"timed_out_after": min(x["wall"] for x in runs[name])} if runs[name] else None
            continue
        wall = med([x["wall"] for x in done])
        steady = med([x["steady_epoch_seconds"] for x in done])
        row[name] = {"wall": wall, "steady_epoch_seconds": steady, "startup": wall - epochs * steady,
                     "models_per_hour": per_hour(steady), "test_accuracy": acc[name]}
        if all("fastest_model_epoch_seconds" in x for x in done):  # the loop: its fastest model, for the spread
            row[name]["fastest_model_epoch_seconds"] = min(x["fastest_model_epoch_seconds"] for x in done)
    torch_rows = {n: row[n] for n in ("torch-loop", "torch-vmap") if row[n] and "wall" in row[n]}
    if not torch_rows:
        row["void"], row["note"] = True, "no torch variant finished"
        return row
    best_wall = min(torch_rows, key=lambda n: torch_rows[n]["wall"])
    best_steady = min(torch_rows, key=lambda n: torch_rows[n]["steady_epoch_seconds"])
    gap = max(abs(r["test_accuracy"] - acc["ours"]) for r in torch_rows.values())
    row["accuracy_gap_points"] = 100 * gap
    row["void"] = gap > 0.005
    row["best_torch_wall"], row["best_torch_steady"] = best_wall, best_steady
    for phase in ("cold", "warm"):
        wall = row["ours"][f"wall_{phase}"]
        row[f"ratio_wall_{phase}"] = None if wall is None else torch_rows[best_wall]["wall"] / wall
    row["ratio_steady"] = torch_rows[best_steady]["steady_epoch_seconds"] / ours_steady
    if "fastest_model_epoch_seconds" in (row["torch-loop"] or {}):
        row["ratio_steady_vs_fastest_loop_model"] = row["torch-loop"]["fastest_model_epoch_seconds"] / ours_steady
    if row["void"]:
        log(f"  {model}/{models}: mean test accuracies differ by {100 * gap:.2f} points (> 0.5): "
            "the comparison is VOID")
    return row


def table(rows) -> str:
    lines = ["| config | whole process (s): ours cold / ours warm / torch loop / torch vmap | ratio best torch ÷ ours "
             "(cold / warm) | steady s/epoch: ours / best torch | ratio | models/hour (steady): ours / best torch "
             "| start-up (s): ours cold / warm / best torch | test acc (%): ours / loop / vmap |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda x, p=1: "–" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in rows:
        w = r.get("recipe_fields", {}).get("width", 1.0)
        name = r["model"] + ("" if w == 1.0 else f" w{w:g}") + \
            ("" if r.get("tile_train", 1) == 1 else f" (train set x{r['tile_train']})") + \
            ("" if r.get("torch_device", "cpu") == "cpu" else f" ({r['torch_device']}, {r['recipe_fields']['dtype']})")
        if "ratio_steady" not in r:
            lines.append(f"| {name}, {r['models']} models | {r.get('note')} | | | | | | |")
            continue
        o = r["ours"]
        lp, vm = ({} if x is None else x for x in (r["torch-loop"], r["torch-vmap"]))
        lp = lp if "wall" in lp else None
        vm = vm if "wall" in vm else None
        bt = r[r["best_torch_steady"]]
        bw = r[r["best_torch_wall"]]
        void = " **void**" if r["void"] else ""
        lines.append(
            f"| {name}, {r['models']} models{void} | {f(o['wall_cold'])} / {f(o['wall_warm'])} / "
            f"{f(lp and lp['wall'])} / {f(vm and vm['wall'])} | **{f(r['ratio_wall_cold'], 2)}** / "
            f"**{f(r['ratio_wall_warm'], 2)}** ({r['best_torch_wall']}) | {f(o['steady_epoch_seconds'], 3)} / "
            f"{f(bt['steady_epoch_seconds'], 3)} ({r['best_torch_steady']}) | **{r['ratio_steady']:.2f}** | "
            f"{f(o.get('models_per_hour'), 0)} / {f(bt.get('models_per_hour'), 0)} | "
            f"{f(o['startup_cold'])} / {f(o['startup_warm'])} / {f(bw['startup'])} | "
            f"{100 * o['test_accuracy']:.2f} / {f(lp and 100 * lp['test_accuracy'], 2)} / "
            f"{f(vm and 100 * vm['test_accuracy'], 2)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--configs", nargs="+", default=["mlp:64", "mlp:256", "cnn:64", "cnn:256"],
                   help="MODEL:K, MODEL one of mlp, cnn (digits) or resnet9 (cifar10: needs --data-dir)")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python archive folder, for resnet9")
    p.add_argument("--tile-train", type=int, default=1, metavar="R",
                   help="repeat the CIFAR-10 training images R times (10 on cifar10-mini: 50 steps an epoch, about "
                        "the per-model work of the paper's 50,000 images, from real images)")
    p.add_argument("--width", type=float, default=None, help="override every recipe's width (e.g. 0.25 on a CPU)")
    p.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (lr peak moved along)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="the torch workers' device; cuda: channels-last, bf16 autocast, cuDNN autotuning, and "
                        "ours in bfloat16 (the recipe's dtype) on JAX's default GPU")
    p.add_argument("--dtype", default=None, help="override the recipe's dtype for ours (default: float32 on "
                                                 "cpu, bfloat16 with --device cuda)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steady-only", action="store_true",
                   help="leave out our whole-process runs (jaxunlearn train, cold and warm): steady state only")
    p.add_argument("--ours-variant", default=None, metavar="NAME",
                   help="with --steady-only: ours as step_variants.py's formulation NAME (e.g. pool_first_max) "
                        "instead of the library's, to measure a candidate against torch before adopting it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], help="e.g. torch-vmap@cnn:256 (a slow peer left out)")
    p.add_argument("--timeout", type=float, default=None, help="stop a torch process after this many seconds")
    p.add_argument("--omp-wait-policy", default="",
                   help="OMP_WAIT_POLICY for the torch processes (default: OpenMP's own); PASSIVE on a machine "
                        "shared with other work, where spinning threads made torch 100-200x slower here")
    # worker mode (internal)
    p.add_argument("--worker", choices=sorted(WORKERS), default=None)
    p.add_argument("--models", type=int, default=64)
    p.add_argument("--data", default=None)
    p.add_argument("--recipe", default=None)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return 0
    try:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ImportError
    except ImportError:
        raise SystemExit("PyTorch is not installed: pip install -e .[peers]") from None
    global OMP_WAIT_POLICY
    OMP_WAIT_POLICY = a.omp_wait_policy
    if a.data_dir is not None:  # the subprocesses run in the repository root
        a.data_dir = os.path.abspath(a.data_dir)
    if a.dtype is None and a.device == "cuda":
        a.dtype = "bfloat16"
    if a.epochs is not None and a.epochs < 2:
        raise SystemExit(f"--epochs {a.epochs}: the steady state needs at least 2 epochs (the first one carries "
                         "compiling and warm-up)")
    if a.ours_variant is not None:
        if not a.steady_only:
            raise SystemExit("--ours-variant needs --steady-only (the whole-process runs are jaxunlearn train's, "
                             "the library as it is)")
        from step_variants import check_variant  # this script's folder is first on sys.path

        check_variant(a.ours_variant, "--ours-variant")
    if a.tile_train < 1:
        raise SystemExit(f"--tile-train must be >= 1, got {a.tile_train}")
    tiled = None
    if a.tile_train > 1:
        if a.data_dir is None:
            raise SystemExit("--tile-train repeats a CIFAR-10 archive: give --data-dir")
        tiled = a.data_dir = tiled_cifar10_archive(a.data_dir, a.tile_train, tempfile.mkdtemp(prefix="peer-tiled-"))
    try:
        return _compare(a)
    finally:
        if tiled:
            shutil.rmtree(tiled, ignore_errors=True)


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _compare(a) -> int:
    rows = []
    for spec in a.configs:
        model, _, models = spec.partition(":")
        if model not in PEER_MODELS or not models.isdigit():
            raise SystemExit(f"--configs: {spec!r} is not MODEL:K with MODEL one of {', '.join(PEER_MODELS)}")
        if PEER_MODELS[model][0] == "cifar10" and a.data_dir is None:
            raise SystemExit(f"--configs {spec}: resnet9 trains on CIFAR-10: give --data-dir (the python archive "
                             "folder, e.g. ../shared/data/cifar10-mini)")
        log(f"{model} x {models} models")
        rows.append(run_config(model, int(models), a.seed, a.repeats, set(a.skip), log, a, a.timeout))
        if a.json:  # what is done so far, in case a later configuration is stopped
            from jaxunlearn.utils import write_json_atomic

            write_json_atomic(a.json, {"rows": rows, "partial": True})
    import platform

    jax_devices = sorted({r["jax_device"] for r in rows if r.get("jax_device")})
    if a.device == "cuda" and any("cpu" in k.lower() for k in jax_devices):
        log(f"ours ran on {jax_devices}, not a GPU: this is no GPU comparison")
    res = {"machine": {"cores": cores(), "platform": platform.platform(), "python": platform.python_version(),
                       "torch_omp_wait_policy": OMP_WAIT_POLICY or "default", "torch_device": a.device,
                       "jax_devices": jax_devices},
           "note": "ratio = best torch time / ours (above 1: jaxunlearn faster)", "rows": rows}
    try:
        import jax
        import torch

        res["machine"].update(jax=jax.__version__, torch=torch.__version__)
        if a.device == "cuda":
            res["machine"]["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    print(table(rows))
    if a.json:
        from jaxunlearn.utils import write_json_atomic

        write_json_atomic(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
