""" Independent references of the official SAN arithmetic, for parity tests

Two levels, written from the official release's kernels and model (github.com/hszhao/SAN), sharing no code
with timm_san:

* loop-level transcriptions of the CUDA kernels' index arithmetic (``*_loop``), forward and backward, on small
  NumPy arrays: one scalar at a time, the reflection written as the kernels write it. A read the kernels would
  make out of bounds raises ``OutOfBounds`` (the official result is undefined there), unless
  ``repeat_reflect=True`` asks for the behaviour timm_san defines (reflect again until inside);
* a network-level transcription (``OfficialSAN``) in the style of the official unit tests: ``nn.Unfold`` over a
  reflection-padded map, with the official module names, for whole-model parity.
"""
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class OutOfBounds(IndexError):
    """The official kernel would read outside the tensor here."""


def _reflect(i: int, n: int, repeat_reflect: bool) -> int:
    if 0 <= i < n:
        return i
    if repeat_reflect:
        if n == 1:
            return 0
        while not 0 <= i < n:
            i = -i if i < 0 else 2 * (n - 1) - i
        return i
    # the kernels' refpad branch: one reflection per side, in this order
    if i < 0:
        i = -i
    if i >= n:
        i = 2 * (n - 1) - i
    if not 0 <= i < n:
        raise OutOfBounds(i)
    return i


def subtraction2_loop(x1: np.ndarray, x2: np.ndarray, k: int, repeat_reflect: bool = False) -> np.ndarray:
    """subtraction2_refpad_forward_kernel: top[n, c, kh*k+kw, h*W+w] = x1[centre] - x2[reflected neighbour]."""
    batch, channels, height, width = x1.shape
    pad = (k - 1) // 2
    out = np.zeros((batch, channels, k * k, height * width), dtype=x1.dtype)
    for n in range(batch):
        for c in range(channels):
            for h in range(height):
                for w in range(width):
                    h_centre, w_centre = -pad + h + (k - 1) // 2, -pad + w + (k - 1) // 2
                    for kh in range(k):
                        for kw in range(k):
                            h_in = _reflect(-pad + h + kh, height, repeat_reflect)
                            w_in = _reflect(-pad + w + kw, width, repeat_reflect)
                            out[n, c, kh * k + kw, h * width + w] = x1[n, c, h_centre, w_centre] - x2[n, c, h_in, w_in]
    return out


def subtraction_loop(x: np.ndarray, k: int, repeat_reflect: bool = False) -> np.ndarray:
    """subtraction_refpad_forward_kernel: the same relation of a map with itself."""
    return subtraction2_loop(x, x, k, repeat_reflect)


def aggregation_loop(x: np.ndarray, weight: np.ndarray, k: int, repeat_reflect: bool = False) -> np.ndarray:
    """aggregation_refpad_forward_kernel: top[n, c, h, w] = sum_k weight[n, c % Cw, k, h*W+w] * x[neighbour]."""
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    pad = (k - 1) // 2
    out = np.zeros_like(x)
    for n in range(batch):
        for c in range(channels):
            for h in range(height):
                for w in range(width):
                    value = 0.0
                    for kh in range(k):
                        for kw in range(k):
                            h_in = _reflect(-pad + h + kh, height, repeat_reflect)
                            w_in = _reflect(-pad + w + kw, width, repeat_reflect)
                            value += weight[n, c % weight_channels, kh * k + kw, h * width + w] * x[n, c, h_in, w_in]
                    out[n, c, h, w] = value
    return out


def _fold_reflected_padding(grad_padded: np.ndarray, pad: int) -> np.ndarray:
    """The host-side tail of the official input-backward functions: add the padding back onto the rows and
    columns it reflects, then crop."""
    g = grad_padded.copy()
    height, width = g.shape[2] - 2 * pad, g.shape[3] - 2 * pad
    if pad >= height or pad >= width:
        raise OutOfBounds('padding not smaller than the map')
    g[:, :, pad + 1:2 * pad + 1, :] += np.flip(g[:, :, :pad, :], axis=2)
    g[:, :, height - 1:height + pad - 1, :] += np.flip(g[:, :, height + pad:, :], axis=2)
    g[:, :, :, pad + 1:2 * pad + 1] += np.flip(g[:, :, :, :pad], axis=3)
    g[:, :, :, width - 1:width + pad - 1] += np.flip(g[:, :, :, width + pad:], axis=3)
    return g[:, :, pad:pad + height, pad:pad + width]


def subtraction2_backward_loop(top_diff: np.ndarray, shape: Sequence[int], k: int):
    """subtraction2_refpad_input1/input2_backward_kernel (+ the host-side fold)."""
    batch, channels, height, width = shape
    pad = (k - 1) // 2
    grad1 = np.zeros(shape, dtype=top_diff.dtype)
    for n in range(batch):
        for c in range(channels):
            for h in range(height):
                for w in range(width):
                    grad1[n, c, h, w] = sum(top_diff[n, c, kk, h * width + w] for kk in range(k * k))
    grad2 = np.zeros((batch, channels, height + 2 * pad, width + 2 * pad), dtype=top_diff.dtype)
    for n in range(batch):
        for c in range(channels):
            for h in range(height + 2 * pad):
                for w in range(width + 2 * pad):
                    value = 0.0
                    for kh in range(k):
                        for kw in range(k):
                            h_out, w_out = h - kh, w - kw
                            if 0 <= h_out < height and 0 <= w_out < width:
                                value += -top_diff[n, c, kh * k + kw, h_out * width + w_out]
                    grad2[n, c, h, w] = value
    return grad1, _fold_reflected_padding(grad2, pad)


def subtraction_backward_loop(top_diff: np.ndarray, shape: Sequence[int], k: int) -> np.ndarray:
    """subtraction_refpad_input_backward_kernel (+ the host-side fold): neighbour and centre terms together."""
    batch, channels, height, width = shape
    pad = (k - 1) // 2
    grad = np.zeros((batch, channels, height + 2 * pad, width + 2 * pad), dtype=top_diff.dtype)
    for n in range(batch):
        for c in range(channels):
            for h in range(height + 2 * pad):
                for w in range(width + 2 * pad):
                    value = 0.0
                    for kh in range(k):
                        for kw in range(k):
                            h_out, w_out = h - kh, w - kw
                            if 0 <= h_out < height and 0 <= w_out < width:
                                value += -top_diff[n, c, kh * k + kw, h_out * width + w_out]
                    hh, ww = h - pad, w - pad
                    if 0 <= hh < height and 0 <= ww < width:
                        for kk in range(k * k):
                            value += top_diff[n, c, kk, hh * width + ww]
                    grad[n, c, h, w] = value
    return _fold_reflected_padding(grad, pad)


def aggregation_backward_loop(top_diff: np.ndarray, x: np.ndarray, weight: np.ndarray, k: int):
    """aggregation_refpad_input_backward_kernel (+ fold) and aggregation_refpad_weight_backward_kernel."""
    batch, channels, height, width = x.shape
    weight_channels = weight.shape[1]
    pad = (k - 1) // 2
    grad_x = np.zeros((batch, channels, height + 2 * pad, width + 2 * pad), dtype=x.dtype)
    for n in range(batch):
        for c in range(channels):
            for h in range(height + 2 * pad):
                for w in range(width + 2 * pad):
                    value = 0.0
                    for kh in range(k):
                        for kw in range(k):
                            h_out, w_out = h - kh, w - kw
                            if 0 <= h_out < height and 0 <= w_out < width:
                                value += (weight[n, c % weight_channels, kh * k + kw, h_out * width + w_out]
                                          * top_diff[n, c, h_out, w_out])
                    grad_x[n, c, h, w] = value
    grad_w = np.zeros_like(weight)
    for n in range(batch):
        for c in range(weight_channels):
            for h in range(height):
                for w in range(width):
                    for kh in range(k):
                        for kw in range(k):
                            h_in = _reflect(-pad + h + kh, height, False)
                            w_in = _reflect(-pad + w + kw, width, False)
                            value = 0.0
                            for cc in range(c, channels, weight_channels):
                                value += x[n, cc, h_in, w_in] * top_diff[n, cc, h, w]
                            grad_w[n, c, kh * k + kw, h * width + w] = value
    return _fold_reflected_padding(grad_x, pad), grad_w


# ---------------------------------------------------------------------------------------------------------------
# Network-level transcription, unfold style


def official_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """nn.ReflectionPad2d: defined (and equal to the kernels) only while the pad is smaller than the map."""
    return nn.ReflectionPad2d(pad)(x)


def repeated_reflect_pad(x: torch.Tensor, pad: int) -> torch.Tensor:
    """timm_san's documented behaviour on small maps, built here from ``_reflect`` index by index."""
    rows = [_reflect(i, x.shape[2], True) for i in range(-pad, x.shape[2] + pad)]
    cols = [_reflect(i, x.shape[3], True) for i in range(-pad, x.shape[3] + pad)]
    return x[:, :, rows][:, :, :, cols]


PadFn = Callable[[torch.Tensor, int], torch.Tensor]


def _neighbours(x: torch.Tensor, k: int, pad_fn: PadFn) -> torch.Tensor:
    batch, channels, height, width = x.shape
    return F.unfold(pad_fn(x, k // 2), kernel_size=k).view(batch, channels, k * k, height * width)


def _official_position(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    loc_w = torch.linspace(-1.0, 1.0, width, dtype=like.dtype, device=like.device).unsqueeze(0).repeat(height, 1)
    loc_h = torch.linspace(-1.0, 1.0, height, dtype=like.dtype, device=like.device).unsqueeze(1).repeat(1, width)
    return torch.cat([loc_w.unsqueeze(0), loc_h.unsqueeze(0)], 0).unsqueeze(0)


class OfficialSAM(nn.Module):
    def __init__(self, sa_type: int, in_planes: int, rel_planes: int, out_planes: int, share: int, k: int,
                 pad_fn: PadFn):
        super().__init__()
        self.sa_type, self.k, self.pad_fn = sa_type, k, pad_fn
        self.conv1 = nn.Conv2d(in_planes, rel_planes, 1)
        self.conv2 = nn.Conv2d(in_planes, rel_planes, 1)
        self.conv3 = nn.Conv2d(in_planes, out_planes, 1)
        if sa_type == 0:
            self.conv_w = nn.Sequential(
                nn.BatchNorm2d(rel_planes + 2), nn.ReLU(), nn.Conv2d(rel_planes + 2, rel_planes, 1, bias=False),
                nn.BatchNorm2d(rel_planes), nn.ReLU(), nn.Conv2d(rel_planes, out_planes // share, 1))
            self.conv_p = nn.Conv2d(2, 2, 1)
        else:
            c_in = rel_planes * (k * k + 1)
            self.conv_w = nn.Sequential(
                nn.BatchNorm2d(c_in), nn.ReLU(), nn.Conv2d(c_in, out_planes // share, 1, bias=False),
                nn.BatchNorm2d(out_planes // share), nn.ReLU(),
                nn.Conv2d(out_planes // share, k * k * out_planes // share, 1))

    def forward(self, x):
        batch, _, height, width = x.shape
        k, hw = self.k, height * width
        x1, x2, x3 = self.conv1(x), self.conv2(x), self.conv3(x)
        if self.sa_type == 0:
            p = self.conv_p(_official_position(height, width, x))
            rel = x1.view(batch, -1, 1, hw) - _neighbours(x2, k, self.pad_fn)
            rel_p = p.view(1, 2, 1, hw) - _neighbours(p, k, self.pad_fn)
            w = torch.softmax(self.conv_w(torch.cat([rel, rel_p.repeat(batch, 1, 1, 1)], 1)), dim=-2)
        else:
            x1 = x1.view(batch, -1, 1, hw)
            x2 = _neighbours(x2, k, self.pad_fn).reshape(batch, -1, 1, hw)
            w = self.conv_w(torch.cat([x1, x2], 1)).view(batch, -1, k * k, hw)
        # aggregation as in the official unit test: groups of Cw consecutive channels, weight channel c % Cw
        cw = w.shape[1]
        neigh = _neighbours(x3, k, self.pad_fn).view(batch, -1, cw, k * k, hw)
        return (w.unsqueeze(1) * neigh).sum(-2).view(batch, -1, height, width)


class OfficialBottleneck(nn.Module):
    def __init__(self, sa_type: int, planes: int, k: int, pad_fn: PadFn):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(planes)
        self.sam = OfficialSAM(sa_type, planes, planes // 16, planes // 4, 8, k, pad_fn)
        self.bn2 = nn.BatchNorm2d(planes // 4)
        self.conv = nn.Conv2d(planes // 4, planes, 1)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.sam(out)))
        return self.conv(out) + x


class OfficialSAN(nn.Module):
    """The official network, module for module; ``pad_fn`` chooses the padding of the footprint."""

    def __init__(self, sa_type: int, layers: Sequence[int], kernels: Sequence[int] = (3, 7, 7, 7, 7),
                 num_classes: int = 1000, pad_fn: PadFn = official_pad):
        super().__init__()
        widths = (64, 256, 512, 1024, 2048)
        self.conv_in, self.bn_in = nn.Conv2d(3, 64, 1, bias=False), nn.BatchNorm2d(64)
        prev = 64
        for i, (c, n, k) in enumerate(zip(widths, layers, kernels)):
            setattr(self, f'conv{i}', nn.Conv2d(prev, c, 1, bias=False))
            setattr(self, f'bn{i}', nn.BatchNorm2d(c))
            setattr(self, f'layer{i}', nn.Sequential(*[OfficialBottleneck(sa_type, c, k, pad_fn) for _ in range(n)]))
            prev = c
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = F.relu(self.bn_in(self.conv_in(x)))
        for i in range(5):
            x = F.max_pool2d(x, 2, 2)
            x = F.relu(getattr(self, f'bn{i}')(getattr(self, f'layer{i}')(getattr(self, f'conv{i}')(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


SA_TYPE = {'pairwise': 0, 'patchwise': 1}
LAYERS = {'san10': (2, 1, 2, 4, 1), 'san15': (3, 2, 3, 5, 2), 'san19': (3, 3, 4, 6, 3)}


def official_model(name: str, pad_fn: PadFn = official_pad, num_classes: int = 1000) -> OfficialSAN:
    """``official_model('san10_pairwise')``."""
    depth, sa_type = name.split('_')
    return OfficialSAN(SA_TYPE[sa_type], LAYERS[depth], num_classes=num_classes, pad_fn=pad_fn)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and random BN statistics, so a parity test exercises every parameter and buffer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                # well below unit gain: the patchwise weights are not normalised and would overflow otherwise
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / fan_in ** 0.5)
                if '.conv_p.' in name:
                    # coordinate differences are ~2/size: scale them up so the position encoding shows in outputs
                    p.mul_(50.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if name.endswith('weight') else 0.0))
        for name, b in model.named_buffers():
            if name.endswith('running_mean'):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith('running_var'):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith('num_batches_tracked'):
                b.fill_(12345)
    return model


def official_checkpoint(model: nn.Module) -> dict:
    """A checkpoint laid out as the official train.py writes it (DataParallel ``module.`` prefix)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
    state_dict = {'module.' + k: v.clone() for k, v in model.state_dict().items()}
    return {'epoch': 100, 'state_dict': state_dict, 'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(), 'top1_val': 0.771, 'top5_val': 0.935}


# --- the paper's design space (Section 3), written from its definitions: for the variants the official release
# does not ship. Maps come after the three projections: x1 = phi(x), x2 = psi(x), x3 = beta(x).

def pair_relation(centre: torch.Tensor, neighbours: torch.Tensor, relation: str) -> torch.Tensor:
    """``delta(phi(x_i), psi(x_j))`` for every neighbour: centre (B, R, 1, HW), neighbours (B, R, k*k, HW)."""
    if relation == 'subtraction':
        return centre - neighbours
    if relation == 'summation':
        return centre + neighbours
    if relation == 'hadamard':
        return centre * neighbours
    if relation == 'concatenation':
        return torch.cat([centre.expand_as(neighbours), neighbours], dim=1)
    if relation == 'dot':
        return (centre * neighbours).sum(dim=1, keepdim=True)
    raise ValueError(relation)


def design_mapping(relation: torch.Tensor, layers: Sequence[dict], training: bool) -> torch.Tensor:
    """``gamma``: per layer BatchNorm (batch statistics in training, else running ones), ReLU, 1x1 conv. In training,
    running statistics given in a layer (``mean``, ``var``) are updated in place as BatchNorm2d updates them."""
    out = relation
    for layer in layers:
        out = F.batch_norm(out, layer['mean'], layer['var'], layer['norm_weight'], layer['norm_bias'],
                           training=training, momentum=layer.get('momentum', 0.1), eps=layer['eps'])
        out = F.conv2d(F.relu(out), layer['weight'], layer['bias'])
    return out


def design_pairwise(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, position, layers: Sequence[dict], k: int,
                    relation: str, training: bool) -> torch.Tensor:
    """y_i = sum_j softmax_j(gamma(delta(x1_i, x2_j) [, p_i - p_j])) * x3_j, weight channel c % Cw."""
    batch, _, height, width = x1.shape
    hw = height * width
    rel = pair_relation(x1.reshape(batch, -1, 1, hw), _neighbours(x2, k, official_pad), relation)
    if position is not None:
        rel_p = position.reshape(1, 2, 1, hw) - _neighbours(position, k, official_pad)
        rel = torch.cat([rel, rel_p.expand(batch, -1, -1, -1)], dim=1)
    weights = torch.softmax(design_mapping(rel, layers, training), dim=2)
    return _aggregate(x3, weights, k)


def design_patchwise(x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor, layers: Sequence[dict], k: int,
                     relation: str, training: bool) -> torch.Tensor:
    """y_i = sum_j gamma(delta(x_R(i)))_j * x3_j: concatenation [x1_i, x2_j for j in R(i)] (channel-major, as unfold
    orders it), star [x1_i . x2_j for j], clique [x1_j . x2_m for j, m] (j-major)."""
    batch, channels, height, width = x1.shape
    hw, kk = height * width, k * k
    n2 = _neighbours(x2, k, official_pad)
    if relation == 'concatenation':
        rel = torch.cat([x1.reshape(batch, channels, hw), n2.reshape(batch, -1, hw)], 1)
    elif relation == 'star':
        rel = torch.stack([(x1.reshape(batch, channels, hw) * n2[:, :, j]).sum(1) for j in range(kk)], dim=1)
    elif relation == 'clique':
        n1 = _neighbours(x1, k, official_pad)
        rel = torch.stack([(n1[:, :, j] * n2[:, :, m]).sum(1) for j in range(kk) for m in range(kk)], dim=1)
    else:
        raise ValueError(relation)
    weights = design_mapping(rel.unsqueeze(2), layers, training)
    return _aggregate(x3, weights.reshape(batch, -1, kk, hw), k)


def _aggregate(x3: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    batch, channels, height, width = x3.shape
    cw = weights.shape[1]
    neigh = _neighbours(x3, k, official_pad).view(batch, channels // cw, cw, k * k, height * width)
    return (weights.unsqueeze(1) * neigh).sum(dim=3).view(batch, channels, height, width)
