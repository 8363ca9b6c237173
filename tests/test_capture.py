"""What PyTorch's tooling makes of the SAN models: torch.export, the ONNX exporter and ONNX Runtime, TorchScript
tracing and torch.compile, and how bad input is refused (as timm's resnet26 refuses it).

One model of each kind (``san10_pairwise``, ``san10_patchwise``) with random weights and BatchNorm statistics, in
eval mode, on small inputs. Every captured program is run at batch sizes and image sizes other than those it was
captured with and compared with the eager model, as ``max |got - eager| / max |eager|``.
"""

import pytest
import torch
import torch.nn as nn
import timm
from torch.export import Dim

import timm_san  # noqa: F401
from timm_san.kernels import cpp
from timm_san.sam import SelfAttention
from reference import randomize_

MODELS = ['san10_pairwise', 'san10_patchwise']
REL = 1e-4


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _model(name: str, seed: int = 0) -> nn.Module:
    return randomize_(timm.create_model(name), seed=seed).eval()


@pytest.fixture(scope='module', params=MODELS)
def model(request):
    """An eval-mode SAN10 of each kind with random weights and statistics, shared by the module's tests."""
    return _model(request.param, seed=MODELS.index(request.param))


def _assert_matches(got: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> None:
    assert got.shape == expected.shape
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error < rel, f'relative error {error:.3g} (allowed {rel:g})'


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --- torch.export

def test_export_with_dynamic_batch_and_size(model):
    x = _rand(2, 3, 64, 64, seed=1)
    dynamic = {0: Dim('batch', min=1, max=32), 2: 32 * Dim('h', min=2, max=16), 3: 32 * Dim('w', min=2, max=16)}
    ep = torch.export.export(model, (x,), dynamic_shapes=(dynamic,))
    custom = {node.target.name() for node in ep.graph.nodes
              if node.op == 'call_function' and getattr(node.target, 'namespace', None) == 'timm_san'}
    sa_type = model.layer0[0].sam.sa_type
    assert f'timm_san::{sa_type}_attention' in custom, custom
    exported = ep.module()
    for seed, shape in enumerate([(3, 3, 64, 64), (1, 3, 64, 64), (3, 3, 96, 64), (1, 3, 64, 128)], start=2):
        x = _rand(*shape, seed=seed)
        with torch.no_grad():
            _assert_matches(exported(x), _eager(model, x))


# --- ONNX

def _onnx_nodes(graph):
    """Every node of an ONNX graph, those of its subgraphs (If, Loop, Scan bodies) included."""
    import onnx
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _onnx_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _onnx_nodes(subgraph)


def test_onnx_export_runs_in_onnxruntime(model, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    onnx = pytest.importorskip('onnx')
    pytest.importorskip('onnxscript')
    path = tmp_path / 'san.onnx'
    torch.onnx.export(
        model, (_rand(2, 3, 64, 64, seed=1),), str(path), dynamo=True,
        dynamic_shapes=({0: 'batch', 2: 'height', 3: 'width'},))

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    domains = {node.domain for node in _onnx_nodes(proto.graph)}
    domains |= {node.domain for function in proto.functions for node in _onnx_nodes(function)}
    assert domains <= {'', 'ai.onnx'}, f'nodes outside the standard operator set: {domains}'
    assert not proto.functions, [f'{f.domain}::{f.name}' for f in proto.functions]

    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    for seed, shape in enumerate([(1, 3, 64, 64), (3, 3, 64, 64), (1, 3, 96, 128), (3, 3, 96, 128)], start=2):
        x = _rand(*shape, seed=seed)
        logits, = session.run(None, {input_name: x.numpy()})
        _assert_matches(torch.from_numpy(logits), _eager(model, x))


# --- TorchScript tracing

def test_jit_trace(model):
    x = _rand(2, 3, 64, 64, seed=1)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)  # check_trace: traced again and compared
        for seed, shape in enumerate([(3, 3, 64, 64), (2, 3, 96, 128)], start=2):
            x = _rand(*shape, seed=seed)
            _assert_matches(traced(x), _eager(model, x))


# --- torch.compile

def test_compiled_model_runs_the_cpu_kernels(kernels_run):
    # Inductor, its default backend: the attention, a custom op, runs as an external call of the compiled code,
    # the compiled C++ kernels where they build (as in eager), else the cpu backend's.
    # One model: a compile takes 15-45 s on two cores (the pairwise one the longer); both kinds go through the same
    # graph capture in test_export_with_dynamic_batch_and_size
    torch._dynamo.reset()
    model = _model('san10_patchwise', seed=1)
    compiled = torch.compile(model)
    x2, x3 = _rand(2, 3, 64, 64, seed=2), _rand(3, 3, 64, 64, seed=3)
    torch._dynamo.mark_dynamic(x2, 0)  # one graph for both batch sizes
    with torch.no_grad():
        expected2, expected3 = model(x2), model(x3)
        _assert_matches(compiled(x2), expected2)
        kernels_run()  # from here on the compiled graph only runs: the log is of the kernels it calls
        out2 = compiled(x2)
        out3 = compiled(x3)
        runs = kernels_run()
    _assert_matches(out2, expected2)
    _assert_matches(out3, expected3)
    # 2 + 1 + 2 + 4 + 1 attention modules, twice
    assert runs == [['patchwise_attention', 'cpp' if cpp.library() else 'cpu']] * 20


def _graph_breaks(fn, *args) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args).graph_break_count


@pytest.mark.parametrize('sa_type', ['pairwise', 'patchwise'])
@pytest.mark.parametrize('train', [False, True])
def test_sam_has_no_graph_breaks(sa_type, train):
    module = SelfAttention(sa_type, 32, 4, 16, share_planes=8, kernel_size=7).train(train)
    x = _rand(2, 32, 9, 8, seed=1).requires_grad_(train)
    assert _graph_breaks(module, x) == 0


# --- bad input, as timm's resnet26 takes it

@pytest.fixture(scope='module')
def resnet26():
    return timm.create_model('resnet26').eval()


def _raised(fn, *args) -> BaseException:
    with pytest.raises(Exception) as info:
        with torch.no_grad():
            fn(*args)
    return info.value


def test_3d_input_is_refused_as_resnet_refuses_it(model, resnet26):
    x = _rand(3, 64, 64, seed=1)
    san, resnet = _raised(model, x), _raised(resnet26, x)
    assert type(san) is type(resnet) is ValueError
    assert str(san) == str(resnet) == 'expected 4D input (got 3D input)'


def test_wrong_channel_count_is_refused_as_resnet_refuses_it(model, resnet26):
    x = _rand(1, 4, 64, 64, seed=1)
    san, resnet = _raised(model, x), _raised(resnet26, x)
    assert type(san) is type(resnet) is RuntimeError
    for error in (san, resnet):
        assert 'to have 3 channels, but got 4 channels instead' in str(error)


def test_uint8_input_is_refused_with_pytorchs_message(model, resnet26):
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    san, resnet = _raised(model, x), _raised(resnet26, x)
    conv = _raised(nn.Conv2d(3, 64, 1, bias=False), x)
    assert type(san) is type(resnet) is type(conv) is RuntimeError
    assert str(san) == str(conv)


def test_float32_input_into_bfloat16_model_is_refused_with_pytorchs_message():
    # models of their own: the shared ones stay float32
    model, resnet26 = _model('san10_pairwise').to(torch.bfloat16), timm.create_model('resnet26').eval().bfloat16()
    x = _rand(1, 3, 64, 64, seed=1)
    san, resnet = _raised(model, x), _raised(resnet26, x)
    conv = _raised(nn.Conv2d(3, 64, 1, bias=False).to(torch.bfloat16), x)
    assert type(san) is type(resnet) is type(conv) is RuntimeError
    assert str(san) == str(conv)


def test_empty_batch_in_eval(model, resnet26):
    x = torch.empty(0, 3, 64, 64)
    out = _eager(model, x)
    assert out.shape == _eager(resnet26, x).shape == (0, 1000)


@pytest.mark.parametrize('name', MODELS)
def test_empty_batch_in_training_leaves_the_statistics(name):
    model = _model(name, seed=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(torch.empty(0, 3, 64, 64))
    assert out.shape == (0, 1000)
    # bit for bit, as nn.BatchNorm2d leaves them (it only counts the batch in num_batches_tracked)
    after = model.state_dict()
    changed = [key for key, value in before.items()
               if not key.endswith('num_batches_tracked') and not torch.equal(after[key], value)]
    assert changed == []
