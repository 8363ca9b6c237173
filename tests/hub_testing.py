""" Helpers of the hub/ tests: official-format checkpoints, one conversion shared by the test modules, and
loading models in a fresh Python process with the environment a user would set (HF_ENDPOINT, HF_HOME, ...)
"""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file

from reference import official_checkpoint, official_model, randomize_

REPO_ROOT = Path(__file__).resolve().parents[1]
HUB_DIR = REPO_ROOT / 'hub'
MODEL = 'san10_pairwise'
TAG = 'orig_in1k'
DEFAULT_ORG = 'timm-san'  # timm_san.hub_ids.HF_HUB_ORG when TIMM_SAN_HF_HUB_ORG is not set
REPO_ID = f'{DEFAULT_ORG}/{MODEL}.{TAG}'
CHECK_SIZE = 64  # small images keep the CPU time of every load down
SUBPROCESS_TIMEOUT = 300

# the load a user makes, in a fresh process; writes the model's weights and its outputs on fixed images
LOAD_SCRIPT = f"""
import sys, torch, timm, timm_san
from safetensors.torch import save_file
torch.set_num_threads(1)
model = timm.create_model(sys.argv[1], pretrained=True).eval()
images = torch.randn(2, 3, {CHECK_SIZE}, {CHECK_SIZE}, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(images)
save_file({{'logits': logits.contiguous()}}, sys.argv[2] + '.logits')
save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, sys.argv[2] + '.weights')
print('loaded', type(model).__name__)
"""


def write_official_checkpoint(path: Path, model_name: str = MODEL, seed: int = 0) -> Path:
    """An official-format checkpoint (``module.`` prefix, optimizer, scheduler) of random weights."""
    torch.save(official_checkpoint(randomize_(official_model(model_name), seed)), path)
    return path


def run(args, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run a command of this repository in a fresh process; output captured as text."""
    return subprocess.run(
        args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


def convert(checkpoint: Path, out: Path, *extra: str, model: str = MODEL) -> subprocess.CompletedProcess:
    """``python hub/convert.py`` as the README says to run it, checked on small images."""
    return run([sys.executable, str(HUB_DIR / 'convert.py'), str(checkpoint), '--model', model, '--out', str(out),
                '--check-input-size', str(CHECK_SIZE), *extra], env=clean_env())


def shared_conversion(tmp_path_factory) -> Tuple[Path, Path, subprocess.CompletedProcess]:
    """One checkpoint converted once per test session, for every module that needs a converted folder.

    The conversion runs against a record of official checkpoints that holds this checkpoint's sha256, so it
    also shows the check of a matching file.

    Returns:
        The checkpoint, the folder convert.py wrote, and convert.py's completed process.
    """
    root = tmp_path_factory.getbasetemp() / 'hub_shared_conversion'
    checkpoint, folder = root / 'model_best.pth', root / f'{MODEL}.{TAG}'
    if not folder.exists():
        root.mkdir(exist_ok=True)
        write_official_checkpoint(checkpoint)
        record = json.loads((HUB_DIR / 'official_checkpoints.json').read_text())
        record['checkpoints'][MODEL]['sha256'] = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        (root / 'sources.json').write_text(json.dumps(record))
        result = convert(checkpoint, folder, '--sources', str(root / 'sources.json'))
        assert result.returncode == 0, result.stderr
        (root / 'convert.stdout').write_text(result.stdout)
    result = subprocess.CompletedProcess([], 0, (root / 'convert.stdout').read_text(), '')
    return checkpoint, folder, result


def clean_env(**overrides: Optional[str]) -> Dict[str, str]:
    """This process's environment without any Hub or timm-san settings, plus ``overrides`` (None removes)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('HF_', 'HUGGINGFACE_', 'TIMM_SAN_')) and k.lower() not in ('http_proxy', 'https_proxy')}
    env.update({'NO_PROXY': '127.0.0.1,localhost', 'HF_HUB_DISABLE_TELEMETRY': '1', 'PYTHONUNBUFFERED': '1'})
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def load_in_subprocess(name: str, out_prefix: Path, env: Dict[str, str]) -> subprocess.CompletedProcess:
    """``timm.create_model(name, pretrained=True)`` in a fresh process; see ``LOAD_SCRIPT``."""
    return run([sys.executable, '-c', LOAD_SCRIPT, name, str(out_prefix)], env=env)


def loaded_results(out_prefix: Path) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Weights and outputs written by ``LOAD_SCRIPT``."""
    return load_file(f'{out_prefix}.weights'), load_file(f'{out_prefix}.logits')['logits']


def checkpoint_reference(checkpoint: Path) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """The checkpoint's weights, and the outputs of a timm model loaded from it directly on ``LOAD_SCRIPT``'s images."""
    import timm
    import timm_san  # noqa: F401
    from timm_san.weights.checkpoint import load_official_checkpoint
    state_dict, _ = load_official_checkpoint(str(checkpoint))
    model = timm.create_model(MODEL).eval()
    model.load_state_dict(state_dict)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = torch.randn(2, 3, CHECK_SIZE, CHECK_SIZE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(images)
    finally:
        torch.set_num_threads(threads)
    return state_dict, logits


def assert_same_weights(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> None:
    assert set(expected) == set(got)
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f'{len(differ)} tensors differ, e.g. {differ[:3]}'
