""" Helpers of the operators' backward kernels: ``torch.func.vjp`` over optional inputs, and gradients as an
operator may return them """
from typing import Callable, List, Optional, Sequence

import torch

__all__ = ['vjp_present', 'owned_grads']


def vjp_present(fn: Callable, inputs: Sequence[Optional[torch.Tensor]]):
    """``torch.func.vjp`` of ``fn(*inputs)`` over the inputs that are not None; its pullback returns None for those."""
    present = [i for i, t in enumerate(inputs) if t is not None]

    def of_present(*tensors: torch.Tensor):
        full = list(inputs)
        for i, t in zip(present, tensors):
            full[i] = t
        return fn(*full)

    out, pullback = torch.func.vjp(of_present, *[inputs[i] for i in present])

    def pullback_all(grad) -> List[Optional[torch.Tensor]]:
        grads: List[Optional[torch.Tensor]] = [None] * len(inputs)
        for i, g in zip(present, pullback(grad)):
            grads[i] = g
        return grads

    return out, pullback_all


def owned_grads(like: torch.Tensor, grads: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
    """Gradients as an operator may return them: empty for None, each its own tensor (the kernels hand out the
    parameters' gradients as slices of one buffer; an operator's outputs must not alias)."""
    return [like.new_empty(0) if g is None else g.clone() if g._base is not None else g for g in grads]
