"""The SAN models through timm's registry and the whole timm model API."""
import pytest
import torch
import timm
from timm.models import FeatureInfo
from timm.models._manipulate import group_parameters

import timm_san  # noqa: F401
from module_compare import assert_grads_close
from reference import official_checkpoint, official_model, randomize_

NAMES = ['san10_pairwise', 'san10_patchwise', 'san15_pairwise', 'san15_patchwise', 'san19_pairwise', 'san19_patchwise']
PAPER_PARAMS_M = dict(zip(NAMES, [10.5, 11.8, 14.1, 16.2, 17.6, 20.5]))


def _x(batch=2, size=64, seed=0, dtype=torch.float32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope='module')
def model():
    return timm.create_model('san10_patchwise').eval()


def test_registry_lists_the_six_models_and_a_tagged_pretrained_cfg_each():
    assert timm.list_models('san*') == NAMES
    assert timm.list_pretrained('san*') == [f'{n}.orig_in1k' for n in NAMES]
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875
        assert cfg['interpolation'] == 'bilinear'
        assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD
        assert cfg['first_conv'] == 'conv_in' and cfg['classifier'] == 'fc'
        assert cfg['license'] == 'mit' and cfg['paper_ids'] == 'arXiv:2004.13621'
        assert cfg['origin_url'] == 'https://github.com/hszhao/SAN'
        assert cfg['tag'] == 'orig_in1k' and cfg['hf_hub_id'].endswith(f'/{name}.orig_in1k')


@pytest.mark.parametrize('name', NAMES)
def test_parameter_counts_equal_the_paper(name):
    model = timm.create_model(name, device='meta')
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == PAPER_PARAMS_M[name]


def test_forward_features_head_and_pre_logits(model):
    x = _x()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 2048, 2, 2)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.forward_head(features), model(x))


@pytest.mark.parametrize('pool,width', [('avg', 2048), ('max', 2048), ('avgmax', 2048), ('catavgmax', 4096)])
def test_num_classes_zero_and_global_pool_choices(pool, width):
    model = timm.create_model('san10_pairwise', num_classes=0, global_pool=pool).eval()
    with torch.no_grad():
        assert model(_x()).shape == (2, width)
    assert model.head_hidden_size == width


def test_no_pool_no_classifier_gives_the_feature_map():
    model = timm.create_model('san10_pairwise', num_classes=0, global_pool='').eval()
    with torch.no_grad():
        assert model(_x(size=96)).shape == (2, 2048, 3, 3)


def test_classifier_get_and_reset(model):
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == 'fc'
    model = timm.create_model('san10_pairwise').eval()
    model.reset_classifier(7)
    assert model.fc.out_features == 7 and model.num_classes == 7 and not model.fc.training
    with torch.no_grad():
        assert model(_x()).shape == (2, 7)
    model.reset_classifier(0, '')
    with torch.no_grad():
        assert model(_x()).dim() == 4


def test_drop_rate_and_drop_path_rate_act_in_train_mode_only():
    model = timm.create_model('san10_pairwise', drop_rate=0.5, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)]
    assert rates and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    x = _x()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x))


def test_forward_intermediates(model):
    x = _x(size=96)
    info = FeatureInfo(model.feature_info, list(range(5)))
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [f.shape[1] for f in feats] == info.channels() == [64, 256, 512, 1024, 2048]
        assert [96 // f.shape[-1] for f in feats] == info.reduction() == [2, 4, 8, 16, 32]
        some = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        torch.testing.assert_close(some, [feats[1], feats[3]])
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        torch.testing.assert_close(last2, feats[3:])
    with pytest.raises(ValueError, match='NCHW'):
        model.forward_intermediates(x, output_fmt='NHWC')


def test_prune_intermediate_layers_keeps_the_selected_outputs():
    model = timm.create_model('san10_pairwise').eval()
    x = _x(size=64)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        kept = model.prune_intermediate_layers(indices=[0, 2])
        after = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert kept == [0, 2]
    assert isinstance(model.layer3, torch.nn.Identity) and isinstance(model.conv4, torch.nn.Identity)
    assert model.num_classes == 0 and not any(k.startswith(('layer3', 'layer4', 'fc')) for k in model.state_dict())
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize('coarse', [True, False])
def test_group_matcher_covers_every_parameter_in_network_order(coarse):
    model = timm.create_model('san10_pairwise')
    groups = group_parameters(model, model.group_matcher(coarse=coarse))
    names = [n for n, _ in model.named_parameters()]
    grouped = [n for g in groups.values() for n in g]
    assert sorted(grouped) == sorted(names)
    first = list(groups.values())[0]
    assert set(first) == {'conv_in.weight', 'bn_in.weight', 'bn_in.bias'}
    stage_of = {}
    for idx, group in enumerate(groups.values()):
        for n in group:
            stage_of[n] = idx
    # stages stay in order: every parameter of stage i comes before every parameter of stage i + 1
    for i in range(4):
        assert max(stage_of[n] for n in names if n.startswith(f'layer{i}.')) < \
            min(stage_of[n] for n in names if n.startswith(f'layer{i + 1}.'))
    expected = 7 if coarse else 1 + sum([2, 1, 2, 4, 1]) + 1
    assert len(groups) >= expected - 1


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    a = timm.create_model('san10_pairwise').train()
    b = timm.create_model('san10_pairwise').train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing()
    x = _x(size=64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.sum().backward(), yb.sum().backward()
    assert_grads_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('feature_cls', [None, 'getter', 'hook'])
def test_features_only_with_out_indices(feature_cls):
    kwargs = {} if feature_cls is None else dict(feature_cls=feature_cls)
    full = timm.create_model('san10_patchwise').eval()
    model = timm.create_model('san10_patchwise', features_only=True, out_indices=(1, 3), **kwargs).eval()
    model.load_state_dict({k: v for k, v in full.state_dict().items() if k in model.state_dict()}, strict=False)
    assert model.feature_info.channels() == [256, 1024] and model.feature_info.reduction() == [4, 16]
    x = _x(size=64)
    with torch.no_grad():
        feats = model(x)
        expected = full.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [f.shape for f in feats] == [e.shape for e in expected]


def test_device_and_dtype_kwargs():
    meta = timm.create_model('san10_pairwise', device='meta')
    assert all(p.device.type == 'meta' for p in meta.parameters())
    double = timm.create_model('san10_pairwise', dtype=torch.float64).eval()
    assert all(p.dtype == torch.float64 for p in double.parameters())
    with torch.no_grad():
        assert double(_x(dtype=torch.float64)).dtype == torch.float64
    meta.to_empty(device='cpu')
    assert all(p.device.type == 'cpu' for p in meta.parameters())


def test_unknown_kwargs_raise_type_error():
    with pytest.raises(TypeError):
        timm.create_model('san10_pairwise', not_an_argument=1)


def test_any_input_size_from_32_up_and_a_clear_error_below():
    model = timm.create_model('san10_pairwise', num_classes=3).eval()
    with torch.no_grad():
        for size in [(32, 32), (97, 131), (96, 96), (33, 250)]:
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 3) and torch.isfinite(out).all()
        with pytest.raises(ValueError, match='at least 32x32 pixels.*got 16x64'):
            model(torch.randn(1, 3, 16, 64))


@pytest.mark.parametrize('in_chans', [1, 5])
def test_in_chans_adapts_pretrained_first_conv(in_chans, tmp_path):
    ref = randomize_(official_model('san10_pairwise'), seed=3)
    path = tmp_path / 'official.pth'
    torch.save(official_checkpoint(ref), path)
    model = timm.create_model(
        'san10_pairwise', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), in_chans=in_chans,
        num_classes=10)
    rgb = ref.conv_in.weight.detach()
    if in_chans == 1:
        expected = rgb.sum(dim=1, keepdim=True)
    else:
        expected = rgb.repeat(1, 2, 1, 1)[:, :in_chans] * (3 / in_chans)
    torch.testing.assert_close(model.conv_in.weight, expected)
    torch.testing.assert_close(model.layer2[0].sam.conv3.weight, ref.layer2[0].sam.conv3.weight)
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model.eval()(torch.randn(1, in_chans, 64, 64)).shape == (1, 10)
