"""Shared test helpers (imported by the test modules; pytest puts this folder on sys.path)."""
import os
import shutil
from pathlib import Path
from typing import Dict

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm running statistics, so that a wrong or missing buffer changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def subprocess_env(**extra: str) -> Dict[str, str]:
    """This process's environment without the settings that change what a load reads (a developer's HF_* token or
    cache, TIMM_METAPOOL_WEIGHTS_DIR), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('HF_') and k != 'TIMM_METAPOOL_WEIGHTS_DIR'}
    env.update(extra)
    return env


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, sha: str = 'a' * 40) -> None:
    """The huggingface_hub cache layout: models--ORG--NAME/snapshots/<sha>/<file> and refs/main -> sha."""
    repo = cache / ('models--' + repo_id.replace('/', '--'))
    shutil.copytree(folder, repo / 'snapshots' / sha)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(sha)
