"""Layers whose ensemble (vmapped) form is fast on every backend.

``Conv`` has interchangeable formulations with the same parameters (kernel f32[kh, kw, c_in, c_out]):

* ``"xla"``: ``lax.conv_general_dilated`` (NHWC). Under ``vmap`` over models the kernel gains
  a batch axis and XLA lowers it to a grouped convolution, slow in the backward pass on CPU.
* ``"xla_canonical"``: ``"xla"`` with a custom backward pass in the same layout (see
  :func:`canonical_conv`): XLA's CPU backend runs JAX's own backward convolutions slowly in loops.
* ``"xla_nchw"``: the same convolution in NCHW / OIHW layout (PyTorch's), transposed around it.
* ``"xla_s2d"``: ``"xla"``, with 5x5 and 6x6 stride-2 convolutions as 3x3 stride-1 ones over 2x2 blocks of
  the input (:func:`xla_s2d_conv`): no strided convolution, whose input gradient XLA's GPU backend runs slowly.
* ``"im2col"``: patches by strided slicing, then one matmul. Under ``vmap`` it becomes a
  batched matmul, which every backend runs well.
* ``"shift"``: a sum of k·k shifted matmuls, no patch tensor in memory.
* ``"winograd"``: 3x3 stride-1 convolutions of 32 or more input channels as Winograd's F(2x2, 3x3),
  2.25x fewer multiplications for a transform of the input and output tiles (:func:`winograd_conv`);
  5x5 and 6x6 stride-2 ones as 3x3 ones over 2x2 blocks of the input, then the same; im2col for the rest.

Which one an ensemble uses is measured (``benchmarks/ensemble_throughput.py``), not assumed.
"""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# PyTorch's default init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def shifted_windows(x, k: int, stride: int, padding: int, axis: int = 1) -> list:
    """The k·k strided views of zero-padded x that a k x k convolution multiplies by its kernel taps,
    in (i, j) row-major order. x: f32[B, H, W, C] -> k·k arrays f32[B, Ho, Wo, C]; the image rows and
    columns are axes ``axis`` and ``axis`` + 1 (2 for x f32[C, B, H, W])."""
    h, w = x.shape[axis], x.shape[axis + 1]
    if padding:
        x = jnp.pad(x, [(padding, padding) if a in (axis, axis + 1) else (0, 0) for a in range(x.ndim)])
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    def window(i, j):  # one strided slice, as x[:, i::stride, j::stride, :] cut to Ho x Wo
        start, limit, strides = [0] * x.ndim, list(x.shape), [1] * x.ndim
        for a, o, n in ((axis, i, ho), (axis + 1, j, wo)):
            start[a], limit[a], strides[a] = o, o + stride * (n - 1) + 1, stride
        return lax.slice(x, start, limit, strides)

    return [window(i, j) for i in range(k) for j in range(k)]


def im2col_conv(x, kernel, stride: int, padding: int):
    """x: f32[B, H, W, C], kernel: f32[k, k, C, F] -> f32[B, Ho, Wo, F] (zero padding). Where the patches are
    narrower than the output (k·k·C < F: a first layer over 1-3 image channels), the kernel gradient reads
    patches built transposed from x (:func:`_narrow_im2col_conv`)."""
    k, c, f = kernel.shape[0], x.shape[-1], kernel.shape[-1]
    if k * k * c < f:
        return _narrow_im2col_conv(x, kernel, stride, padding)
    return _im2col(x, kernel, stride, padding)


def _im2col(x, kernel, stride: int, padding: int):
    k, c = kernel.shape[0], x.shape[-1]
    cols = shifted_windows(x, k, stride, padding)
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # [B, Ho, Wo, k*k*C]
    return patches @ kernel.reshape(k * k * c, -1)


def transposed_patches(x, k: int, stride: int, padding: int):
    """im2col's patches, transposed: x f32[B, H, W, C] -> f32[k·k·C, B·Ho·Wo], rows in the kernel's (i, j, c)
    order. The windows are cut from x with its channels leading, so every row is written contiguously."""
    windows = jnp.stack(shifted_windows(x.transpose(3, 0, 1, 2), k, stride, padding, axis=2))  # [k·k, C, B, Ho, Wo]
    return windows.reshape(k * k * x.shape[-1], -1)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _narrow_im2col_conv(x, kernel, stride: int, padding: int):
    """im2col whose kernel gradient is transposed patches [k·k·C, N] times dy [N, F]. Autodiff's is dyᵀ times
    the patches: XLA's CPU matmuls want the contracted axis minor, so it writes dy out transposed, fused with
    the BatchNorm backward that produces it (ResNet-9's first layer: a [64, B·32·32] write with a stride-64
    read, 0.48 s of a 5.5 s step at width 1, batch 512). Transposing the k·k·C-wide patches instead, built from
    x directly, moves less and reads x once. Values equal autodiff's to float32 rounding (tested). A custom VJP
    has no forward mode: ``jax.jvp`` / ``jacfwd`` through such a layer raise (reverse mode and forward-over-reverse,
    as Hessian-vector products use, work), as through :func:`batch_norm_relu`, every ``ConvBN`` in training mode."""
    return _im2col(x, kernel, stride, padding)


def _narrow_im2col_fwd(x, kernel, stride, padding):
    return _im2col(x, kernel, stride, padding), (x, kernel)


def _narrow_im2col_bwd(stride, padding, residuals, dy):
    x, kernel = residuals
    k, _, c, f = kernel.shape
    _, input_vjp = jax.vjp(lambda x: _im2col(x, kernel, stride, padding), x)  # its unused forward: dropped under jit
    acc = jnp.promote_types(dy.dtype, jnp.float32)
    dk = jnp.matmul(transposed_patches(x, k, stride, padding), dy.reshape(-1, f), preferred_element_type=acc)
    return input_vjp(dy)[0], dk.reshape(k, k, c, f).astype(kernel.dtype)


_narrow_im2col_conv.defvjp(_narrow_im2col_fwd, _narrow_im2col_bwd)


def shift_conv(x, kernel, stride: int, padding: int):
    """Same contract as :func:`im2col_conv`, as a sum of k·k shifted matmuls (no patch tensor)."""
    k = kernel.shape[0]
    taps = kernel.reshape(k * k, *kernel.shape[2:])
    windows = shifted_windows(x, k, stride, padding)
    out = windows[0] @ taps[0]
    for window, tap in zip(windows[1:], taps[1:]):
        out = out + window @ tap
    return out


# Winograd's minimal filtering F(2, 3) (Lavin & Gray, CVPR 2016): on 4-sample tiles that overlap by 2,
# y = A^T [(G g) * (B^T d)]; B^T is applied in _winograd_in, A^T as WINOGRAD_OUT
WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_in(x, axis: int, tiles: int) -> list:
    """B^T d along ``axis`` for ``tiles`` tiles of 4 at stride 2: four arrays with ``tiles`` on that axis."""
    s = [lax.slice_in_dim(x, r, r + 2 * (tiles - 1) + 1, 2, axis) for r in range(4)]
    return [s[0] - s[2], s[1] + s[2], s[2] - s[1], s[1] - s[3]]


# A^T m over a tile's 4x4 positions at once: kron(A^T, A^T), [2·2 outputs, 4·4 positions]. As one matmul the
# transform's backward is a matmul too; written as adds of tile rows (a(0) + m(1) + ...), autodiff's backward was
# twelve pad-and-add passes, each recomputing the BatchNorm backward fused into it (ResNet-9 width 1, one
# model on this 2-core CPU: 4.65 instead of 5.51 s a step, with _narrow_im2col_conv; step_profile.py)
WINOGRAD_AT = ((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, -1.0, -1.0))
WINOGRAD_OUT = tuple(tuple(p * q for p in a for q in b) for a in WINOGRAD_AT for b in WINOGRAD_AT)


# below this many input channels (4·C after space-to-depth) Winograd's transforms cost more than the
# multiplications they save. Measured in whole ResNet-9 models, one per core of a 2-core CPU (ensemble_throughput.py,
# benchmarks/RESULTS.md): with the matmul output transform, Winograd on the 32-channel layers of width 0.25 too
# is 1.23x faster than from 64 channels. The 3-channel first layer ran 3.3x slower in Winograd (conv_layer_probe.py,
# the old output transform); no ResNet-9 layer lies between them at widths from 0.25
WINOGRAD_MIN_CHANNELS = 32


def winograd_conv(x, kernel, stride: int, padding: int, min_channels: int = WINOGRAD_MIN_CHANNELS):
    """Same contract as :func:`im2col_conv`. A 3x3 stride-1 convolution is computed as Winograd's
    F(2x2, 3x3): the input cut into 4x4 tiles (stride 2) and transformed, sixteen matmuls
    [B·tiles, C] x [C, F] (one per tile position; a batched matmul under ``vmap``), the 2x2 outputs
    transformed back. 16 multiplications per 2x2 outputs instead of 36, for transforms that move data:
    it pays where the channels are wide, so below ``min_channels`` input channels :func:`im2col_conv` is
    used (measured: :data:`WINOGRAD_MIN_CHANNELS`). A 5x5 or 6x6 stride-2 convolution becomes a 3x3 stride-1
    one over the input's 2x2 blocks, 4·C channels (:func:`space_to_depth`), then the same. Other
    kernels and strides use :func:`im2col_conv`. Same values as ``lax.conv`` to float32 rounding (tested;
    bfloat16: see :func:`_winograd_3x3`)."""
    k, c = kernel.shape[0], x.shape[-1]
    if k == 3 and stride == 1 and c >= min_channels:
        return _winograd_3x3(x, kernel, padding)
    if stride == 2 and k in (5, 6) and 4 * c >= min_channels:
        return _winograd_3x3(*space_to_depth(x, kernel, padding), 0)
    return im2col_conv(x, kernel, stride, padding)


def _winograd_3x3(x, kernel, padding: int):
    """F(2x2, 3x3) for a 3x3 stride-1 convolution: x [B, H, W, C], kernel [3, 3, C, F] -> [B, Ho, Wo, F].
    In a low-precision dtype (bfloat16) the kernel transform, the matmuls' accumulation and the output
    transform run in float32, and the result is cast back: the input transform's adds stay in the input's
    dtype. Against a float32 convolution its bfloat16 error is about 1.6x im2col's (0.53 vs 0.34 % of the
    largest output at 128 channels; a test bounds it)."""
    b, h, w, c = x.shape
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    th, tw = -(-ho // 2), -(-wo // 2)  # an odd output size gets one more row / column, cropped at the end
    x = jnp.pad(x, ((0, 0), (padding, padding + 2 * th - ho), (padding, padding + 2 * tw - wo), (0, 0)))
    v = jnp.stack([jnp.stack(_winograd_in(r, 2, tw)) for r in _winograd_in(x, 1, th)])  # [4, 4, B, th, tw, C]
    acc = jnp.promote_types(x.dtype, jnp.float32)
    g = jnp.asarray(WINOGRAD_G, acc)
    u = jnp.einsum("ai,ijcf,bj->abcf", g, kernel.astype(acc), g).astype(x.dtype)  # G g G^T: [4, 4, C, F]
    m = jnp.einsum("abnc,abcf->abnf", v.reshape(4, 4, b * th * tw, c), u, preferred_element_type=acc)
    y = jnp.einsum("pk,knf->pnf", jnp.asarray(WINOGRAD_OUT, acc), m.reshape(16, b * th * tw, -1))  # [2·2, n, F]
    y = y.reshape(2, 2, b, th, tw, -1)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, 2 * th, 2 * tw, -1)[:, :ho, :wo].astype(x.dtype)


def space_to_depth(x, kernel, padding: int):
    """A k x k stride-2 convolution (k = 5 or 6) rewritten as a 3x3 stride-1 one, unpadded: the zero-padded
    input's 2x2 blocks (4·C channels) and the kernel zero-padded to 6x6 and regrouped the same way (output o
    reads padded rows 2o .. 2o+5, which are rows o .. o+2 of the blocks). x: f32[B, H, W, C], kernel:
    f32[k, k, C, F] -> (f32[B, Ho + 2, Wo + 2, 4·C], f32[3, 3, 4·C, F])."""
    b, h, w, c = x.shape
    k, f = kernel.shape[0], kernel.shape[-1]
    ho, wo = (h + 2 * padding - k) // 2 + 1, (w + 2 * padding - k) // 2 + 1
    rows, cols = 2 * (ho + 2), 2 * (wo + 2)  # the padded span the blocks cover (a stride remainder is cut off)
    x = jnp.pad(x, ((0, 0), (padding, max(0, rows - h - padding)), (padding, max(0, cols - w - padding)), (0, 0)))
    x = x[:, :rows, :cols].reshape(b, ho + 2, 2, wo + 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ho + 2, wo + 2, 4 * c)
    kernel = jnp.pad(kernel, ((0, 6 - k), (0, 6 - k), (0, 0), (0, 0)))
    return x, kernel.reshape(3, 2, 3, 2, c, f).transpose(0, 2, 1, 3, 4, 5).reshape(3, 3, 4 * c, f)


def xla_nchw_conv(x, kernel, stride: int, padding: int):
    """Same contract as :func:`im2col_conv`; the convolution itself in NCHW / OIHW layout."""
    y = lax.conv_general_dilated(x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1), (stride, stride),
                                 [(padding, padding)] * 2, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y.transpose(0, 2, 3, 1)


NHWC = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, kernel, stride: int, padding: int):
    """Same contract as :func:`im2col_conv`, through lax.conv_general_dilated."""
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2, dimension_numbers=NHWC)


def xla_s2d_conv(x, kernel, stride: int, padding: int):
    """Same contract as :func:`im2col_conv`: :func:`xla_conv`, except that a 5x5 or 6x6 stride-2 convolution is
    computed as a 3x3 stride-1 one over the input's 2x2 blocks (:func:`space_to_depth`: 1.44x the multiplications
    of a 5x5 kernel). Autodiff gives a strided convolution's input gradient as a convolution over the output
    gradient dilated with zeros, which XLA's GPU backend ran as a forward convolution over the dilated array
    (4x the work, and a pad to build it): on an H100, ResNet-9's 5x5 layer's input gradient took 0.47 ms of a
    3.9 ms step against 0.15 ms for cuDNN's own (PyTorch's); every convolution here is stride 1."""
    if stride == 2 and kernel.shape[0] in (5, 6):
        return xla_conv(*space_to_depth(x, kernel, padding), 1, 0)
    return xla_conv(x, kernel, stride, padding)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x, kernel, stride: int, padding: int):
    """:func:`xla_conv` whose backward pass is two convolutions in the forward's own NHWC / HWIO layout.

    JAX's transpose rules emit the input and kernel gradients as convolutions with permuted dimension
    labels; XLA's CPU backend sends those to a slow generic kernel when they sit inside a loop body (a
    ``lax.scan`` over steps, a ``lax.map`` over models): 9x slower per epoch for the digits CNN. Here the
    permutations are explicit transposes around plain convolutions, which it runs on its fast path.
    Same values as JAX's own gradients (bit-identical on CPU in tests)."""
    return xla_conv(x, kernel, stride, padding)


def _canonical_conv_fwd(x, kernel, stride, padding):
    return xla_conv(x, kernel, stride, padding), (x, kernel)


def _canonical_conv_bwd(stride, padding, residuals, dy):
    """dy: f32[B, Ho, Wo, F] -> (dx f32[B, H, W, C], dkernel f32[k, k, C, F])."""
    x, kernel = residuals
    k = kernel.shape[0]
    _, h, w, _ = x.shape
    _, ho, wo, _ = dy.shape
    lo = k - 1 - padding  # dx: the stride-dilated dy convolved with the flipped, in/out-swapped kernel
    pads = [(lo, h - 1 - (ho - 1) * stride + padding), (lo, w - 1 - (wo - 1) * stride + padding)]
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    dx = lax.conv_general_dilated(dy, flipped, (1, 1), pads, lhs_dilation=(stride, stride), dimension_numbers=NHWC)
    # dkernel: channels as the batch, the batch as features, dy as a (dilated) Ho x Wo kernel
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0))) if padding else x
    dk = lax.conv_general_dilated(xp.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), [(0, 0)] * 2,
                                  rhs_dilation=(stride, stride), dimension_numbers=NHWC)
    return dx.astype(x.dtype), dk[:, :k, :k, :].transpose(1, 2, 0, 3).astype(kernel.dtype)


canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def max_pool_2x2(x):
    """2x2 max-pool, stride 2, VALID (an odd last row / column is dropped, as ``nn.max_pool`` does).
    x: f32[B, H, W, C] -> f32[B, H//2, W//2, C].

    Written as reshape + max rather than ``reduce_window``: its backward is an elementwise compare and
    select that fuses, instead of a select-and-scatter kernel (measured: ``benchmarks/RESULTS.md``). At
    ties within a window the gradient is split evenly among them (``reduce_window``'s goes to the first);
    after a ReLU the tied windows are the all-zero ones, whose gradient the ReLU drops either way."""
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def global_max_pool(x):
    """Max over the image rows and columns. x: T[B, H, W, C] -> T[B, C]."""
    return jnp.max(x, axis=(1, 2))


CONV_FNS = {"im2col": im2col_conv, "xla": xla_conv, "xla_canonical": canonical_conv, "shift": shift_conv,
            "xla_nchw": xla_nchw_conv, "winograd": winograd_conv, "xla_s2d": xla_s2d_conv}
CONV_IMPLS = tuple(CONV_FNS)


class _ConvFields(nn.Module):
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    impl: str = "im2col"
    dtype: jnp.dtype = jnp.float32


class Conv(_ConvFields):
    """Square conv without bias (BatchNorm follows). x: f32[B, H, W, C] -> f32[B, Ho, Wo, features]."""

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", torch_default_init, (k, k, x.shape[-1], self.features))
        return CONV_FNS[self.impl](x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)


def _channel_sums(*xs):
    """Per-channel sums over every axis but the last, in float32: f32[..., C] arrays -> f32[C] each."""
    return tuple(a.sum(axis=tuple(range(a.ndim - 1))) for a in xs)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_relu(x, scale, bias, epsilon: float):
    """ReLU(BatchNorm(x)) on the batch's statistics, as ``nn.relu(nn.BatchNorm(...)(x))`` computes it (statistics
    and normalisation in float32 whatever x's dtype, variance as E[x²] - E[x]² clipped at 0), with a backward pass
    written out: two per-channel sums of the output's gradient and one elementwise pass, reading only x and the
    output (both kept for the next layer anyway) instead of whatever autodiff of the two layers keeps.
    x: T[..., C] (T float32 or bfloat16), scale, bias: f32[C] -> (y T[..., C], mean f32[C], var f32[C]).
    A custom VJP: reverse mode and forward-over-reverse (Hessian-vector products) work, forward mode alone
    (``jax.jvp``, ``jacfwd``) raises; eval mode (running statistics) is plain JAX. The gradient ignores the
    variance's clip at 0, which only binds for a channel that is constant over the batch."""
    return _batch_norm_relu_fwd(x, scale, bias, epsilon)[0]


def _normalize_relu(x, mean, var, scale, bias, epsilon):
    acc = jnp.promote_types(x.dtype, jnp.float32)
    mul = lax.rsqrt(var + epsilon) * scale
    return jnp.maximum((x.astype(acc) - mean) * mul + bias, 0).astype(x.dtype)


def _batch_norm_relu_fwd(x, scale, bias, epsilon):
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    n = x.size // x.shape[-1]
    s1, s2 = _channel_sums(xf, xf * xf)
    mean = s1 / n
    var = jnp.maximum(0.0, s2 / n - mean * mean)
    y = _normalize_relu(x, mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, y, scale, mean, var)


def _batch_norm_relu_bwd(epsilon, residuals, cotangents):
    x, y, scale, mean, var = residuals
    dy, dmean, dvar = cotangents
    acc = jnp.promote_types(x.dtype, jnp.float32)
    n = x.size // x.shape[-1]
    rstd = lax.rsqrt(var + epsilon)
    centered = x.astype(acc) - mean
    xhat = centered * rstd
    g = jnp.where(y > 0, dy.astype(acc), 0.0)  # through the ReLU: y > 0 exactly where its input is (no underflow)
    dbias, dxhat_sum = _channel_sums(g, g * xhat)
    # d/dx of the normalised output, plus the (usually zero) gradients of the returned mean and variance
    dx = (scale * rstd) * (g - (dbias + xhat * dxhat_sum) / n) + (dmean + 2.0 * dvar * centered) / n
    return dx.astype(x.dtype), dxhat_sum, dbias


batch_norm_relu.defvjp(_batch_norm_relu_fwd, _batch_norm_relu_bwd)


class BatchNormReLU(nn.Module):
    """``nn.BatchNorm`` (running-average momentum 0.9, epsilon 1e-5, float32 statistics) then ReLU, in one layer whose
    training-mode backward pass is :func:`batch_norm_relu`'s. Same variables as ``nn.BatchNorm``: params ``scale``,
    ``bias`` and batch_stats ``mean``, ``var`` (f32[C]); the running statistics are not updated while initialising.
    x: T[..., C] -> T[..., C]."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        if self.use_running_average:
            return _normalize_relu(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
        y, mean, var = batch_norm_relu(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


class ConvBN(_ConvFields):
    """Conv -> BatchNorm (per-model running statistics) -> ReLU."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, self.kernel_size, self.stride, self.padding, self.impl, self.dtype)(x)
        return BatchNormReLU(use_running_average=not train, name="BatchNorm_0")(x)
