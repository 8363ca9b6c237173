""" The command line: ``timm-san --version``, the commands it lists, and the demo (warm timing, ImageNet labels,
bad arguments in one line with exit code 2)
"""
import os
import subprocess
import sys

import pytest
import torch
from timm.data import ImageNetInfo

from timm_san.cli.demo import main as demo_main, median_forward_ms
from timm_san.cli.main import COMMANDS, main as cli_main
from timm_san.version import __version__

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), 'timm-san')


def test_version_from_the_console_script():
    result = subprocess.run([CONSOLE_SCRIPT, '--version'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == f'timm-san {__version__}\n'


def test_usage_lists_every_command(capsys):
    assert cli_main(['--help']) == 0
    out = capsys.readouterr().out
    assert all(f'  {name} ' in out for name in COMMANDS)
    assert cli_main(['nope']) == 2 and "unknown command 'nope'" in capsys.readouterr().err


class _CountingModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


def test_timing_warms_up_first():
    module = _CountingModule()
    assert median_forward_ms(module, torch.zeros(1), calls=3) >= 0
    assert module.calls == 4  # one untimed warm-up call, then the three timed ones


def test_demo_names_the_imagenet_class(capsys):
    assert demo_main(['--models', 'san10_patchwise']) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith('| san10_patchwise |'))
    label = row.split(' | ')[4].rsplit(' (', 1)[0]
    names = {ImageNetInfo().index_to_description(i, detailed=False) for i in range(1000)}
    assert label in names, row
    assert 'forward (ms, median of 3 warm)' in out
    assert 'timm-san download, then --pretrained' in out  # random weights, and how to get the official ones


@pytest.mark.parametrize('args, message', [
    (['--image', 'no/such/image.jpg'], "no image file at 'no/such/image.jpg'"),
    (['--image', __file__], 'cannot read'),
    (['--models', 'resnet_nope*'], "no registered model matches 'resnet_nope*'; the SAN models are san10_pairwise"),
])
def test_demo_bad_arguments_end_in_one_line(args, message, capsys):
    assert demo_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith('timm-san demo: error: ') and message in err
    assert len(err.strip().splitlines()) == 1


def test_demo_missing_image_from_the_console_script(tmp_path):
    result = subprocess.run([CONSOLE_SCRIPT, 'demo', '--image', str(tmp_path / 'missing.jpg')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"timm-san demo: error: no image file at '{tmp_path / 'missing.jpg'}'\n"
