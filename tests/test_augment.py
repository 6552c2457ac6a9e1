"""Training-batch augmentation (nft_cuda/data/augment.py) and its use by the trainer."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES

from nft_cuda.data.augment import CropFlip
from nft_cuda.io import safe_load
from nft_cuda.train.trainer import TrainConfig, read_checkpoint, train


def _explicit(x: torch.Tensor, pad: int, fill, seed: int) -> torch.Tensor:
    """One image at a time, written out: pad with fill, crop at the drawn offset, flip if drawn."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=g)
    flips = torch.randint(0, 2, (b,), generator=g)
    out = torch.empty_like(x)
    for i in range(b):
        canvas = torch.empty(c, h + 2 * pad, w + 2 * pad, dtype=x.dtype)
        for ch in range(c):
            canvas[ch] = fill[ch] if len(fill) > 1 else fill[0]
        canvas[:, pad : pad + h, pad : pad + w] = x[i].cpu()
        oy, ox = int(offsets[0, i]), int(offsets[1, i])
        img = canvas[:, oy : oy + h, ox : ox + w]
        out[i] = img.flip(-1) if flips[i] else img
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,fill", [((9, 3, 8, 6), (-1.0, -2.0, -3.0)), ((5, 1, 7, 7), (0.5,))])
def test_crop_flip_matches_explicit_loop(device, shape, fill):
    x = torch.randn(shape).to(device)
    aug = CropFlip(3, fill=fill)
    out = aug(x, torch.Generator().manual_seed(11))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out.cpu(), _explicit(x, 3, fill, 11))
    # the same generator state gives the same batch; another seed a different one
    assert torch.equal(aug(x, torch.Generator().manual_seed(11)), out)
    assert not torch.equal(aug(x, torch.Generator().manual_seed(12)), out)


def test_crop_flip_border_and_identity():
    x = torch.ones(64, 2, 4, 4)
    out = CropFlip(2, fill=(-5.0, 7.0))(x, torch.Generator().manual_seed(0))
    values = set(out[:, 0].unique().tolist()) | set(out[:, 1].unique().tolist())
    assert values <= {1.0, -5.0, 7.0} and -5.0 in values and 7.0 in values  # borders show up, filled per channel
    assert torch.equal(out[:, 0] == -5.0, out[:, 1] == 7.0)  # same crop for every channel of an image
    # no padding and no flip: the identity; no padding with flips: each image flipped or not
    assert torch.equal(CropFlip(0, flip=False)(x, torch.Generator()), x)
    y = torch.arange(8.0).view(2, 1, 1, 4)
    flipped = CropFlip(0)(y, torch.Generator().manual_seed(3))
    for i in range(2):
        assert torch.equal(flipped[i], y[i]) or torch.equal(flipped[i], y[i].flip(-1))


def test_crop_flip_errors():
    with pytest.raises(ValueError, match="pad"):
        CropFlip(-1)
    with pytest.raises(ValueError, match="fill"):
        CropFlip(2, fill=())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        CropFlip(2)(torch.zeros(3, 4, 4), torch.Generator())
    with pytest.raises(ValueError, match="channels"):
        CropFlip(2, fill=(0.0, 1.0))(torch.zeros(1, 3, 4, 4), torch.Generator())


def test_config_default_follows_the_dataset():
    assert TrainConfig(dataset="cifar10").augments() and TrainConfig(dataset="cifar100").augments()
    assert not TrainConfig(dataset="mnist").augments() and not TrainConfig().augments()
    assert TrainConfig(dataset="mnist", augment=True).augments()
    assert not TrainConfig(dataset="cifar10", augment=False).augments()
    with pytest.raises(TypeError, match="augment"):
        TrainConfig(augment="yes")
    c = TrainConfig(augment=True)
    assert TrainConfig.from_dict(c.to_dict()) == c


def _cfg(tmp_path, name, **kw):
    return TrainConfig(
        out=str(tmp_path / name), device="cpu", limit_train=64, limit_eval=32, batch_size=32, epochs=2, **kw
    )


def test_trainer_augments_and_resumes_bit_identically(tmp_path):
    plain = train(_cfg(tmp_path, "plain"), progress=False, log=None)
    full = train(_cfg(tmp_path, "full", augment=True), progress=False, log=None)
    assert [r["train_loss"] for r in full["history"]] != [r["train_loss"] for r in plain["history"]]
    train(_cfg(tmp_path, "part", augment=True), progress=False, log=None, stop_after=1)
    resumed = train(_cfg(tmp_path, "part", augment=True, resume=True), progress=False, log=None)
    assert [r["train_loss"] for r in full["history"]] == [r["train_loss"] for r in resumed["history"]]
    a, b = read_checkpoint(tmp_path / "full", warn=False)[0], read_checkpoint(tmp_path / "part", warn=False)[0]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa = safe_load(str(tmp_path / "full" / "model.pt"))["state_dict"]
    sb = safe_load(str(tmp_path / "part" / "model.pt"))["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
