from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.models import CONV_FNS, make_model, max_pool_2x2, xla_conv
from jaxunlearn.models.layers import WINOGRAD_MIN_CHANNELS, BatchNormReLU, batch_norm_relu
from conftest import check_jit


def normal(seed: int, *shape):
    """Test inputs from NumPy's generator: jax.random compiles a program for every new shape (about 0.5 s each)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def out_shape(x, w, stride, pad):
    return jax.eval_shape(lambda x, w: xla_conv(x, w, stride, pad), x, w).shape


def assert_equals_xla_conv(conv, x, w, stride, pad, seed):
    """conv's values and both gradients (input and kernel, against a random cotangent) equal lax.conv's."""
    g = normal(seed, *out_shape(x, w, stride, pad))

    def values_and_grads(conv, x, w):
        return conv(x, w, stride, pad), jax.grad(lambda x, w: (conv(x, w, stride, pad) * g).sum(), (0, 1))(x, w)

    (a, ga), (b, gb) = (check_jit(partial(values_and_grads, c))(x, w) for c in (conv, xla_conv))
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for u, v in zip(ga, gb):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-3)


SHAPES = [(3, 1, 1), (5, 2, 2), (3, 1, 0), (1, 2, 0), (3, 2, 1), (1, 1, 1)]
# every shape for the formulations with their own index arithmetic (im2col, the custom backward);
# two (a strided padded one and an unpadded one) for the plain re-wirings; one for winograd at 3 channels
# (im2col there; its own arithmetic has the test after this one)
CASES = [(impl, *shape) for impl in ("im2col", "xla_canonical") for shape in SHAPES] + \
        [(impl, *shape) for impl in ("shift", "xla_nchw") for shape in SHAPES[1:3]] + [("winograd", *SHAPES[1])] + \
        [("xla_s2d", 5, 2, 2), ("xla_s2d", 6, 2, 1), ("xla_s2d", 3, 2, 1)]  # the 2x2-block path, and a strided 3x3


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 1, 0), (5, 2, 2), (6, 2, 1)])
def test_winograd_equals_xla_conv_where_it_is_used(k, stride, pad):
    """Winograd's own arithmetic, values and both gradients: every channel count let through (an odd size),
    and the default threshold (16 channels, an even size: im2col for 3x3, Winograd over 4·16 for 5x5 stride 2)."""
    for c, min_channels, size in ((3, 1, (8, 7)), (16, WINOGRAD_MIN_CHANNELS, (9, 9))):
        x, w = normal(size[1] + c, 2, *size, c), normal(size[1] + c + 1, k, k, c, 5) / c ** 0.5
        assert_equals_xla_conv(partial(CONV_FNS["winograd"], min_channels=min_channels), x, w, stride, pad,
                               seed=size[1] + c + 2)


@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2)])
def test_winograd_in_bfloat16_keeps_the_dtype_and_stays_close(k, stride):
    """A bfloat16 model (the GPU recipes' dtype) through Winograd: bfloat16 out, values and input gradient
    within a few bfloat16 roundings of the float32 convolution (measured about 0.5 %; bfloat16's step is 0.8 %)."""
    x, w = normal(7, 2, 8, 8, 16), normal(8, k, k, 16, 8) / 12
    g = normal(9, *out_shape(x, w, stride, 1))
    conv = partial(CONV_FNS["winograd"], min_channels=1)

    def value_and_dx(conv, x, w):
        y, vjp = jax.vjp(lambda x: conv(x, w, stride, 1), x)
        return y, vjp(g.astype(y.dtype))[0]

    y, dx = check_jit(partial(value_and_dx, conv))(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    y32, dx32 = check_jit(partial(value_and_dx, xla_conv))(x, w)
    assert y.dtype == dx.dtype == jnp.bfloat16
    for got, want in ((y, y32), (dx, dx32)):
        rel = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
        assert rel < 0.02, rel


def test_winograd_takes_the_winograd_path_from_32_channels():
    """Which formulation runs, read off the program: Winograd's matmul is batched over the 4x4 tile positions
    (two batch dimensions), im2col's is not. A 5x5 stride-2 layer counts its 4·C space-to-depth channels."""
    def winograd_used(c, k=3, stride=1):
        x, w = jnp.zeros((1, 8, 8, c)), jnp.zeros((k, k, c, 4))
        jaxpr = jax.make_jaxpr(CONV_FNS["winograd"], static_argnums=(2, 3))(x, w, stride, 1).jaxpr
        return any(len(e.params["dimension_numbers"][1][0]) == 2 for e in jaxpr.eqns if e.primitive.name == "dot_general")

    assert winograd_used(64) and winograd_used(32) and not winograd_used(16) and not winograd_used(3)
    assert winograd_used(8, 5, 2) and not winograd_used(4, 5, 2) and not winograd_used(64, 3, 2)


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (5, 2, 2), (3, 1, 0)])
def test_im2col_with_patches_narrower_than_the_output(k, stride, pad):
    """k·k·C < F (a first layer over image channels): the kernel gradient from transposed patches, its own
    index arithmetic (channels leading, rows in the kernel's order), on one model and vmapped over models."""
    def narrow_used(x, w):
        jaxpr = jax.make_jaxpr(CONV_FNS["im2col"], static_argnums=(2, 3))(x, w, stride, pad).jaxpr
        return any("custom_vjp" in e.primitive.name for e in jaxpr.eqns)

    for c, size in ((1, (9, 9)), (2, (8, 7))):
        x, w = normal(c, 2, *size, c), normal(c + 1, k, k, c, k * k * c + 3)
        assert narrow_used(x, w) and not narrow_used(x, w[..., :k * k * c])
        assert_equals_xla_conv(CONV_FNS["im2col"], x, w, stride, pad, seed=c + 2)
    xs, ws = normal(5, 3, 2, 8, 7, 2), normal(6, 3, k, k, 2, k * k * 2 + 8)
    assert narrow_used(xs[0], ws[0])

    def grads(conv):
        return check_jit(jax.vmap(jax.grad(lambda x, w: (conv(x, w, stride, pad) ** 2).sum(), argnums=(0, 1))))(xs, ws)

    for u, v in zip(grads(CONV_FNS["im2col"]), grads(xla_conv)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-3)


def test_every_conv_formulation_is_checked():
    assert {c[0] for c in CASES} | {"xla"} == set(CONV_FNS)


@pytest.mark.parametrize("impl,k,stride,pad", CASES)
def test_every_conv_formulation_equals_xla_conv(impl, k, stride, pad):
    # 9x9: every stride divides the span; 8x7: a remainder row / column the stride skips
    for size in ((9, 9), (8, 7)):
        x, w = normal(size[1], 2, *size, 3), normal(size[1] + 1, k, k, 3, 5)
        assert_equals_xla_conv(CONV_FNS[impl], x, w, stride, pad, seed=size[1] + 2)


@pytest.mark.parametrize("impl,k,stride", [("xla_canonical", 3, 2), ("winograd", 3, 1), ("winograd", 5, 2)])
def test_conv_gradients_under_vmap_over_models(impl, k, stride):
    """The ensemble vmaps a formulation over models (kernels and inputs both batched): the custom
    backward, and Winograd's sixteen matmuls (batched over models and tile positions)."""
    x, w = normal(4, 3, 2, 8, 7, 3), normal(5, 3, k, k, 3, 4)

    def grads(conv):
        return check_jit(jax.vmap(jax.grad(lambda x, w: (conv(x, w, stride, 1) ** 2).sum(), argnums=(0, 1))))(x, w)

    conv = partial(CONV_FNS["winograd"], min_channels=1) if impl == "winograd" else CONV_FNS[impl]
    for u, v in zip(grads(conv), grads(xla_conv)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2)])
def test_max_pool_2x2_equals_flax_max_pool(shape):
    import flax.linen as nn

    x = normal(1, *shape)  # continuous values: no ties within a window
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))
    g = normal(2, *jax.eval_shape(max_pool_2x2, x).shape)
    ours = jax.grad(lambda x: (max_pool_2x2(x) * g).sum())(x)
    flax_ = jax.grad(lambda x: (nn.max_pool(x, (2, 2), (2, 2)) * g).sum())(x)
    np.testing.assert_array_equal(ours, flax_)
    # a tied window: the gradient is split evenly (reduce_window gives it all to the first)
    tied = jnp.zeros((1, 2, 2, 1))
    np.testing.assert_allclose(jax.grad(lambda x: max_pool_2x2(x).sum())(tied), np.full((1, 2, 2, 1), 0.25))


@pytest.mark.parametrize("name,shape,width", [("resnet9", (32, 32, 3), 0.125), ("resnet18", (16, 16, 3), 0.125),
                                              ("cnn", (8, 8, 1), 1.0), ("mlp", (8, 8, 1), 1.0),
                                              ("vit", (32, 32, 3), 0.0625), ("vit", (8, 8, 1), 0.0625)])
def test_models_map_images_to_logits(name, shape, width):
    m = make_model(name, 10, width)
    x = jnp.ones((3, *shape))
    v = check_jit(lambda x: m.init(jax.random.key(0), x, train=False))(x)
    y, new = check_jit(lambda v, x: m.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert y.shape == (3, 10) and y.dtype == jnp.float32
    assert ("batch_stats" in v) == (name not in ("mlp", "vit"))
    # same parameters, another conv formulation (all of them for the small CNN), same outputs
    y1 = check_jit(lambda v, x: m.apply(v, x, train=False))(v, x)
    for impl in (CONV_FNS if name == "cnn" else ["xla"]):
        y2 = check_jit(lambda v, x: make_model(name, 10, width, impl=impl).apply(v, x, train=False))(v, x)
        np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4, err_msg=impl)


def test_resnet9_cpu_formulation_trains_like_lax_conv(width=0.5):
    """The whole ResNet-9 in Winograd (its CPU default), width 0.5: the 3 -> 32 first layer takes the narrow
    im2col path, the 3x3 layers (64 channels and up) and the 5x5 stride-2 one Winograd. Train-mode logits and
    the loss gradient of every parameter equal lax.conv's. (Which layers take Winograd at the 32-channel
    threshold: the test of that above; Winograd's arithmetic at any channel count: the tests before it.)"""
    x, y = normal(3, 4, 32, 32, 3), jnp.arange(4) % 10
    v = check_jit(lambda x: make_model("resnet9", 10, width).init(jax.random.key(0), x, train=False))(x)

    def logits_and_grads(impl):
        m = make_model("resnet9", 10, width, impl=impl)

        def loss(params):
            out, _ = m.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
            return -jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], 1).mean(), out

        return check_jit(jax.grad(loss, has_aux=True))(v["params"])

    (g1, y1), (g2, y2) = logits_and_grads("winograd"), logits_and_grads("xla")
    np.testing.assert_allclose(y1, y2, rtol=1e-4, atol=1e-4)
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g1), jax.tree.leaves(g2)):
        scale = float(jnp.abs(b).max())
        assert float(jnp.abs(a - b).max()) <= 1e-3 * scale + 1e-6, jax.tree_util.keystr(path[0])


def test_vit_is_the_del_papers_small_data_vit():
    from jaxunlearn.models.vit import shifted_patches

    m = make_model("vit", 10, 1.0)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
    # the authors' ViT(patch 8, dim 512, depth 4, heads 8, dim_head 64, mlp 1536) on 32x32x3, 10 classes:
    # SPT (LN 960 + 960x512 + b) + cls + pos(17) + 4 x (LN, qkv 512x1536, temperature, out 512x512 + b,
    # LN, 512x1536 + b, 1536x512 + b) + head (LN, 512x10 + b)
    spt = 2 * 960 + 960 * 512 + 512
    block = 2 * 512 + 512 * 1536 + 1 + 512 * 512 + 512 + 2 * 512 + 512 * 1536 + 1536 + 1536 * 512 + 512
    assert n == spt + 512 + 17 * 512 + 4 * block + 2 * 512 + 512 * 10 + 10
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    t = shifted_patches(x, 2)
    assert t.shape == (2, 4, 2 * 2 * 5)
    assert float(t[0, 0, 0]) == 0.0 and float(t[0, 0, 1]) == 1.0  # patch 0, pixel (0,0): x, then x shifted left


def test_resnet9_is_the_paper_model():
    m = make_model("resnet9", 10, 1.0)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False))
    kernels = [l.shape for l in jax.tree.leaves(v["params"]) if len(l.shape) == 4]
    assert [k[-1] for k in kernels] == [64, 128, 128, 128, 256, 256, 256, 128]
    assert kernels[1][:2] == (5, 5)
    n = sum(int(np.prod(l.shape)) for l in jax.tree.leaves(v["params"]))
    convs = 3 * 3 * 3 * 64 + 5 * 5 * 64 * 128 + 2 * 9 * 128 * 128 + 9 * 128 * 256 + 2 * 9 * 256 * 256 + 9 * 256 * 128
    bn = 2 * (64 + 3 * 128 + 3 * 256 + 128)
    assert n == convs + bn + 128 * 10 == 2_274_880  # head: 128x10, no bias


def test_resnet18_is_the_cifar_resnet18_of_the_unlearning_papers_code():
    # kuangliu's CIFAR ResNet-18 (DEL's and SalUn's code): 3x3 stem, BasicBlocks [2, 2, 2, 2] of 64-512
    # channels, 1x1 projection shortcuts where the shape changes, convs without bias, linear head with bias
    m = make_model("resnet18", 10, 1.0)
    v = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)), train=False))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))

    def block(cin, cout):
        short = cin * cout + 2 * cout if cin != cout else 0
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout + short

    widths = [64, 64, 128, 128, 256, 256, 512, 512]
    blocks = sum(block(cin, cout) for cin, cout in zip([64] + widths[:-1], widths))
    assert n == 27 * 64 + 2 * 64 + blocks + 512 * 10 + 10 == 11_173_962


def test_bad_model_names():
    with pytest.raises(JaxUnlearnError, match="unknown model 'transformer'"):
        make_model("transformer", 10)
    with pytest.raises(JaxUnlearnError, match="unknown conv implementation"):
        make_model("cnn", 10, impl="fft")


class _FlaxBatchNormReLU(nn.Module):
    """What ``ConvBN`` computed before :class:`BatchNormReLU`: flax's BatchNorm, then ReLU."""
    train: bool

    @nn.compact
    def __call__(self, x):
        bn = nn.BatchNorm(use_running_average=not self.train, momentum=0.9, epsilon=1e-5, dtype=x.dtype,
                          name="BatchNorm_0")
        return nn.relu(bn(x))


class _BatchNormReLU(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x):
        return BatchNormReLU(use_running_average=not self.train, name="BatchNorm_0")(x)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_norm_relu_is_flax_batchnorm_then_relu(dtype):
    """Same variables, values, running statistics and gradients as nn.BatchNorm + nn.relu, in training and eval
    mode; its written-out backward pass against autodiff's (bfloat16: within one rounding of the input gradient)."""
    x = (normal(0, 8, 6, 6, 16) * 2 + 0.5).astype(dtype)
    cot = normal(1, 8, 6, 6, 16)
    ref_vars = _FlaxBatchNormReLU(True).init(jax.random.key(0), x)
    new_vars = _BatchNormReLU(True).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ref_vars) == jax.tree.map(jnp.shape, new_vars)
    for a, b in zip(jax.tree.leaves(ref_vars), jax.tree.leaves(new_vars)):  # init: ones, zeros, 0 and 1
        np.testing.assert_array_equal(a, b)
    params = {"BatchNorm_0": {"scale": 0.5 + jnp.abs(normal(2, 16)), "bias": 0.3 * normal(3, 16)}}
    stats = {"BatchNorm_0": {"mean": 0.1 * normal(4, 16), "var": 1 + jnp.abs(normal(5, 16))}}

    def train_out(module, params, x):
        y, new = module(True).apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        return (y.astype(jnp.float32) * cot).sum(), (y, new["batch_stats"])

    results = [check_jit(jax.value_and_grad(partial(train_out, m), (0, 1), has_aux=True))(params, x)
               for m in (_FlaxBatchNormReLU, _BatchNormReLU)]
    ((_, (y0, s0)), (gp0, gx0)), ((_, (y1, s1)), (gp1, gx1)) = results
    assert y1.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0, np.float32), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s0) + jax.tree.leaves(gp0), jax.tree.leaves(s1) + jax.tree.leaves(gp1)):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5)
    gx0, gx1 = (np.asarray(g, np.float32) for g in (gx0, gx1))
    tol = 1e-5 if dtype == "float32" else 2 ** -7  # bfloat16: the input gradient is rounded once, differently
    np.testing.assert_allclose(gx1, gx0, rtol=0, atol=tol * np.abs(gx0).max())
    evals = [m(False).apply({"params": params, "batch_stats": stats}, x) for m in (_FlaxBatchNormReLU, _BatchNormReLU)]
    np.testing.assert_array_equal(np.asarray(evals[1], np.float32), np.asarray(evals[0], np.float32))


def test_batch_norm_relu_gradients_of_its_statistics_and_second_order():
    """The returned batch mean and variance carry their gradients too, and a Hessian-vector product
    (forward-over-reverse, as ``metrics.unrolling`` takes them) goes through the written-out backward pass."""
    scale, bias, w = 0.5 + jnp.abs(normal(6, 16)), 0.3 * normal(7, 16), normal(8, 8, 6, 6, 16)
    a, b = normal(9, 16), normal(10, 16)

    def loss(bn_relu, x):
        y, mean, var = bn_relu(x)
        return (y * w).sum() + (mean * a).sum() + (var * b).sum()

    def by_hand(x):  # BatchNorm's definition, differentiated by JAX
        mean = x.mean((0, 1, 2))
        var = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - mean * mean)
        return jnp.maximum((x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, 0.0), mean, var

    fns = [partial(loss, lambda x: batch_norm_relu(x, scale, bias, 1e-5)), partial(loss, by_hand)]
    x, v = normal(11, 8, 6, 6, 16), normal(12, 8, 6, 6, 16)
    g1, g0 = (check_jit(jax.grad(f))(x) for f in fns)
    np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5 * np.abs(g0).max())
    h1, h0 = (check_jit(lambda x, f=f: jax.jvp(jax.grad(f), (x,), (v,))[1])(x) for f in fns)
    np.testing.assert_allclose(h1, h0, rtol=1e-4, atol=1e-4 * np.abs(h0).max())
