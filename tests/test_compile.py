"""torch.compile sees SAN without graph breaks, eval and training, and the compiled module computes the same."""
import pytest
import torch
import timm

import timm_san  # noqa: F401
from timm_san import sam as sam_module, san as san_module
from timm_san.sam import SelfAttention


def _graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
@pytest.mark.parametrize('train', [False, True])
def test_sam_has_no_graph_breaks(sa_type, train):
    module = SelfAttention(sa_type, 32, 4, 16, share_planes=8, kernel_size=7).train(train)
    x = torch.randn(2, 32, 9, 8, requires_grad=train)
    assert _graph_breaks(module, x) == 0


def test_whole_model_has_no_graph_breaks_in_eval():
    model = timm.create_model('san10_pairwise', num_classes=10).eval()
    with torch.no_grad():
        assert _graph_breaks(model, torch.randn(1, 3, 32, 32)) == 0


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
@pytest.mark.parametrize('backend,grad_mode', [('eager', torch.no_grad), ('inductor', torch.inference_mode)])
def test_compiled_sam_matches_eager(sa_type, backend, grad_mode):
    # inductor: Inductor itself, not only the graph capture. The eval fusions write into views of one buffer, which
    # its functionalization refuses, so under the compiler the plain operators run (a whole model compiles the same
    # way, in minutes)
    torch._dynamo.reset()
    module = SelfAttention(sa_type, 16, 2, 8, share_planes=4, kernel_size=3).eval()
    x = torch.randn(2, 16, 6, 5)
    with grad_mode():
        expected = module(x)
        compiled = torch.compile(module, backend=backend)(x)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
def test_compiled_eval_model_runs_the_plain_modules(sa_type, monkeypatch):
    fused_calls = []
    for module, name in [(sam_module, f'{sa_type}_attention'), (san_module, 'pooled_stem'), (san_module, 'conv1x1')]:
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, **k: fused_calls.append(1) or _f(*a, **k))
    torch._dynamo.reset()
    model = timm.create_model(f'san10_{sa_type}', num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        model(x)
        assert len(fused_calls) > 0  # eager eval on CPU takes the fusions
        fused_calls.clear()
        torch.compile(model, backend='eager')(x)
    assert fused_calls == []
