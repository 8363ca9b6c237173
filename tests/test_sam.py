"""The self-attention module alone against the official arithmetic, where every term (position too) shows."""
import pytest
import torch

from timm_san.sam import SelfAttention
from module_compare import assert_grads_close
from reference import OfficialSAM, official_pad, randomize_

SA_TYPE = {'pairwise': 0, 'patchwise': 1}


def _pair(sa_type: str, kernel_size: int, seed: int = 0):
    ref = randomize_(OfficialSAM(SA_TYPE[sa_type], 32, 4, 16, 8, kernel_size, official_pad), seed=seed)
    ours = SelfAttention(sa_type, 32, 4, 16, share_planes=8, kernel_size=kernel_size)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
@pytest.mark.parametrize('kernel_size,size', [(3, (5, 6)), (7, (8, 8)), (7, (4, 9))])
@pytest.mark.parametrize('train', [False, True])
def test_sam_matches_official(sa_type, kernel_size, size, train):
    ours, ref = _pair(sa_type, kernel_size)
    ours.train(train), ref.train(train)
    x = torch.randn(2, 32, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours, ref = ours.double(), ref.double()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = ours(x1), ref(x2)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out.backward(upstream), expected.backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-10)
    assert_grads_close(ours, ref, rtol=1e-9, atol=1e-10)


def test_sam_rejects_bad_configuration():
    with pytest.raises(ValueError, match='sa_type'):
        SelfAttention('both', 32, 4, 16)
    with pytest.raises(ValueError, match='divisible'):
        SelfAttention('pairwise', 32, 4, 12, share_planes=8)
    with pytest.raises(ValueError, match='odd'):
        SelfAttention('patchwise', 32, 4, 16, kernel_size=4)
