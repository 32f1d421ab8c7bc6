"""The VAE as REPA's teacher (SRA^2, arXiv 2601.17830): encoders= accepts a diffusers AutoencoderKL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from repa import DispersiveRegularizer, REPARegularizer, combine
from repa.encoders.vae import VAEEncoder
from repa.errors import ConfigError
from tiny_models import TinyDiT

diffusers = pytest.importorskip("diffusers")  # the optional extra repa[vae]; installed with [dev]


def _tiny_vae():
    """A random 3-level AutoencoderKL: 16 px -> 4 x 4 x 4 latents (the TinyDiT's 4 x 4 token grid)."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    ).eval()


def test_encoders_accepts_an_autoencoder_kl_and_aligns_to_its_latent_mean():
    vae = _tiny_vae()
    torch.manual_seed(1)
    model = TinyDiT(depth=3)
    reg = REPARegularizer(model, layers=1, encoders=vae, projector="linear")
    assert reg.encoder_names == ["vae-latent"] and reg.encoder_dims == [4]
    assert not any(p is q for p in reg.parameters() for q in vae.parameters())
    x = torch.rand(3, 3, 16, 16)
    box = {}
    h = model.blocks[1].register_forward_hook(lambda m, a, out: box.__setitem__("h", out))
    model(x, torch.rand(3))
    h.remove()
    loss = reg(x)
    with torch.no_grad():  # by hand: the posterior mean of the image in [-1, 1], as tokens
        target = vae.encode(x * 2 - 1).latent_dist.mean.flatten(2).transpose(1, 2)  # (3, 16, 4)
        pred = reg.projectors[0](box["h"])
        expected = -0.5 * F.cosine_similarity(pred, target, dim=-1).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in vae.parameters())  # frozen
    assert reg.projectors[0].weight.grad is not None


def test_encoder_features_are_the_last_hidden_map():
    vae = _tiny_vae()
    enc = VAEEncoder(vae, features="encoder")
    assert enc.embed_dim == 16 and enc.grid(16) == (4, 4)
    x = torch.rand(2, 1, 16, 16)  # grayscale is repeated to the VAE's 3 channels
    box = {}
    h = vae.encoder.conv_act.register_forward_hook(lambda m, a, out: box.__setitem__("h", out))
    with torch.no_grad():
        vae.encoder(x.expand(-1, 3, -1, -1) * 2 - 1)
    h.remove()
    assert torch.allclose(enc(x), box["h"], atol=1e-6)
    with pytest.raises(ConfigError, match="features='mid' is not a VAE feature"):
        VAEEncoder(vae, features="mid")
    with pytest.raises(ConfigError, match="needs a diffusers AutoencoderKL"):
        VAEEncoder(torch.nn.Linear(2, 2))


def test_vae_teacher_combines_with_dispersive():
    vae = _tiny_vae()
    model = TinyDiT(depth=3)
    reg = REPARegularizer(model, layers=0, encoders=vae, projector_dim=16)
    disp = DispersiveRegularizer(model, layers=2)
    x = torch.rand(4, 3, 16, 16)
    model(x, torch.rand(4))
    out = combine(vae=reg(x, return_breakdown=True), dispersive=disp(return_breakdown=True))
    out.total.backward()
    assert set(out.logs()) >= {"vae/loss", "vae/weight", "dispersive/loss", "dispersive/weight"}


def test_zero_weight_skips_the_vae_and_save_load_round_trips(tmp_path):
    from repa.schedules import StopAt

    vae = _tiny_vae()
    calls = []
    vae.encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    model = TinyDiT(depth=2)
    reg = REPARegularizer(model, layers=0, encoders={"sd-vae": vae}, projector_dim=16, weight=StopAt(0.5, 1))
    x = torch.rand(2, 3, 16, 16)
    for _ in range(3):
        model(x, torch.rand(2))
        reg(x)
    assert len(calls) == 1  # only the first step, while the weight was > 0
    reg.save_pretrained(tmp_path / "reg")
    reg.remove()
    back = REPARegularizer.from_pretrained(tmp_path / "reg", model, encoders={"sd-vae": vae})
    assert back.encoder_dims == [4] and back._step == 3
    for k, v in reg.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
