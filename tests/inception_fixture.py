"""Planted Inception weights: random, in exactly the file pytorch-fid loads, so its code runs unchanged.

pytorch-fid fetches ``pt_inception-2015-12-05-6726825d.pth`` with ``load_state_dict_from_url``,
which looks in ``$TORCH_HOME/hub/checkpoints/`` first. Writing a state dict of the same
architecture there lets both pytorch-fid's CLI and :mod:`maskdm.evaluation.fid` run offline. The weights are
random: FID values computed with them are not a measure of sample quality.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_fid import inception as pf_inception

FID_WEIGHTS_FILE = Path(pf_inception.FID_WEIGHTS_URL).name


def _fid_inception_v3_architecture() -> torch.nn.Module:
    """pytorch-fid's ``fid_inception_v3()`` without its download: same blocks, same keys."""
    net = pf_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pf_inception.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pf_inception.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pf_inception.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pf_inception.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pf_inception.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pf_inception.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pf_inception.FIDInceptionE_1(1280)
    net.Mixed_7c = pf_inception.FIDInceptionE_2(2048)
    return net


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights that keep activations of order one through all 94 convolutions.

    PyTorch's default conv init shrinks the signal about threefold per layer, which would leave
    pool3 features near 1e-10 and make every FID a rounding error; He init with a non-trivial
    batch-norm affine keeps features well scaled and distinct between images.
    """
    gen = torch.Generator().manual_seed(seed)
    net = _fid_inception_v3_architecture()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(0.01 * torch.randn(module.weight.shape, generator=gen))
                module.bias.zero_()
    return net.state_dict()


def plant_inception_weights(torch_home: Path, seed: int = 0) -> Path:
    """Write random Inception weights where pytorch-fid looks for them under ``torch_home``."""
    target = Path(torch_home) / "hub" / "checkpoints" / FID_WEIGHTS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state_dict(seed), target)
    return target


@pytest.fixture(scope="session")
def _planted_torch_home(tmp_path_factory) -> Path:
    # Built once per session: 24M random parameters take a few seconds to draw and save.
    torch_home = tmp_path_factory.mktemp("torch_home")
    plant_inception_weights(torch_home)
    return torch_home


@pytest.fixture
def planted_inception(_planted_torch_home, monkeypatch) -> Path:
    """TORCH_HOME set to a folder holding planted random weights; yields the weights file."""
    monkeypatch.setenv("TORCH_HOME", str(_planted_torch_home))
    return _planted_torch_home / "hub" / "checkpoints" / FID_WEIGHTS_FILE
