"""The paper's design space as model arguments: relation, position encoding, mapping depth, footprints.

Each variant's SAM is compared with the paper's definitions (``reference.design_*``, written from them, not from
the kernels) on the kernels that serve it (the compiled CPU kernels, chosen through the switch, and the reference),
in eval and in training, forward and backward.
"""
import pytest
import torch
import timm

import timm_san  # noqa: F401
from timm_san import ops
from timm_san.kernels import cpp
from timm_san.sam import SelfAttention
from reference import design_pairwise, design_patchwise, randomize_

PAIR_RELATIONS = ['subtraction', 'summation', 'hadamard', 'concatenation', 'dot']
KERNELS = ['cpp', 'reference']


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _use(kernels: str):
    if kernels == 'cpp' and not cpp.library():
        pytest.skip(f'the compiled CPU kernels cannot be built here: {cpp.unavailable_reason()}')
    return ops.use_kernels(kernels)


def _layers(module: SelfAttention, training: bool):
    """The module's mapping as ``reference.design_mapping`` takes it."""
    mapping = list(module.conv_w)
    return [dict(norm_weight=norm.weight, norm_bias=norm.bias, mean=None if training else norm.running_mean,
                 var=None if training else norm.running_var, eps=norm.eps, weight=conv.weight, bias=conv.bias)
            for norm, conv in zip(mapping[0::3], mapping[2::3])]


def _definition(module: SelfAttention, x: torch.Tensor, relation: str, layers=None) -> torch.Tensor:
    x1, x2, x3 = module.conv1(x), module.conv2(x), module.conv3(x)
    layers = _layers(module, module.training) if layers is None else layers
    if module.sa_type == 'patchwise':
        return design_patchwise(x1, x2, x3, layers, module.kernel_size, relation, module.training)
    position = None if module.conv_p is None else module.conv_p(ops.position_grid(x))
    return design_pairwise(x1, x2, x3, position, layers, module.kernel_size, relation, module.training)


def _sam(sa_type: str, seed: int = 0, **design) -> SelfAttention:
    module = SelfAttention(sa_type, 16, 4, 16, share_planes=8, kernel_size=3, **design)
    return randomize_(module, seed=seed).double()


CASES = [('pairwise', relation, position, layers) for relation in PAIR_RELATIONS for position in (True, False)
         for layers in (1, 3)] + [('pairwise', 'dot', False, 2)] + [
    ('patchwise', relation, False, layers) for relation in ('concatenation', 'star', 'clique') for layers in (1, 3)]
# the compiled CPU kernels compute patchwise concatenation only; star and clique run the reference
COMPILED = {'concatenation'}


@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('sa_type,relation,position,layers', CASES)
def test_variant_equals_its_definition(sa_type, relation, position, layers, kernels, kernels_run):
    design = dict(relation=relation, mapping_layers=layers)
    if sa_type == 'pairwise':
        design['position_encoding'] = position
    module = _sam(sa_type, seed=3, **design)
    x = _rand(2, 16, 9, 10, seed=4).requires_grad_()
    with _use(kernels):
        # eval: running statistics
        module.eval()
        torch.testing.assert_close(module(x), _definition(module, x, relation), rtol=1e-7, atol=1e-9)
        # training: batch statistics, and the gradients of the input and every parameter
        module.train()
        out = module(x)
    served = kernels if sa_type == 'pairwise' or relation in COMPILED else 'reference'
    assert {kernel for _, kernel in kernels_run()} == {served}
    expected = _definition(module, x, relation)
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-9)
    grad = _rand(*out.shape, seed=5)
    leaves = [x] + [p for p in module.parameters()]
    for got, want, name in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(expected, leaves, grad),
                               ['x'] + [n for n, _ in module.named_parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8, msg=f'gradient of {name}')


@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('sa_type,design', [
    ('pairwise', dict(relation='dot', position_encoding=True, mapping_layers=3)),
    ('pairwise', dict(relation='concatenation', position_encoding=False, mapping_layers=3)),
    ('pairwise', dict(relation='hadamard', position_encoding=True, mapping_layers=1)),
    ('patchwise', dict(relation='concatenation', mapping_layers=3)),
    ('patchwise', dict(relation='star', mapping_layers=1)),
    ('patchwise', dict(relation='clique', mapping_layers=3)),
])
def test_variant_gradcheck(sa_type, design, kernels):
    module = _sam(sa_type, seed=6, **design)
    x = _rand(2, 16, 3, 4, seed=7).requires_grad_()
    with _use(kernels):
        for training in (False, True):
            module.train(training)
            assert torch.autograd.gradcheck(module, [x], eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_the_released_configuration_is_the_default():
    released = timm.create_model('san10_pairwise')
    explicit = timm.create_model('san10_pairwise', relation='subtraction', position_encoding=True, mapping_layers=2)
    assert [(k, v.shape) for k, v in released.state_dict().items()] == \
        [(k, v.shape) for k, v in explicit.state_dict().items()]
    patchwise = timm.create_model('san10_patchwise', relation='concatenation', mapping_layers=2)
    assert patchwise.state_dict().keys() == timm.create_model('san10_patchwise').state_dict().keys()


@pytest.mark.parametrize('design,size', [
    (dict(relation='dot', position_encoding=False, mapping_layers=1), 32),
    (dict(relation='summation', mapping_layers=3, kernels=(3, 5, 5, 3, 3)), 64),
])
def test_a_variant_san_trains_and_evaluates(design, size, kernels_run):
    model = timm.create_model('san10_pairwise', num_classes=10, **design)
    x = torch.randn(2, 3, size, size)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 10)
    expected = 'cpp' if cpp.library() else 'reference'
    assert {kernel for _, kernel in kernels_run()} == {expected}


def test_a_variant_exports():
    model = timm.create_model('san10_pairwise', relation='hadamard', position_encoding=False, mapping_layers=1,
                              kernels=(3, 5, 9, 5, 3), num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    batch = torch.export.Dim('batch', min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
        for size in (2, 3):
            x = torch.randn(size, 3, 64, 64)
            torch.testing.assert_close(exported(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('sa_type,design', [
    ('pairwise', dict(relation='dot', position_encoding=False, mapping_layers=3)),
    ('patchwise', dict(relation='star', mapping_layers=1)),
])
def test_a_variant_compiles_without_graph_breaks(sa_type, design):
    module = _sam(sa_type, seed=9, **design).float()
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    for training in (False, True):
        module.train(training)
        explanation = torch._dynamo.explain(module)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6)
    compiled(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('name,design,match', [
    ('san10_pairwise', dict(relation='division'), r"relation='division' is not a pairwise relation.*'dot'"),
    ('san10_pairwise', dict(relation='star'), r"relation='star' is not a pairwise relation"),
    ('san10_patchwise', dict(relation='subtraction'),
     r"relation='subtraction' is not a patchwise relation \('subtraction' is a pairwise relation\)"),
    ('san10_patchwise', dict(position_encoding=True), r'position_encoding=True is for pairwise attention only'),
    ('san10_pairwise', dict(mapping_layers=4), r'mapping_layers=4 is outside \(1, 2, 3\)'),
    ('san10_pairwise', dict(mapping_layers=0), r'mapping_layers=0 is outside'),
    ('san10_pairwise', dict(kernels=(3, 7, 6, 7, 7)), r'kernels=\(3, 7, 6, 7, 7\).*\(3, 5, 7, 9, 11\)'),
    ('san10_patchwise', dict(kernels=(3, 7, 7, 7, 13)), r'kernels=\(3, 7, 7, 7, 13\).*odd, 3 to 11'),
    ('san10_patchwise', dict(kernels=(1, 7, 7, 7, 7)), r'kernels=\(1, 7, 7, 7, 7\)'),
])
def test_bad_design_arguments_are_refused_at_construction(name, design, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model(name, **design)


def test_a_variant_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip('onnxruntime')
    model = timm.create_model('san10_pairwise', relation='concatenation', mapping_layers=3, kernels=(3, 3, 3, 3, 3),
                              num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / 'variant.onnx'
    # the legacy exporter, as timm's onnx_export.py uses by default; dynamic batch
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['x'], dynamic_axes={'x': {0: 'batch'}})
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch in (2, 3):
        x = torch.randn(batch, 3, 64, 64)
        logits, = session.run(None, {'x': x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize('design,named', [
    (dict(relation='dot', position_encoding=False, mapping_layers=1),
     "(san10_pairwise with relation='dot', position_encoding=False, mapping_layers=1)"),
    (dict(relation='concatenation'), "(san10_pairwise with relation='concatenation')"),
    (dict(mapping_layers=3), "(san10_pairwise with mapping_layers=3)"),
])
def test_a_checkpoint_of_another_variant_is_refused_naming_it(design, named):
    from timm_san.weights.checkpoint import CheckpointMismatchError
    variant = timm.create_model('san10_pairwise', **design)
    with pytest.raises(CheckpointMismatchError, match='It holds SAN weights: pairwise') as error:
        timm.create_model('san10_pairwise').load_state_dict(variant.state_dict())
    assert named in str(error.value)
    # and the released weights into the variant: named as the released model
    with pytest.raises(CheckpointMismatchError, match=r'\(san10_pairwise\)\.'):
        variant.load_state_dict(timm.create_model('san10_pairwise').state_dict())


def test_a_patchwise_checkpoint_with_another_mapping_depth_is_named():
    from timm_san.weights.checkpoint import CheckpointMismatchError
    variant = timm.create_model('san10_patchwise', mapping_layers=1)
    with pytest.raises(CheckpointMismatchError, match=r'\(san10_patchwise with mapping_layers=1\)'):
        timm.create_model('san10_patchwise').load_state_dict(variant.state_dict())


def test_a_saved_variant_rebuilds_from_its_model_args(tmp_path):
    from timm.models import save_for_hf
    model = timm.create_model('san10_pairwise', relation='concatenation', mapping_layers=1, kernels=(3, 5, 5, 5, 5),
                              num_classes=10).eval()
    assert model.design_args == dict(relation='concatenation', mapping_layers=1, kernels=(3, 5, 5, 5, 5))
    save_for_hf(model, str(tmp_path), model_args=model.design_args)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert timm.create_model('san10_patchwise').design_args == {}


ALL_RELATIONS = [('pairwise', r) for r in PAIR_RELATIONS] + [
    ('patchwise', r) for r in ('concatenation', 'star', 'clique')]


@pytest.mark.parametrize('sa_type,relation', ALL_RELATIONS)
def test_every_relation_exports_and_runs_in_onnxruntime(sa_type, relation, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    module = _sam(sa_type, seed=11, relation=relation, mapping_layers=1 if relation in ('dot', 'star') else 3)
    module = module.float().eval()
    x = torch.randn(2, 16, 9, 10)
    with torch.no_grad():
        eager = module(x)
        torch.testing.assert_close(torch.export.export(module, (x,)).module()(x), eager, rtol=1e-5, atol=1e-6)
    path = tmp_path / 'sam.onnx'
    torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=['x'])
    out, = ort.InferenceSession(str(path), providers=['CPUExecutionProvider']).run(None, {'x': x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('size', [32, 96])
@pytest.mark.parametrize('sa_type,relation', ALL_RELATIONS)
def test_every_relation_trains_and_evaluates_in_a_san(sa_type, relation, size):
    model = timm.create_model(f'san10_{sa_type}', relation=relation, num_classes=5)
    x = torch.randn(2, 3, size, size)
    torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([1, 2])).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize('kernels', KERNELS)
@pytest.mark.parametrize('sa_type,design', [
    ('pairwise', dict(relation='concatenation', position_encoding=False, mapping_layers=3)),
    ('patchwise', dict(relation='star', mapping_layers=3)),
    ('patchwise', dict(relation='concatenation', mapping_layers=1)),
])
def test_a_training_forward_updates_the_running_statistics_as_batchnorm_does(sa_type, design, kernels):
    module = _sam(sa_type, seed=12, **design).train()
    x = _rand(2, 16, 7, 8, seed=13)
    layers = _layers(module, training=False)  # the running statistics, copied
    for layer in layers:
        layer.update(mean=layer['mean'].clone(), var=layer['var'].clone())
    norms = list(module.conv_w)[0::3]
    counts = [int(norm.num_batches_tracked) for norm in norms]
    with torch.no_grad():
        _definition(module, x, design['relation'], layers)  # BatchNorm2d's update of the copies
        with _use(kernels):
            module(x)
    for norm, layer, count in zip(norms, layers, counts):
        torch.testing.assert_close(norm.running_mean, layer['mean'], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(norm.running_var, layer['var'], rtol=1e-9, atol=1e-12)
        assert int(norm.num_batches_tracked) == count + 1


def test_the_attention_operators_refuse_bad_arguments():
    module = _sam('pairwise', seed=14)
    x = _rand(1, 16, 5, 5, seed=15)
    params = [p for name, p in module.named_parameters() if not name.startswith('conv_p')]
    params.insert(9, None)  # the first mapping conv's absent bias
    running = [module.conv_w[0].running_mean, module.conv_w[0].running_var,
               module.conv_w[3].running_mean, module.conv_w[3].running_var]
    position = module.conv_p(ops.position_grid(x))
    with pytest.raises(ValueError, match=r'relation code 5 names no relation; codes 0-4'):
        ops.pairwise_attention(x, params, running, position, 3, [1e-5, 1e-5], [False, False], 5)
    with pytest.raises(ValueError, match=r'one to three mapping layers.*got 4 eps and 4 flags'):
        ops.pairwise_attention(x, params, running, position, 3, [1e-5] * 4, [False] * 4)
    with pytest.raises(ValueError, match=r'with 2 mapping layers takes 14 parameters \(conv1.weight.*and 4 running '
                                         r'statistics, got 13 and 4'):
        ops.pairwise_attention(x, params[:-1], running, position, 3, [1e-5, 1e-5], [False, False])
    with pytest.raises(ValueError, match=r'relation code 7 names no relation; codes 0-2'):
        ops.patchwise_attention(x, params, running, 3, [1e-5, 1e-5], [False, False], 7)
    # the released call itself is accepted
    ops.pairwise_attention(x, params, running, position, 3, [1e-5, 1e-5], [False, False])
