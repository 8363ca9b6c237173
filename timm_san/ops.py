""" Self-attention operators of SAN (footprint gathering, relations, aggregation, position grid)

The arithmetic of the official CUDA kernels of "Exploring Self-attention for Image Recognition"
(Zhao, Jia, Koltun, CVPR 2020, https://arxiv.org/abs/2004.13621), in plain PyTorch so it runs on every
device and dtype, scripts with TorchScript and traces with FX (the functions are registered as FX leaves).

Layout conventions follow the official kernels:
    * a footprint tensor is ``(B, C, k * k, H * W)``, offsets in row-major order (``kh * k + kw``);
    * aggregation weights are ``(B, Cw, k * k, H * W)`` and output channel ``c`` uses weight channel
      ``c % Cw`` (channels share weights interleaved, not in contiguous blocks).

Padding is reflection of width ``(k - 1) // 2``. The official kernels reflect once, which is only defined
while the pad is smaller than the map side; on smaller maps they read out of bounds. Here the reflection is
repeated (the map is mirrored back and forth without repeating its edge, period ``2 * (n - 1)``; a side of
one pixel repeats that pixel). Wherever the official kernels are defined the two agree exactly.

Every model-level call goes through these functions, so a faster kernel replaces one of them without
touching the network. On CUDA, the autograd Functions behind ``footprint``, ``subtraction``, ``subtraction2``
and ``aggregation`` run the Triton kernels of ``timm_san.ops_triton`` forward and backward (one launch per
operator instead of ``k * k``, same results) where ``ops_triton.usable`` allows: Triton importable, CUDA tensors
of float32, float16, bfloat16 or float64, not traced (``torch.compile``, whose Inductor fuses the PyTorch code
itself, or ``torch.jit.trace``) and not switched off (``TIMM_SAN_TRITON=0``, ``ops_triton.ENABLED = False``).
TorchScript and every other case run the PyTorch code below.
"""
import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

from . import ops_triton

__all__ = [
    'check_kernel_size', 'reflect_index', 'reflect_pad', 'footprint', 'subtraction', 'subtraction2', 'aggregation',
    'position_grid',
    'footprint_view', 'reflect_pad_backward', 'footprint_backward',
]

# elements of the accumulator the aggregation loop keeps in flight: about a core's L2 cache
_CACHE_ELEMENTS = 1 << 18


def check_kernel_size(kernel_size: int) -> None:
    """Refuse a footprint side the operators cannot centre (even or not positive)."""
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f'kernel_size must be a positive odd number, got {kernel_size}.')


def reflect_index(size: int, pad: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of a side of ``size`` padded by ``pad`` on both ends.

    Args:
        size: Length of the side.
        pad: Padding on each end.
        device: Device of the returned index.

    Returns:
        int64 tensor of length ``size + 2 * pad``, values in ``[0, size)``.
    """
    pos = torch.arange(-pad, size + pad, device=device)
    if size == 1:
        return torch.zeros_like(pos)
    period = 2 * (size - 1)
    pos = torch.remainder(pos, period)
    return torch.where(pos < size, pos, period - pos)


@register_notrace_function
def reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Reflection-pad the last two dims of ``x`` by ``pad``, reflecting repeatedly where a side is too short.

    Args:
        x: Tensor of shape ``(..., H, W)``.
        pad: Padding on each side.

    Returns:
        Tensor of shape ``(..., H + 2 * pad, W + 2 * pad)``.
    """
    if pad == 0:
        return x
    height, width = x.shape[-2], x.shape[-1]
    if pad < height and pad < width:
        # single reflection: the case the official kernels define, and the fast path
        return F.pad(x, (pad, pad, pad, pad), mode='reflect')
    x = x.index_select(-2, reflect_index(height, pad, x.device))
    return x.index_select(-1, reflect_index(width, pad, x.device))


def footprint_view(padded: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """All ``k x k`` shifted windows of a padded map as one strided view, without copying.

    Args:
        padded: Tensor of shape ``(B, C, H + k - 1, W + k - 1)``.
        kernel_size: Footprint side ``k``.

    Returns:
        View of shape ``(B, C, k, k, H, W)``; ``[:, :, kh, kw, h, w]`` is ``padded[:, :, h + kh, w + kw]``.
    """
    # two unfolds are views (k x k windows along H, then W); move the window dims in front of the map dims
    return padded.unfold(2, kernel_size, 1).unfold(3, kernel_size, 1).permute(0, 1, 4, 5, 2, 3)


def reflect_pad_backward(grad_padded: torch.Tensor, height: int, width: int, pad: int) -> torch.Tensor:
    """Gradient of ``reflect_pad``: fold the padding back onto the positions it was read from.

    Args:
        grad_padded: Tensor of shape ``(B, C, H + 2 * pad, W + 2 * pad)``.
        height: Unpadded height ``H``.
        width: Unpadded width ``W``.
        pad: Padding on each side.

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    if pad == 0:
        return grad_padded
    if pad < height and pad < width:
        batch, channels = grad_padded.shape[0], grad_padded.shape[1]
        like = grad_padded.new_empty((batch, channels, height, width))
        return torch.ops.aten.reflection_pad2d_backward(grad_padded, like, [pad, pad, pad, pad])
    rows = reflect_index(height, pad, grad_padded.device)
    cols = reflect_index(width, pad, grad_padded.device)
    shape = list(grad_padded.shape)
    shape[-1] = width
    grad = grad_padded.new_zeros(shape).index_add_(-1, cols, grad_padded)
    shape[-2] = height
    return grad.new_zeros(shape).index_add_(-2, rows, grad)


def footprint_backward(grad: torch.Tensor, height: int, width: int, kernel_size: int) -> torch.Tensor:
    """Gradient of ``footprint``: scatter-add every offset's slice back, shifted, then fold the padding.

    Args:
        grad: Tensor of shape ``(B, C, k * k, H * W)``.
        height: Map height ``H``.
        width: Map width ``W``.
        kernel_size: Footprint side ``k``.

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    batch, channels = grad.shape[0], grad.shape[1]
    pad = kernel_size // 2
    grad = grad.reshape(batch, channels, kernel_size * kernel_size, height, width)
    grad_padded = grad.new_zeros((batch, channels, height + 2 * pad, width + 2 * pad))
    for kh in range(kernel_size):
        for kw in range(kernel_size):
            grad_padded[:, :, kh:kh + height, kw:kw + width] += grad[:, :, kh * kernel_size + kw]
    return reflect_pad_backward(grad_padded, height, width, pad)


def _footprint(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    windows = footprint_view(reflect_pad(x, kernel_size // 2), kernel_size)
    return windows.reshape(batch, channels, kernel_size * kernel_size, height * width)


def _subtraction2(x1: torch.Tensor, x2: torch.Tensor, kernel_size: int) -> torch.Tensor:
    batch, channels, height, width = x1.shape
    windows = footprint_view(reflect_pad(x2, kernel_size // 2), kernel_size)
    out = x1.reshape(batch, channels, 1, 1, height, width) - windows
    return out.reshape(batch, channels, kernel_size * kernel_size, height * width)


def _aggregation(
        x: torch.Tensor, weight: torch.Tensor, kernel_size: int, cache_elements: int = _CACHE_ELEMENTS) -> torch.Tensor:
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    groups = channels // weight_channels
    # channel c = g * Cw + s uses weight channel s: a reshape, no index copy
    padded = reflect_pad(x, kernel_size // 2).reshape(
        batch, groups, weight_channels, height + kernel_size - 1, width + kernel_size - 1)
    weight = weight.reshape(batch, 1, weight_channels, kernel_size * kernel_size, height, width)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        # differentiable by autograd (TorchScript's path): no in-place accumulation
        out = torch.zeros((batch, groups, weight_channels, height, width), dtype=x.dtype, device=x.device)
        for kh in range(kernel_size):
            for kw in range(kernel_size):
                window = padded[..., kh:kh + height, kw:kw + width]
                out = torch.addcmul(out, window, weight[:, :, :, kh * kernel_size + kw])
        return out.reshape(batch, channels, height, width)
    out = torch.empty((batch, groups, weight_channels, height, width), dtype=x.dtype, device=x.device)
    # a few samples at a time, so the accumulator stays in cache over the k * k passes
    step = max(1, cache_elements // max(1, channels * height * width))
    for start in range(0, batch, step):
        end = min(start + step, batch)
        acc = out[start:end]
        for kh in range(kernel_size):
            for kw in range(kernel_size):
                window = padded[start:end, :, :, kh:kh + height, kw:kw + width]
                offset_weight = weight[start:end, :, :, kh * kernel_size + kw]
                if kh == 0 and kw == 0:
                    torch.mul(window, offset_weight, out=acc)
                else:
                    acc.addcmul_(window, offset_weight)
    return out.reshape(batch, channels, height, width)


def _aggregation_weight_grad(
        x: torch.Tensor, grad: torch.Tensor, weight_channels: int, kernel_size: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    groups = channels // weight_channels
    padded = reflect_pad(x, kernel_size // 2).reshape(
        batch, groups, weight_channels, height + kernel_size - 1, width + kernel_size - 1)
    grad = grad.reshape(batch, groups, weight_channels, height, width)
    grad_weight = x.new_empty((batch, weight_channels, kernel_size * kernel_size, height, width))
    for kh in range(kernel_size):
        for kw in range(kernel_size):
            window = padded[:, :, :, kh:kh + height, kw:kw + width]
            grad_weight[:, :, kh * kernel_size + kw] = (window * grad).sum(1)
    return grad_weight.reshape(batch, weight_channels, kernel_size * kernel_size, height * width)


def _aggregation_input_grad(grad: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    batch, channels, height, width = grad.shape
    weight_channels = weight.shape[1]
    groups = channels // weight_channels
    pad = kernel_size // 2
    weight = weight.reshape(batch, 1, weight_channels, kernel_size * kernel_size, height, width)
    grad = grad.reshape(batch, groups, weight_channels, height, width)
    grad_padded = grad.new_zeros((batch, groups, weight_channels, height + 2 * pad, width + 2 * pad))
    for kh in range(kernel_size):
        for kw in range(kernel_size):
            grad_padded[..., kh:kh + height, kw:kw + width].addcmul_(grad, weight[:, :, :, kh * kernel_size + kw])
    grad_padded = grad_padded.reshape(batch, channels, height + 2 * pad, width + 2 * pad)
    return reflect_pad_backward(grad_padded, height, width, pad)


class _FootprintFn(torch.autograd.Function):
    """Footprint gather whose backward scatters the gradient back instead of differentiating a k x k stack."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        ctx.kernel_size, ctx.size, ctx.dtype = kernel_size, (x.shape[-2], x.shape[-1]), x.dtype
        if ops_triton.usable(x):
            return ops_triton.footprint(x, kernel_size)
        return _footprint(x, kernel_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        height, width = ctx.size
        if ops_triton.usable(grad):
            return ops_triton.footprint_backward(grad, height, width, ctx.kernel_size, ctx.dtype), None
        return footprint_backward(grad, height, width, ctx.kernel_size), None


class _Subtraction2Fn(torch.autograd.Function):
    """Relation of two maps; saves nothing for backward (the gradient does not depend on the inputs)."""

    @staticmethod
    def forward(ctx, x1: torch.Tensor, x2: torch.Tensor, kernel_size: int) -> torch.Tensor:
        ctx.kernel_size, ctx.size, ctx.dtypes = kernel_size, (x1.shape[-2], x1.shape[-1]), (x1.dtype, x2.dtype)
        if ops_triton.usable(x1, x2):
            return ops_triton.subtraction2(x1, x2, kernel_size)
        return _subtraction2(x1, x2, kernel_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        height, width = ctx.size
        grad1 = grad2 = None
        if ops_triton.usable(grad):
            if ctx.needs_input_grad[0]:
                grad1 = ops_triton.offset_sum(grad, height, width, ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad2 = ops_triton.footprint_backward(
                    grad, height, width, ctx.kernel_size, ctx.dtypes[1], negate=True)
            return grad1, grad2, None
        if ctx.needs_input_grad[0]:
            grad1 = grad.sum(2).reshape(grad.shape[0], grad.shape[1], height, width)
        if ctx.needs_input_grad[1]:
            grad2 = footprint_backward(grad, height, width, ctx.kernel_size).neg_()
        return grad1, grad2, None


class _SubtractionFn(torch.autograd.Function):
    """Relation of a map with itself (one input: autograd.Function tracing refuses one tensor passed twice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
        ctx.kernel_size, ctx.size, ctx.dtype = kernel_size, (x.shape[-2], x.shape[-1]), x.dtype
        if ops_triton.usable(x):
            return ops_triton.subtraction2(x, x, kernel_size)
        return _subtraction2(x, x, kernel_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        height, width = ctx.size
        if ops_triton.usable(grad):
            grad_x = ops_triton.footprint_backward(
                grad, height, width, ctx.kernel_size, ctx.dtype, negate=True, centre=True)
            return grad_x, None
        centre = grad.sum(2).reshape(grad.shape[0], grad.shape[1], height, width)
        return centre - footprint_backward(grad, height, width, ctx.kernel_size), None


class _AggregationFn(torch.autograd.Function):
    """Aggregation that saves its two inputs only and recomputes the shifted windows in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
        ctx.kernel_size = kernel_size
        ctx.save_for_backward(x, weight)
        if ops_triton.usable(x, weight):
            return ops_triton.aggregation(x, weight, kernel_size)
        return _aggregation(x, weight, kernel_size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        if ops_triton.usable(grad, x, weight):
            return ops_triton.aggregation_backward(
                grad, x, weight, ctx.kernel_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1]) + (None,)
        grad = grad.contiguous()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _aggregation_input_grad(grad, weight, ctx.kernel_size)
        if ctx.needs_input_grad[1]:
            grad_weight = _aggregation_weight_grad(x, grad, weight.shape[1], ctx.kernel_size)
        return grad_x, grad_weight, None


@register_notrace_function
def footprint(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gather the ``k x k`` reflection-padded neighbourhood of every position.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``; ``[:, c, kh * k + kw, h * W + w]`` holds
        ``x[:, c, h + kh - k // 2, w + kw - k // 2]`` with reflection at the borders.
    """
    check_kernel_size(kernel_size)
    if torch.jit.is_scripting():
        return _footprint(x, kernel_size)
    return _FootprintFn.apply(x, kernel_size)


@register_notrace_function
def subtraction(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Relation of each position with its footprint: ``x[centre] - x[neighbour]``.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``.
    """
    check_kernel_size(kernel_size)
    if x.dim() != 4:
        raise ValueError(f'subtraction needs a 4-D tensor (B, C, H, W), got {list(x.shape)}.')
    if torch.jit.is_scripting():
        return _subtraction2(x, x, kernel_size)
    return _SubtractionFn.apply(x, kernel_size)


@register_notrace_function
def subtraction2(x1: torch.Tensor, x2: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Relation of two maps: ``x1[centre] - x2[neighbour]`` over the footprint.

    Args:
        x1: Tensor of shape ``(B, C, H, W)``, read at the centre.
        x2: Tensor of the same shape, read over the footprint.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``.
    """
    check_kernel_size(kernel_size)
    if x1.dim() != 4 or x1.shape != x2.shape:
        raise ValueError(
            f'subtraction2 needs two 4-D tensors of one shape (B, C, H, W), got {list(x1.shape)} and '
            f'{list(x2.shape)}.')
    if torch.jit.is_scripting():
        return _subtraction2(x1, x2, kernel_size)
    return _Subtraction2Fn.apply(x1, x2, kernel_size)


@register_notrace_function
def aggregation(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weighted sum over the footprint, weight channels shared across ``C / Cw`` interleaved groups.

    ``out[b, c, h, w] = sum_k weight[b, c % Cw, k, h * W + w] * x[b, c, neighbour k of (h, w)]``

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weight: Tensor of shape ``(B, Cw, k * k, H * W)`` with ``C % Cw == 0``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    check_kernel_size(kernel_size)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f'aggregation needs x (B, C, H, W) and weight (B, Cw, k*k, H*W), got {list(x.shape)} and '
            f'{list(weight.shape)}.')
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    num_offsets = kernel_size * kernel_size
    if (weight.shape[0] != batch or weight_channels == 0 or channels % weight_channels != 0
            or weight.shape[2] != num_offsets or weight.shape[3] != height * width):
        raise ValueError(
            f'aggregation weight must be (B={batch}, Cw, {num_offsets}, {height * width}) with {channels} '
            f'divisible by Cw, got {list(weight.shape)}.')
    if torch.jit.is_scripting():
        return _aggregation(x, weight, kernel_size)
    return _AggregationFn.apply(x, weight, kernel_size)


@register_notrace_function
def position_grid(x: torch.Tensor) -> torch.Tensor:
    """Coordinate grid of the official position encoding, for the spatial size of ``x``.

    Args:
        x: Tensor of shape ``(B, C, H, W)``; only its size, dtype and device are used.

    Returns:
        Tensor of shape ``(1, 2, H, W)``: channel 0 is ``linspace(-1, 1, W)`` along the width,
        channel 1 is ``linspace(-1, 1, H)`` along the height.
    """
    height, width = x.shape[-2], x.shape[-1]
    loc_w = torch.linspace(-1.0, 1.0, width, dtype=x.dtype, device=x.device).view(1, width).expand(height, width)
    loc_h = torch.linspace(-1.0, 1.0, height, dtype=x.dtype, device=x.device).view(height, 1).expand(height, width)
    return torch.stack([loc_w, loc_h], dim=0).unsqueeze(0)
