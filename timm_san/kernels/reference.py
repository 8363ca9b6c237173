""" Reference kernels of SAN's operators: the arithmetic of the official CUDA kernels in plain PyTorch

The spec every other kernel is tested against, and what ONNX export writes out: "Exploring Self-attention for
Image Recognition" (Zhao, Jia, Koltun, CVPR 2020, https://arxiv.org/abs/2004.13621). Made of standard PyTorch
operators only, without loops over samples, so they run on every device and dtype and trace at any batch size.

Layout conventions follow the official kernels:
    * a footprint tensor is ``(B, C, k * k, H * W)``, offsets in row-major order (``kh * k + kw``);
    * aggregation weights are ``(B, Cw, k * k, H * W)`` and output channel ``c`` uses weight channel
      ``c % Cw`` (channels share weights interleaved, not in contiguous blocks).

Padding is reflection of width ``(k - 1) // 2``. The official kernels reflect once, which is only defined
while the pad is smaller than the map side; on smaller maps they read out of bounds. Here the reflection is
repeated (the map is mirrored back and forth without repeating its edge, period ``2 * (n - 1)``; a side of
one pixel repeats that pixel). Wherever the official kernels are defined the two agree exactly.
"""
import torch
import torch.nn.functional as F

__all__ = [
    'check_kernel_size', 'reflect_index', 'reflect_pad', 'reflect_pad_backward', 'footprint_view', 'footprint',
    'footprint_backward', 'subtraction2', 'offset_sum', 'aggregation', 'aggregation_input_grad',
    'aggregation_weight_grad', 'position_grid',
]


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
    # the period as a tensor: a traced graph (ONNX) keeps it symbolic
    period = pos.new_full((), 2 * (size - 1))
    pos = torch.remainder(pos, period)
    return torch.where(pos < size, pos, period - pos)


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
    # single reflection: the case the official kernels define, and the fast path; a graph being captured takes
    # the index path, which holds for every size (the branch would tie the graph to one side of it)
    if pad < height and pad < width and not torch.compiler.is_compiling():
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


def _windows(padded: torch.Tensor, kernel_size: int):
    """The ``k * k`` windows of a map padded by ``k // 2``, row-major: ``padded[..., i:i + H, j:j + W]`` written with
    constant bounds (ends counted from the padded map's end)."""
    last = kernel_size - 1
    for i in range(kernel_size):
        for j in range(kernel_size):
            yield padded[..., i:(i - last) or None, j:(j - last) or None]


def footprint(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gather the ``k x k`` reflection-padded neighbourhood of every position.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, k * k, H * W)``; ``[:, c, kh * k + kw, h * W + w]`` holds
        ``x[:, c, h + kh - k // 2, w + kw - k // 2]`` with reflection at the borders.
    """
    # the k * k shifted windows of the padded map, stacked: slices with constant bounds, which ONNX Runtime runs as
    # copies (where im2col's index arithmetic exported is several times slower)
    batch, channels, height, width = x.shape
    padded = reflect_pad(x, kernel_size // 2)
    if torch.compiler.is_compiling():
        # a graph captured by dynamo (the dynamo ONNX exporter): im2col, one operator where the exporter would
        # write each of the k * k slices as a dozen nodes
        columns = F.unfold(padded, kernel_size)
    else:
        columns = torch.stack(list(_windows(padded, kernel_size)), dim=2)
    return columns.reshape(batch, channels, kernel_size * kernel_size, height * width)


def subtraction2(x1: torch.Tensor, x2: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Relation of two maps, ``x1[centre] - x2[neighbour]``: ``(B, C, k * k, H * W)``."""
    batch, channels, height, width = x1.shape
    return x1.reshape(batch, channels, 1, height * width) - footprint(x2, kernel_size)


def offset_sum(grad: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``grad.sum(2)`` of a ``(B, C, k * k, H * W)`` gradient as a ``(B, C, H, W)`` map."""
    return grad.sum(2).reshape(grad.shape[0], grad.shape[1], height, width)


def aggregation(x: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Weighted sum over the footprint, channel ``c`` weighted by weight channel ``c % Cw``.

    Args:
        x: Tensor of shape ``(B, C, H, W)``.
        weight: Tensor of shape ``(B, Cw, k * k, H * W)`` with ``C % Cw == 0``.
        kernel_size: Footprint side ``k`` (odd).

    Returns:
        Tensor of shape ``(B, C, H, W)``.
    """
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    if torch.compiler.is_compiling():  # a compact graph for dynamo (see footprint)
        neighbours = footprint(x, kernel_size).view(
            batch, channels // weight_channels, weight_channels, kernel_size * kernel_size, height * width)
        return (neighbours * weight.unsqueeze(1)).sum(3).view(batch, channels, height, width)
    # channel c = g * Cw + s uses weight channel s: a reshape, no index copy; a sum over the k * k shifted windows,
    # so that nothing k * k-fold is held (an exported graph included)
    padded = reflect_pad(x, kernel_size // 2)
    padded = padded.reshape(batch, channels // weight_channels, weight_channels, padded.shape[2], padded.shape[3])
    weight = weight.reshape(batch, 1, weight_channels, kernel_size * kernel_size, height, width)
    out = None
    for index, window in enumerate(_windows(padded, kernel_size)):
        term = window * weight[:, :, :, index]
        out = term if out is None else out + term
    return out.reshape(batch, channels, height, width)


def aggregation_weight_grad(
        x: torch.Tensor, grad: torch.Tensor, weight_channels: int, kernel_size: int) -> torch.Tensor:
    """Gradient of ``aggregation`` with respect to its weights: ``(B, Cw, k * k, H * W)``."""
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


def aggregation_input_grad(grad: torch.Tensor, weight: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gradient of ``aggregation`` with respect to the map aggregated: ``(B, C, H, W)``."""
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


def position_grid(x: torch.Tensor) -> torch.Tensor:
    """Coordinate grid of the official position encoding, for the spatial size of ``x``.

    Args:
        x: Tensor of shape ``(B, C, H, W)``; only its size, dtype and device are used.

    Returns:
        Tensor of shape ``(1, 2, H, W)``: channel 0 is ``linspace(-1, 1, W)`` along the width,
        channel 1 is ``linspace(-1, 1, H)`` along the height.
    """
    height, width = x.shape[-2], x.shape[-1]
    loc_w = _unit_steps(width, x).view(1, width).expand(height, width)
    loc_h = _unit_steps(height, x).view(height, 1).expand(height, width)
    return torch.stack([loc_w, loc_h], dim=0).unsqueeze(0)


def _unit_steps(size: int, like: torch.Tensor) -> torch.Tensor:
    """``linspace(-1, 1, size)`` as ``-1 + 2 i / max(size - 1, 1)`` in tensor operations: graph capture keeps
    ``size`` symbolic (``linspace`` fixes its number of steps); a side of one gives -1, as ``linspace`` does."""
    steps = torch.arange(size, dtype=like.dtype, device=like.device)
    return steps * 2 / steps[-1:].clamp(min=1) - 1
