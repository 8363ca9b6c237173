"""timm's own model test suite, run on the SAN models.

The tests come from the sdist of the installed timm version, fetched from the package registry at test time
(nothing of timm's is committed here), and run in a subprocess with ``-p timm_san`` so the models are
registered before ``tests/test_models.py`` builds its parametrization. ``test_model_forward_intermediates`` and
``test_model_forward_intermediates_features`` filter models by module and would skip SAN: a small shim, written
beside them at test time, calls them for the SAN names.
"""
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

import timm_san  # noqa: F401

SAN_NAMES = timm.list_models('san*')
SHIM = '''
import pytest
import timm
import timm_san  # noqa: F401
from tests import test_models as timm_tests

SAN_NAMES = timm.list_models('san*')


@pytest.mark.parametrize('model_name', SAN_NAMES)
def test_san_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.parametrize('model_name', SAN_NAMES)
def test_san_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)
'''


@pytest.fixture(scope='module')
def timm_sdist(tmp_path_factory) -> Path:
    """The unpacked sdist of the installed timm version, with the SAN shim beside its tests."""
    root = tmp_path_factory.mktemp('timm_sdist')
    version = timm.__version__
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:', '--quiet', '-d', str(root),
           f'timm=={version}']
    done = subprocess.run(cmd, capture_output=True, text=True)
    archives = list(root.glob(f'timm-{version}.tar.gz'))
    if done.returncode != 0 or not archives:
        pytest.fail(f'could not fetch the timm {version} sdist from the package registry:\n{done.stderr[-2000:]}')
    with tarfile.open(archives[0]) as tar:
        tar.extractall(root, filter='data')
    source = root / f'timm-{version}'
    assert (source / 'tests' / 'test_models.py').is_file(), 'timm sdist has no tests/test_models.py'
    (source / 'tests' / 'test_san_shim.py').write_text(SHIM)
    return source


def test_timm_model_suite_passes_for_every_san_model(timm_sdist):
    report = timm_sdist / 'report.xml'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'timm_san', '-p', 'no:cacheprovider', '-q', '--timeout', '600',
           'tests/test_models.py', 'tests/test_san_shim.py', '-k', 'san and not pretrained', f'--junitxml={report}']
    done = subprocess.run(cmd, cwd=timm_sdist, capture_output=True, text=True)
    assert done.returncode == 0, f'timm test suite failed on SAN models:\n{done.stdout[-6000:]}\n{done.stderr[-2000:]}'
    cases = ET.parse(report).getroot().iter('testcase')
    passed = [c.get('name') for c in cases if not any(child.tag in ('skipped', 'failure', 'error') for child in c)]
    for name in SAN_NAMES:
        ran = [p for p in passed if name in p]
        for test in ('test_model_forward[', 'test_model_backward[', 'test_model_default_cfgs[',
                     'test_model_forward_torchscript[', 'test_model_forward_features[', 'test_model_forward_fx[',
                     'test_model_backward_fx[', 'test_san_forward_intermediates[',
                     'test_san_forward_intermediates_features['):
            assert any(p.startswith(test) for p in ran), f'{test}{name}...] did not pass (passed: {ran})'
