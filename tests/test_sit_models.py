"""Specification of repa.sit.models: the SiT velocity transformer of REPA's recipe."""

import math

import pytest
import torch
from torch import nn

from repa.errors import ConfigError, ShapeMismatchError, UnknownNameError
from repa.sit.models import SiT, SiT_models, create_sit, sincos_pos_embed_2d, timestep_embedding


def tiny(**kw) -> SiT:
    """A small SiT on Fashion-MNIST-like input (1 x 28 x 28, 10 classes)."""
    config = dict(input_size=28, patch_size=4, in_channels=1, hidden_size=32, depth=3, num_heads=4, num_classes=10)
    config.update(kw)
    return SiT(**config)


def randomize_(model: SiT) -> SiT:
    """Break adaLN-Zero's zero init so outputs depend on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------ sizes


def test_registry_has_every_size_and_patch_with_the_reference_widths():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    expected = {f"SiT-{s}/{p}" for s in sizes for p in (2, 4, 8)}
    assert set(SiT_models) == expected
    for name in expected:
        size, patch = name[4:].split("/")
        with torch.device("meta"):
            model = create_sit(name)
        depth, width, heads = sizes[size]
        assert len(model.blocks) == depth
        assert model.hidden_size == width
        assert model.num_heads == heads
        assert model.patch_size == int(patch)


def test_create_sit_unknown_name_lists_the_valid_names():
    with pytest.raises(UnknownNameError, match=r"'SiT-M/2'.*SiT-S/2.*SiT-XL/8"):
        create_sit("SiT-M/2")


def test_create_sit_applies_overrides():
    model = create_sit("SiT-S/4", input_size=28, in_channels=1, num_classes=10, depth=2)
    assert len(model.blocks) == 2 and model.in_channels == 1 and model.grid == (7, 7)


@pytest.mark.parametrize(
    "name, published",
    [
        ("SiT-B/2", 130e6),
        ("SiT-XL/2", 675e6),
    ],
)
def test_parameter_counts_match_the_published_ones(name, published):
    # The published counts (DiT/SiT-B/2 130M, DiT/SiT-XL/2 675M; SiT reuses DiT's architecture)
    # refer to the released configuration: 32x32x4 latents, 1000 classes + 1 null class,
    # learn_sigma=True (8 output channels) and a frozen pos_embed of N x D values that the
    # reference stores as a (non-trainable) parameter. Here pos_embed is a buffer and
    # learn_sigma=False is the default; the difference is far below 1% of the total:
    #   learn_sigma adds p*p*C*(D+1) outputs of the final Linear (12,304 for B, 18,448 for XL),
    #   pos_embed holds 256 * D values (196,608 for B, 294,912 for XL).
    for learn_sigma in (False, True):
        with torch.device("meta"):
            model = create_sit(name, input_size=32, in_channels=4, num_classes=1000, learn_sigma=learn_sigma)
        n = num_params(model)
        assert abs(n - published) / published < 0.01, (name, learn_sigma, n)
    # Closed form of the count: 28 (or 12) blocks of 18 D^2 + 15 D weights, plus embedders and head.
    d = model.hidden_size
    block = 3 * d * d + 3 * d + d * d + d + 8 * d * d + 5 * d + 6 * d * d + 6 * d
    t_emb = 256 * d + d + d * d + d
    y_emb = 1001 * d
    patch = 4 * 2 * 2 * d + d
    head = 2 * d * d + 2 * d + d * 2 * 2 * 8 + 2 * 2 * 8
    assert num_params(model) == len(model.blocks) * block + t_emb + y_emb + patch + head


def test_pos_embed_is_fixed_and_not_a_parameter():
    model = tiny()
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" in model.state_dict()
    assert model.pos_embed.shape == (1, 49, 32)


# ------------------------------------------------------------------------------------ embeddings


def test_sincos_pos_embed_on_a_7x7_grid_matches_the_formula():
    dim, h, w = 16, 7, 7
    emb = sincos_pos_embed_2d(dim, (h, w))
    assert emb.shape == (49, 16)
    quarter = dim // 4
    for n in range(h * w):
        row, col = divmod(n, w)
        expected = []
        for pos in (col, row):  # first half: column, second half: row
            freqs = [10000 ** (-k / quarter) for k in range(quarter)]
            expected += [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
        assert torch.allclose(emb[n], torch.tensor(expected, dtype=torch.float32), atol=1e-6), n
    # Distinct positions get distinct embeddings.
    assert torch.cdist(emb, emb).add(torch.eye(49)).min() > 0.1


def test_sincos_pos_embed_rejects_width_not_divisible_by_4():
    with pytest.raises(ConfigError, match="divisible by 4.*hidden_size=18"):
        sincos_pos_embed_2d(18, (7, 7))


def test_timestep_embedding_matches_the_formula():
    t = torch.tensor([0.0, 0.3, 1.0])
    emb = timestep_embedding(t, 8)
    freqs = [10000 ** (-k / 4) for k in range(4)]
    for i, ti in enumerate(t.tolist()):
        expected = [math.cos(ti * f) for f in freqs] + [math.sin(ti * f) for f in freqs]
        assert torch.allclose(emb[i], torch.tensor(expected), atol=1e-6)


# ------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("patch, grid", [(4, 7), (2, 14)])
def test_forward_shapes_on_fashion_mnist_grids(patch, grid):
    model = randomize_(tiny(patch_size=patch))
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.rand(2), torch.tensor([3, 10]))
    assert out.shape == (2, 1, 28, 28)
    assert model.pos_embed.shape == (1, grid * grid, 32)


def test_learn_sigma_still_returns_the_velocity_shape():
    model = randomize_(tiny(learn_sigma=True))
    assert model.final_layer.linear.out_features == 4 * 4 * 2
    assert model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([0, 1])).shape == (2, 1, 28, 28)


def test_latent_input_shape():
    model = randomize_(SiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2))
    assert model(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 999])).shape == (3, 4, 8, 8)


def test_adaln_zero_init_blocks_are_identity_and_output_is_zero():
    model = tiny()
    seen = []
    hooks = [b.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out))) for b in model.blocks]
    out = model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2]))
    for h in hooks:
        h.remove()
    assert torch.equal(out, torch.zeros_like(out))
    assert len(seen) == 3
    for inp, block_out in seen:
        assert torch.equal(inp, block_out)


def test_blocks_are_a_module_list_and_block_7_gives_tokens():
    model = tiny(depth=8, patch_size=2)
    assert isinstance(model.blocks, nn.ModuleList)
    block = dict(model.named_modules())["blocks.7"]
    assert block is model.blocks[7]
    captured = {}
    block.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([0, 1]))
    assert captured["h"].shape == (2, 14 * 14, 32)


def test_unpatchify_puts_token_n_at_patch_row_n_div_w_column_n_mod_w():
    model = tiny(patch_size=4)  # 7 x 7 grid, 1 channel
    tokens = torch.arange(49, dtype=torch.float32).reshape(1, 49, 1).expand(1, 49, 16)
    img = model.unpatchify(tokens)[0, 0]  # (28, 28)
    rows = torch.arange(28)[:, None] // 4
    cols = torch.arange(28)[None, :] // 4
    assert torch.equal(img, (rows * 7 + cols).float())


def test_output_depends_on_time_and_label():
    model = randomize_(tiny()).eval()
    x = torch.randn(1, 1, 28, 28)
    base = model(x, torch.tensor([0.3]), torch.tensor([2]))
    assert not torch.allclose(base, model(x, torch.tensor([0.7]), torch.tensor([2])))
    assert not torch.allclose(base, model(x, torch.tensor([0.3]), torch.tensor([5])))


def test_tokens_interact_through_attention():
    model = randomize_(tiny()).eval()
    x = torch.randn(1, 1, 28, 28)
    x2 = x.clone()
    x2[..., :4, :4] += 1.0  # change the top-left patch only
    t, y = torch.tensor([0.5]), torch.tensor([1])
    diff = (model(x, t, y) - model(x2, t, y)).abs()
    assert diff[..., 20:, 20:].max() > 0  # the far bottom-right patch sees it


def test_scalar_time_is_broadcast():
    model = randomize_(tiny()).eval()
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    assert torch.allclose(model(x, torch.tensor(0.4), y), model(x, torch.full((2,), 0.4), y))


# ------------------------------------------------------------------------------------ attention


def reference_attention(attn, x):
    """softmax(q k^T / sqrt(d_h)) v per head, written out, with the block's own q/k norms."""
    b, n, d = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).split(d, dim=-1)
    q, k, v = (z.reshape(b, n, h, d // h).transpose(1, 2) for z in (q, k, v))
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize(
    "qk_norm, norm_type",
    [(False, nn.Identity), (True, nn.LayerNorm), ("layernorm", nn.LayerNorm), ("rmsnorm", None)],
)
def test_attention_equals_softmax_formula_and_uses_sdpa(monkeypatch, qk_norm, norm_type):
    model = randomize_(tiny(qk_norm=qk_norm))
    attn = model.blocks[0].attn
    if norm_type is not None:
        assert isinstance(attn.q_norm, norm_type) and isinstance(attn.k_norm, norm_type)
    else:
        assert type(attn.q_norm).__name__ == "RMSNorm"
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    x = torch.randn(2, 5, 32)
    assert torch.allclose(attn(x), reference_attention(attn, x), atol=1e-5)
    assert calls == [1]


def test_rmsnorm_qk_norm_normalizes_each_head_vector():
    model = tiny(qk_norm="rmsnorm")
    q = torch.randn(2, 4, 5, 8) * 3
    out = model.blocks[0].attn.q_norm(q)  # gain initialized to 1
    assert torch.allclose(out.pow(2).mean(-1), torch.ones(2, 4, 5), atol=1e-4)


def test_unknown_qk_norm_is_rejected():
    with pytest.raises(ConfigError, match="qk_norm='batchnorm'.*layernorm.*rmsnorm"):
        tiny(qk_norm="batchnorm")


# ------------------------------------------------------------------------------------ labels / CFG


def test_force_drop_ids_gives_the_null_label_output():
    model = randomize_(tiny()).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    dropped = model(x, t, torch.tensor([3, 4]), force_drop_ids=torch.tensor([1, 0]))
    assert torch.allclose(dropped[0], model(x, t, torch.tensor([10, 4]))[0])
    assert torch.allclose(dropped[1], model(x, t, torch.tensor([3, 4]))[1])


def test_label_dropout_only_in_training_mode():
    model = randomize_(tiny(class_dropout_prob=1.0))
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 4])
    null = torch.tensor([10, 10])
    model.train()
    assert torch.allclose(model(x, t, y), model.eval()(x, t, null))
    model.eval()
    assert not torch.allclose(model(x, t, y), model(x, t, null))


def test_label_dropout_rate_is_class_dropout_prob():
    model = tiny(class_dropout_prob=0.1).train()
    torch.manual_seed(0)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = (model.y_embedder.drop_labels(labels) == 10).float().mean().item()
    assert abs(dropped - 0.1) < 0.01  # binomial std is 0.002


def test_forward_with_cfg_is_the_guidance_formula():
    model = randomize_(tiny()).eval()
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([3, 4])
    v_c = model(x, t, y)
    v_u = model(x, t, torch.tensor([10, 10]))
    assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0), v_c, atol=1e-5)
    assert torch.allclose(model.forward_with_cfg(x, t, y, 2.5), v_u + 2.5 * (v_c - v_u), atol=1e-4)


# ------------------------------------------------------------------------------------ errors / grads


def test_input_size_not_divisible_by_patch_is_rejected():
    with pytest.raises(ConfigError, match="input_size=28 is not divisible by patch_size=8"):
        tiny(patch_size=8)


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="hidden_size=32 is not divisible by num_heads=5"):
        tiny(num_heads=5)


def test_wrong_input_shape_is_a_shape_error():
    model = tiny()
    with pytest.raises(ShapeMismatchError, match=r"\(B, 1, 28, 28\).*\(2, 3, 28, 28\)"):
        model(torch.randn(2, 3, 28, 28), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ShapeMismatchError, match="t of shape"):
        model(torch.randn(2, 1, 28, 28), torch.rand(3), torch.tensor([0, 1]))


def test_backward_reaches_the_first_block_once_zero_init_is_broken():
    model = randomize_(tiny())
    out = model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([0, 1]))
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0


def test_first_step_from_zero_init_trains_the_output_layer():
    # adaLN-Zero: at init only the final Linear (and final adaLN) receive gradient.
    model = tiny()
    x = torch.randn(2, 1, 28, 28)
    loss = (model(x, torch.rand(2), torch.tensor([0, 1])) - x).pow(2).mean()
    loss.backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_no_labels_means_the_null_label():
    model = randomize_(tiny()).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    assert torch.allclose(model(x, t, None), model(x, t, torch.tensor([10, 10])))


def test_state_dict_names_follow_the_reference_layout():
    keys = set(tiny(depth=1).state_dict())
    for key in (
        "pos_embed",
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.weight",
        "y_embedder.embedding_table.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
        "blocks.0.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
        "final_layer.adaLN_modulation.1.weight",
    ):
        assert key in keys, key


def test_bf16_autocast_forward_matches_fp32():
    model = randomize_(tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25)  # keep activations moderate so bf16 rounding stays small
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
