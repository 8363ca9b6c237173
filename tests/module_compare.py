"""Assertions comparing two modules after the same step: the gradients of their parameters, their buffers."""
import torch
import torch.nn as nn


def assert_grads_close(module: nn.Module, reference: nn.Module, rtol: float, atol: float) -> None:
    """Every parameter's gradient equals that of the same-named parameter of ``reference``."""
    expected = dict(reference.named_parameters())
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, expected[name].grad, rtol=rtol, atol=atol, msg=name)


def assert_buffers_close(module: nn.Module, reference: nn.Module, rtol: float, atol: float) -> None:
    """Every buffer (BatchNorm statistics, counters) equals the same-named buffer of ``reference``."""
    expected = dict(reference.named_buffers())
    for name, b in module.named_buffers():
        torch.testing.assert_close(b, expected[name], rtol=rtol, atol=atol, msg=name)
