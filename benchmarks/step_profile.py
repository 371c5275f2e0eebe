"""Where one ensemble epoch's device time goes: a profile of ``train``'s epoch program, kernels by kind.

    python benchmarks/step_profile.py --json FILE [--data-dir CIFAR] [--models 4] [--width 1] [--dtype bfloat16]
                                      [--torch]

Traces one epoch of the ``cifar10-resnet9`` recipe (after an untimed warm-up epoch) with
``jax.profiler``, laid out as ``train`` lays it out, and sums the device time of every kernel by kind:
convolutions (cuDNN / implicit-GEMM kernels and XLA convolution ops), matmuls, reductions (BatchNorm
statistics, pooling, the loss), and the remaining elementwise fusions (BatchNorm apply, ReLU, the
optimizer update, augmentation). ``busy`` is the union of the kernels' intervals over the epoch's
wall time: the rest is the device waiting on the host. The top kernels with their HLO ops are kept.

With ``--torch`` the PyTorch loop step of ``peer_torch.py`` (channels-last, bf16 autocast on CUDA) is
profiled the same way with ``torch.profiler``, so both frameworks' splits sit side by side.
On the CPU the rows are XLA's CPU thunks, one per HLO op, with the im2col data movement as its own kind;
several run at once on the host's threads, so their times are thread-seconds that can add up to more
than the wall time. Torch's are aten ops' self times (no busy time).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# substrings of kernel names / HLO ops, first match wins. Not a bare "conv" (XLA's "convert" fusions), and
# torch's BatchNorm kernels split by what they do: statistics are reductions, transform / backward_elemt
# are elementwise
KINDS = (("convolution", ("cudnn", "xmma", "implicit_gemm", "fprop", "dgrad", "wgrad", "winograd", "convolution")),
         ("matmul", ("gemm", "cublas", "dot", "cutlass")),
         ("reduction", ("reduce", "reduction", "collect_statistics", "max_pool", "pool")))
# XLA CPU ops: the convolutions are im2col patches + YNNPACK dots, so the patch building, its backward
# (pad + slice sums) and the transposed copies are a kind of their own
CPU_KINDS = (("convolution", ("convolution",)),
             ("matmul", ("ynn_fusion", "dot", "aten::mm", "aten::addmm", "aten::bmm")),
             ("data movement (patches, their backward, transposed copies)",
              ("concatenate", "pad_slice", "slice_pad", "copy", "transpose", "cat", "index", "pad")),
             ("reduction", ("reduce", "max_pool", "pool", "batch_norm")))
HLO_OP = re.compile(r"[a-z][\w\-]*(\.\d+)?")
ANNOTATION = re.compile(r"[A-Za-z_][\w.]*#[\w.]+")  # torch's "Optimizer.step#SGD.step", not "{lambda()#3}"
CONTROL_FLOW = ("while", "call", "conditional")  # thunks that hold other thunks: their time is counted inside


def kind_of(*names: str, kinds=KINDS) -> str:
    text = " ".join(n.lower() for n in names if n)
    for kind, keys in kinds:
        if any(k in text for k in keys):
            return kind
    return "elementwise / other"


def busy_seconds(intervals) -> float:
    """Length of the union of [start, end) intervals (microseconds in, seconds out)."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total * 1e-6


def split(events, wall: float, kinds=KINDS, timed: bool = True) -> dict:
    """events: (name, hlo_op, start_us, dur_us, count) of kernels -> the split by kind, and the top kernels.
    ``timed``: the events carry start times (else no busy time: aggregated op times have none)."""
    by_kind: dict = collections.defaultdict(float)
    by_name: dict = collections.defaultdict(lambda: [0.0, 0, ""])
    for name, op, _, dur, count in events:
        by_kind[kind_of(name, op, kinds=kinds)] += dur * 1e-6
        row = by_name[name]
        row[0] += dur * 1e-6
        row[1] += count
        row[2] = row[2] or op
    kernel = sum(by_kind.values())
    busy = busy_seconds([(s, s + d) for _, _, s, d, _ in events]) if timed else None
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return {"wall_seconds": wall, "kernel_seconds": kernel, "busy_seconds": busy,
            "busy_fraction_of_wall": busy / wall if wall and busy is not None else None,
            "kernels": sum(e[4] for e in events),
            "by_kind_seconds": dict(by_kind),
            "by_kind_fraction": {k: v / kernel for k, v in by_kind.items()} if kernel else {},
            "top_kernels": [{"name": n[:160], "seconds": s, "count": c, "hlo_op": op} for n, (s, c, op) in top]}


def profile_ours(a) -> dict:
    import jax
    import numpy as np

    sys.path.insert(0, HERE)
    from train_chunk import train_chunk

    from jaxunlearn.data import load_dataset
    from jaxunlearn.training.recipe import load_recipe
    from jaxunlearn.training.subsets import steps_per_epoch

    d = load_dataset("cifar10", a.data_dir)
    recipe = load_recipe("cifar10-resnet9").replace(width=a.width, dtype=a.dtype)
    c = train_chunk(recipe, d, a.models, 0)
    x, y, m = c.images, c.labels, c.masks
    states, keys = c.fns.init_models(np.int32(0), c.ids)
    states, _ = jax.block_until_ready(c.fns.epoch(states, x, y, m, keys, np.int32(0)))  # compile + warm-up
    trace = tempfile.mkdtemp(prefix="step-profile-")
    with jax.profiler.trace(trace, create_perfetto_trace=True):
        t = time.perf_counter()
        states, _ = jax.block_until_ready(c.fns.epoch(states, x, y, m, keys, np.int32(1)))
        wall = time.perf_counter() - t
    path = glob.glob(os.path.join(trace, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    cpu = jax.default_backend() == "cpu"
    if cpu:  # XLA CPU's thunks run on the host: one event per HLO op, named as the op (several at once)
        keep = lambda e: HLO_OP.fullmatch(e["name"]) is not None and not e["name"].startswith(CONTROL_FLOW)  # noqa: E731
    else:
        keep = lambda e: "/device:" in procs.get(e["pid"], "")  # noqa: E731
    kernels = [(e["name"], e.get("args", {}).get("hlo_op", ""), float(e["ts"]), float(e["dur"]), 1) for e in events
               if e.get("ph") == "X" and "dur" in e and keep(e)]
    steps = a.models * steps_per_epoch(np.asarray(c.masks), recipe.batch_size)
    return {"layout": c.layout, "model_steps": steps,
            "seconds_per_model_step": wall / steps, "device_processes": sorted(set(procs.values())),
            **split(kernels, wall, CPU_KINDS if cpu else KINDS, timed=not cpu)}


def profile_torch(a) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, HERE)
    import peer_torch as peer

    from jaxunlearn.data import load_dataset

    d = load_dataset("cifar10", a.data_dir)
    tmp = tempfile.mkdtemp(prefix="step-profile-torch-")
    np.savez(os.path.join(tmp, "d.npz"), train_images=d.train_images, train_labels=d.train_labels,
             test_images=d.test_images, test_labels=d.test_labels, mean=np.asarray(d.mean, np.float32),
             std=np.asarray(d.std, np.float32), masks=np.ones((1, d.n_train), bool))
    cuda = torch.cuda.is_available()
    recipe = peer.peer_recipe("resnet9", a.width, dtype=a.dtype).to_dict()
    ns = argparse.Namespace(data=os.path.join(tmp, "d.npz"), device="cuda" if cuda else "cpu", recipe=json.dumps(recipe))
    torch_, data = peer._torch_setup(ns)
    net = peer._torch_model(torch, "resnet9", tuple(data["x"].shape[1:]), recipe["width"])
    net = net.to(data["device"], memory_format=data["format"]).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator(device=data["device"]).manual_seed(0)
    bs = recipe["batch_size"]

    def step(i):
        idx = torch.randint(0, d.n_train, (bs,), generator=gen, device=data["device"])
        xb = peer._augment(torch, data["x"][idx], recipe["crop_pad"], recipe["flip"], gen)
        xb = xb.contiguous(memory_format=data["format"])
        opt.zero_grad(set_to_none=True)
        with data["autocast"]():
            loss = loss_fn(net(xb), data["y"][idx])
        loss.backward()
        opt.step()

    for i in range(10 if cuda else 2):  # warm-up (cuDNN autotuning)
        step(i)
    data["sync"]()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    n = a.torch_steps
    with torch.profiler.profile(activities=acts) as prof:
        t = time.perf_counter()
        for i in range(n):
            step(i)
        data["sync"]()
        wall = time.perf_counter() - t
    if cuda:
        # kernels only: user annotations on the GPU timeline ("Optimizer.step#SGD.step") span idle gaps too
        kernels = [(e.name, "", float(e.time_range.start), float(e.time_range.end - e.time_range.start), 1)
                   for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False) and not ANNOTATION.fullmatch(e.name)]
        return {"model_steps": n, "seconds_per_model_step": wall / n, **split(kernels, wall)}
    # CPU: each aten op's self time (oneDNN convolutions are ``mkldnn_convolution`` and its backward);
    # aggregated, so no busy time
    kernels = [(e.key, "", 0.0, float(e.self_cpu_time_total), int(e.count)) for e in prof.key_averages()
               if e.key.startswith("aten::") and e.self_cpu_time_total > 0]
    return {"model_steps": n, "seconds_per_model_step": wall / n, **split(kernels, wall, CPU_KINDS, timed=False)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python archive folder (default: tfds)")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--torch", action="store_true", help="also profile the PyTorch loop step (needs torch)")
    p.add_argument("--torch-steps", type=int, default=20)
    a = p.parse_args(argv)
    import jax

    from jaxunlearn.utils import write_json_atomic

    if a.dtype is None:
        a.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "models": a.models,
           "width": a.width, "dtype": a.dtype, "ours": profile_ours(a)}
    if a.torch:
        try:
            res["torch_loop"] = profile_torch(a)
        except Exception as e:  # noqa: BLE001  (ours is kept whatever happens to the peer's profile)
            res["torch_loop"] = {"error": f"{type(e).__name__}: {e}"}
    write_json_atomic(a.json, res)
    for name in ("ours", "torch_loop"):
        r = res.get(name)
        if not r or "error" in r:
            print(f"{name}: {r and r['error']}")
            continue
        kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(r["by_kind_fraction"].items(), key=lambda kv: -kv[1]))
        busy = r["busy_fraction_of_wall"]
        print(f"{name}: {1e3 * r['seconds_per_model_step']:.2f} ms per model step; device busy "
              f"{'–' if busy is None else f'{100 * busy:.0f}%'} of wall; kernel time: {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
