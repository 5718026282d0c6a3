"""The fused kernels behind the fast exact paths: every custom autograd Function and layout fast path.

Each function here computes exactly what a plain definition computes (PyTorch's pooling, the Global Context
Enhancer's `forward_plain`, the literal Eq. 1 sum), by an equivalent route that is cheaper on the CPU: GEMMs with
constant 0/1 matrices for reductions over small maps, box-kernel depthwise convs for average pooling, chained 3x3
max pools, channels-last layouts. The tests hold each one to its plain definition; docs/performance.md has the
measurements behind the thresholds. It is the longest module on purpose: the one home of every fused kernel, so
that `MetaPooling.forward` and the candidates lead into this file and nowhere else.
"""
import contextlib
from functools import lru_cache
from typing import ContextManager, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    'BoxMixtureConv', 'WeightedMaxChain', 'apply_gates', 'autocast_off', 'box_filter', 'chunked_dot',
    'directional_means', 'laid_out_like', 'layout_of', 'local_layout', 'reachable_window', 'same_size_avg_pool',
    'same_size_max_pool', 'sum_over_height', 'sum_over_width',
]

# Up to these map sizes the enhancer's reductions and broadcasts run as GEMMs with constant 0/1 matrices over flat
# (N * C, H * W) rows: on CPU an op over rows of a few elements is dominated by per-row overhead, while on large maps
# the GEMM's H + W multiplies per element cost more than a pass (crossovers: docs/performance.md).
_GEMM_MEANS_MAX_AREA = 256
_FLAT_GATES_MAX_AREA = 64
# Above this map size the gate gradients are batched mat-vec products over the (H, W) planes, which read the shared
# product once and write nothing full-size; on smaller maps the per-plane cost of the batched GEMM loses to a
# broadcast multiply and a reduction.
_PLANE_GEMV_MIN_AREA = 256


@lru_cache(maxsize=64)
@torch.inference_mode(False)  # cached across calls: a first call under inference mode must not make it unsavable
def _pixel_membership(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H + W, H * W) 0/1 matrix: row h < H marks the pixels of image row h, row H + w those of image column w."""
    pixels = torch.arange(height * width, device=device)
    membership = torch.zeros(height + width, height * width, dtype=dtype, device=device)
    membership[pixels // width, pixels] = 1.
    membership[height + pixels % width, pixels] = 1.
    return membership


@lru_cache(maxsize=64)
@torch.inference_mode(False)
def _averaging_matrix(height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H * W, H + W) matrix M such that x.view(-1, H * W) @ M is [mean over W | mean over H] of each plane."""
    dd = {'dtype': dtype, 'device': device}
    scale = torch.cat([torch.full((height,), 1. / width, **dd), torch.full((width,), 1. / height, **dd)])
    return _pixel_membership(height, width, dtype, device).t() * scale


def directional_means(x: torch.Tensor) -> torch.Tensor:
    """The Global Context Enhancer's profiles side by side: [z^h = mean_W x | z^w = mean_H x], (N, C, H + W).

    Small NCHW maps average through one GEMM with `_averaging_matrix`. Large and channels-last maps use sums scaled
    afterwards, not `mean`: the backward of `sum` is a broadcast view that autograd adds into x's gradient in place,
    while that of `mean` first materialises a full-size tensor. A channels-last map's sums (`sum_over_width`) come
    out as a transposed view of (N, H + W, C) rows.
    """
    if torch.jit.is_scripting():
        return _plain_directional_means(x)
    return _directional_means_eager(x)


def _plain_directional_means(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.mean(dim=3), x.mean(dim=2)], dim=2)


@torch.jit.unused
def _directional_means_eager(x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _plain_directional_means(x)  # the compiler fuses the plain definition; the GEMMs are opaque to it
    batch, channels, height, width = x.shape
    if not x.is_contiguous():
        # Channels-last: its sums are transposed (N, H, C) and (N, W, C) rows, which the gate network takes side by
        # side as (N, H + W, C) (returned as its (N, C, H + W) transpose; no copy on either side).
        rows_h = sum_over_width(x).squeeze(3).transpose(1, 2) / width
        rows_w = sum_over_height(x).squeeze(2).transpose(1, 2) / height
        return torch.cat([rows_h, rows_w], dim=1).transpose(1, 2)
    if height * width <= _GEMM_MEANS_MAX_AREA:
        matrix = _averaging_matrix(height, width, x.dtype, x.device)
        return torch.mm(x.reshape(batch * channels, height * width), matrix).view(batch, channels, -1)
    return torch.cat([x.sum(dim=3) / width, x.sum(dim=2) / height], dim=2)


def sum_over_width(t: torch.Tensor) -> torch.Tensor:
    """The sums of a (N, C, H, W) map over W, as (N, C, H, 1) in the map's layout.

    A channels-last map is reduced through its (N, H, W, C) view, which keeps the channels innermost: on CPU much
    faster than `sum(dim=3)` on it, whose output is NCHW (docs/performance.md). The view is taken per call, so that
    autograd adds the gradients of several sums of one map into its gradient in place, not first into a full-size
    gradient of a shared view.
    """
    if t.is_contiguous():
        return t.sum(dim=3, keepdim=True)
    return t.permute(0, 2, 3, 1).sum(dim=2).transpose(1, 2).unsqueeze(3)


def sum_over_height(t: torch.Tensor) -> torch.Tensor:
    """The sums of a (N, C, H, W) map over H, as (N, C, 1, W) in the map's layout (see `sum_over_width`)."""
    if t.is_contiguous():
        return t.sum(dim=2, keepdim=True)
    return t.permute(0, 2, 3, 1).sum(dim=1).transpose(1, 2).unsqueeze(2)


class _ApplyGates(torch.autograd.Function):
    """x * a_h * a_w for a dense NCHW or channels-last map and (N, C, H, 1) / (N, C, 1, W) gates in the same layout.

    The same arithmetic as the two broadcast multiplies, with fewer full-size tensors: on CPU a fresh full-size
    tensor costs about as much as a pass over it (its pages are faulted in on first write), and autograd's version
    allocates two in the forward and five in the backward. Here the forward allocates one (the output, multiplied
    in place by the second gate) and the backward at most two, reused for every full-size intermediate. On small maps
    (`_flat_gates`) every full-size tensor is a flat (N * C, H * W) one and the gates are spread over it by GEMMs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a_h, a_w)
        return _gated(x, a_h, a_w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, a_h, a_w = ctx.saved_tensors
        shape = x.shape
        by_planes = _gate_grads_by_planes(x)
        grad_out = grad_out.contiguous(memory_format=layout_of(x))
        # x's gradient is returned as this base tensor, never as a view of it: autograd then adds x's gradients from
        # its other uses (the enhancer's means) into it in place, not into a fresh full-size tensor.
        grad_x = torch.empty_like(grad_out)
        if _flat_gates(x):
            gate_h, gate_w = _spread_gates(a_h, a_w)
            grad_out, x, buffer = grad_out.view(gate_h.shape), x.view(gate_h.shape), grad_x.view(gate_h.shape)
            sum_over_rows, sum_over_columns = _flat_sums(a_h.shape, a_w.shape, x.dtype, x.device)
        else:
            gate_h, gate_w, buffer = a_h, a_w, grad_x
            sum_over_rows, sum_over_columns = sum_over_width, sum_over_height
        grad_a_h = grad_a_w = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # d/da_h = sum_w grad * x * a_w and d/da_w = sum_h grad * x * a_h, through one shared product.
            torch.mul(grad_out, x, out=buffer)
            if by_planes:
                # With P = grad * x as (N * C) planes of H x W: d/da_h = P @ a_w, d/da_w = a_h^T @ P.
                planes = buffer.view(-1, shape[2], shape[3])
                grad_a_h = torch.bmm(planes, a_w.view(-1, shape[3], 1)).view(a_h.shape)
                grad_a_w = torch.bmm(a_h.view(-1, 1, shape[2]), planes).view(a_w.shape)
            else:
                scratch = torch.mul(buffer, gate_w)
                grad_a_h = sum_over_rows(scratch)
                grad_a_w = sum_over_columns(torch.mul(buffer, gate_h, out=scratch))
        if ctx.needs_input_grad[0]:
            torch.mul(grad_out, gate_h, out=buffer).mul_(gate_w)
        else:
            grad_x = None
        return grad_x, grad_a_h, grad_a_w


def _gate_grads_by_planes(x: torch.Tensor) -> bool:
    """Whether `_ApplyGates`' backward takes the gates' gradients as batched mat-vec products over the (H, W)
    planes: NCHW maps above `_PLANE_GEMV_MIN_AREA` pixels."""
    return x.shape[2] * x.shape[3] > _PLANE_GEMV_MIN_AREA and x.is_contiguous()


def layout_of(t: torch.Tensor) -> torch.memory_format:
    """The memory format a dense 4-D tensor is stored in (NCHW where both apply: then they are the same order)."""
    return torch.contiguous_format if t.is_contiguous() else torch.channels_last


def laid_out_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t stored in the layout of the 4-D map `like`: NCHW where `like` is NCHW-contiguous, else channels-last.

    `layout_of`'s rule in a form TorchScript compiles (it has no memory-format type): the gates are made on the
    scripted path too.
    """
    if like.is_contiguous():
        return t.contiguous()
    return t.contiguous(memory_format=torch.channels_last)


def _gated(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """The forward product with one fresh full-size tensor (no autograd)."""
    if _flat_gates(x):
        gate_h, gate_w = _spread_gates(a_h, a_w)
        return gate_h.mul_(gate_w).mul_(x.view(gate_h.shape)).view(x.shape)
    return torch.mul(x, a_h).mul_(a_w)


def _flat_gates(x: torch.Tensor) -> bool:
    """Whether the gate product runs flat: NCHW, more than one pixel (1x1 maps are flat already), at most 8x8."""
    return 1 < x.shape[2] * x.shape[3] <= _FLAT_GATES_MAX_AREA and x.is_contiguous()


def _spread_gates(a_h: torch.Tensor, a_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """a_h (N, C, H, 1) and a_w (N, C, 1, W) at every pixel, as two flat (N * C, H * W) tensors (GEMMs)."""
    batch, channels, height = a_h.shape[:3]
    width = a_w.shape[3]
    membership = _pixel_membership(height, width, a_h.dtype, a_h.device)
    return (torch.mm(a_h.reshape(batch * channels, height), membership[:height]),
            torch.mm(a_w.reshape(batch * channels, width), membership[height:]))


def _flat_sums(shape_h: torch.Size, shape_w: torch.Size, dtype: torch.dtype, device: torch.device):
    """For flat (N * C, H * W) tensors: the sums over each image row, as (N, C, H, 1), and over each image column,
    as (N, C, 1, W). GEMMs with the membership matrix: the counterparts of sum(dim=3) and sum(dim=2)."""
    height, width = shape_h[2], shape_w[3]
    membership = _pixel_membership(height, width, dtype, device)
    return (lambda t: torch.mm(t, membership[:height].t()).view(shape_h),
            lambda t: torch.mm(t, membership[height:].t()).view(shape_w))


def apply_gates(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    """x * a_h * a_w for gates a_h (N, C, H, 1) and a_w (N, C, 1, W) (the Global Context Enhancer's output).

    Dense NCHW or channels-last maps with gates of the same dtype and layout (`GlobalContextEnhancer.gates` makes
    them so) take the lean `_ApplyGates` (its output keeps x's layout); other layouts, mixed dtypes, TorchScript and
    torch.compile take the plain product.
    """
    if torch.jit.is_scripting():
        return x * a_h * a_w
    return _apply_gates_eager(x, a_h, a_w)


@torch.jit.unused
def _apply_gates_eager(x: torch.Tensor, a_h: torch.Tensor, a_w: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return x * a_h * a_w  # fused into one pass (forward and backward) by the compiler
    layout = layout_of(x)
    dense = x.is_contiguous(memory_format=layout)
    lean = (dense and x.dtype == a_h.dtype == a_w.dtype
            and a_h.is_contiguous(memory_format=layout) and a_w.is_contiguous(memory_format=layout)
            and a_h.shape == x.shape[:3] + (1,) and a_w.shape == x.shape[:2] + (1, x.shape[3]))
    if not lean:
        return x * a_h * a_w
    if torch.is_grad_enabled() and (x.requires_grad or a_h.requires_grad or a_w.requires_grad):
        return _ApplyGates.apply(x, a_h, a_w)
    return _gated(x, a_h, a_w)  # inference: skip the autograd.Function call overhead


@torch.jit.unused
def _column_gates_pay_off(like: torch.Tensor) -> bool:
    """Whether the enhancer's gates come from column GEMMs (`GlobalContextEnhancer._gates_by_columns`): eager
    inference on NCHW maps. Not under torch.compile, whose code for the rows fuses better."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and like.is_contiguous()


def _pointwise_on_columns(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
    """A biased 1x1 conv applied to (N, C_in, L) columns: W @ t + b, (N, C_out, L)."""
    return torch.baddbmm(conv.bias[:, None], conv.weight.flatten(1).expand(t.shape[0], -1, -1), t)



# Where the box-kernel conv overtakes avg_pool2d on CPU (fwd and fwd+bwd; docs/performance.md).
_BOX_FILTER_MIN_NUMEL = 8192


def same_size_avg_pool(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Stride-1 average pooling with zero padding counted (`avgK`): `F.avg_pool2d(x, k, 1, k // 2)`.

    On CPU, maps of at least `_BOX_FILTER_MIN_NUMEL` elements run as a depthwise conv with a constant box kernel,
    the same sums: PyTorch's CPU `avg_pool2d` and its backward are several times slower than oneDNN's depthwise
    conv at MobileNetV2's expanded shapes. Smaller maps keep `avg_pool2d`: there the conv's fixed cost per call is
    the larger one.
    """
    if not _box_filter_pays_off(x):
        return F.avg_pool2d(x, kernel_size, 1, kernel_size // 2, count_include_pad=True)
    if torch.jit.is_scripting():  # TorchScript runs no autocast
        return _box_filter(x, kernel_size)
    return _box_filter_eager(x, kernel_size)


def _box_filter_pays_off(x: torch.Tensor, min_numel: int = _BOX_FILTER_MIN_NUMEL) -> bool:
    # The threshold comes in as a default argument: TorchScript reads no module-level ints.
    return x.device.type == 'cpu' and x.numel() >= min_numel


def reachable_window(kernel_size: int, height: int, width: int) -> Tuple[int, int]:
    """The part of a centred k x k window that can reach an H x W map from inside it: min(k, 2H - 1) x
    min(k, 2W - 1). Its other taps only ever meet padding, zeros for average pooling, so dropping them is exact, and
    oneDNN's depthwise conv is far slower with a kernel larger than the map."""
    return min(kernel_size, 2 * height - 1), min(kernel_size, 2 * width - 1)


def box_filter(x: torch.Tensor, kernel_size: int, value: float) -> torch.Tensor:
    """`value` times the sum of x over each centred k x k window, zero padding: a depthwise conv with a constant
    kernel, cropped to `reachable_window`. With value 1/k^2 it is `avgK`."""
    channels = x.shape[1]
    kh, kw = reachable_window(kernel_size, x.shape[2], x.shape[3])
    box = torch.full((channels, 1, kh, kw), value, dtype=x.dtype, device=x.device)
    return F.conv2d(x, box, None, [1, 1], [kh // 2, kw // 2], [1, 1], channels)


def _box_filter(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    return box_filter(x, kernel_size, 1. / (kernel_size * kernel_size))


@torch.jit.unused
def _box_filter_eager(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    # Pooling keeps x's dtype under autocast; a conv would be cast to half precision (a float32 map would come out
    # as bfloat16, and its backward would meet tensors of two dtypes).
    with autocast_off(x.device.type):
        return _box_filter(x, kernel_size)


def autocast_off(device_type: str) -> ContextManager:
    """Autocast disabled on `device_type`; nothing to disable where the device has no autocast (e.g. 'meta',
    which shape inference and lazy initialisation run on), where `torch.autocast` itself would raise."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def local_layout(x: torch.Tensor) -> torch.Tensor:
    """x in the layout local (pooling) terms run in: channels-last on CPU, where PyTorch's max pooling is vectorised
    over channels only in that layout and oneDNN's depthwise conv and its backward are faster in it; unchanged
    elsewhere (x itself when already in it)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == 'cpu' else x


def same_size_max_pool(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Stride-1 max pooling with -inf padding (`maxK`): `F.max_pool2d(x, k, 1, k // 2)`, in x's layout.

    Pools in `local_layout` and converts an NCHW map back: faster on CPU than pooling in NCHW, copies included.
    """
    local_x = local_layout(x)
    pooled = F.max_pool2d(local_x, kernel_size, 1, kernel_size // 2)
    return pooled if local_x is x else pooled.contiguous()


class BoxMixtureConv(torch.autograd.Function):
    """Depthwise conv of x with the kernel sum_m coeffs[m] * masks[m], shared by every channel, zero padding.

    masks[m] is the (cropped) centred window of ones of a `skip` / `avgK` candidate, of side `sizes[m]`. Only the
    coefficients need a gradient, not the kernel: d/dcoeffs[m] = <grad, window sums of x>, one box-sum conv (a
    forward conv) and one dot product per candidate. Autograd would take the per-channel kernel gradient with
    oneDNN's depthwise weight-gradient kernel and contract it with the masks, which is slower on CPU in either
    layout, most of all on small maps with many channels. When the coefficients need
    no gradient (alpha frozen, as in PMPL's weight pass), only x's gradient is computed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, coeffs: torch.Tensor, masks: torch.Tensor,
                sizes: Tuple[int, ...]) -> torch.Tensor:
        channels, kh, kw = x.shape[1], masks.shape[1], masks.shape[2]
        weight = torch.tensordot(coeffs, masks, dims=1).expand(channels, 1, kh, kw)
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        return F.conv2d(x, weight, padding=(kh // 2, kw // 2), groups=channels)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        channels, kh, kw = x.shape[1], weight.shape[2], weight.shape[3]
        grad_out = grad_out.contiguous(memory_format=layout_of(x))
        grad_x = grad_coeffs = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], channels,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            with autocast_off(x.device.type):  # the window sums in x's dtype, as the forward ran
                grad_coeffs = torch.stack([chunked_dot(grad_out, x if k == 1 else box_filter(x, k, 1.))
                                           for k in ctx.sizes])
        return grad_x, grad_coeffs, None, None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense 4-D tensor as a 1-D view in its own memory order (for dot products between same-layout tensors)."""
    return t.permute(0, 2, 3, 1).reshape(-1) if not t.is_contiguous() else t.reshape(-1)


def chunked_dot(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """<a, b> of two dense same-layout tensors without a full-size product tensor.

    A single BLAS dot accumulates millions of terms in one float32 sum and loses accuracy; dots of 256-element
    chunks (one bmm) whose partial sums are then added by torch's cascade summation are as accurate as autograd's
    `(a * b).sum()` and faster than it.
    """
    a, b = _flat(a), _flat(b)
    body = a.numel() // chunk * chunk
    partials = torch.bmm(a[:body].view(-1, 1, chunk), b[:body].view(-1, chunk, 1))
    return partials.sum() + torch.dot(a[body:], b[body:])


class WeightedMaxChain(torch.autograd.Function):
    """out += sum_j weights[chain[j]] * max3^(j+1)(x), in place: max3, max5 = max3(max3), max7 = max3(max5).

    Runs in x's layout (MetaPooling passes it in `local_layout`); the backward follows that layout.

    `chain[j]` is the index in `weights` of the level-j candidate, or None where that size is not a candidate (its
    pool still runs, as a step to the larger ones). Autograd through the pools and accumulations would materialise
    the gradient of every term (grad * weight) and of every weight (grad * pooled, then summed), and convert the
    gradient's layout at every pool; here it is converted once, a weight's gradient is a dot product, and each
    level's gradient is accumulated in place before going through its pool.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                chain: Tuple[Optional[int], ...]) -> torch.Tensor:
        levels, indices = [x], []
        for i in chain:
            pooled, index = F.max_pool2d(levels[-1], kernel_size=3, stride=1, padding=1, return_indices=True)
            levels.append(pooled)
            indices.append(index)
            if i is not None:
                out.addcmul_(pooled, weights[i])
        ctx.mark_dirty(out)
        ctx.chain = chain
        ctx.save_for_backward(weights, *levels, *indices)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return grad_out, None, None, None
        weights, *saved = ctx.saved_tensors
        depth = len(ctx.chain)
        levels, indices = saved[:depth + 1], saved[depth + 1:]
        grad = grad_out.contiguous(memory_format=layout_of(levels[0]))
        grad_weights = torch.zeros_like(weights) if ctx.needs_input_grad[2] else None
        level_grad = None  # gradient w.r.t. the output of the current level's pool
        for j in reversed(range(depth)):
            i = ctx.chain[j]
            if i is not None:
                if grad_weights is not None:
                    grad_weights[i] = chunked_dot(grad, levels[j + 1])
                level_grad = grad * weights[i] if level_grad is None else level_grad.addcmul_(grad, weights[i])
            level_grad = torch.ops.aten.max_pool2d_with_indices_backward(
                level_grad, levels[j], [3, 3], [1, 1], [1, 1], [1, 1], False, indices[j])
        return grad_out, level_grad if ctx.needs_input_grad[1] else None, grad_weights, None
