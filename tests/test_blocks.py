"""Block partition of diffusers UNets, and capturing / re-running a block's inputs exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cond_unet, tiny_unet
from diffusers import UNet2DConditionModel, UNet2DModel
from torch.testing import assert_close

from dq.distill.blocks import Block, BlockIO, capture_block_io, partition_blocks, run_block


def forward_fn(unet: torch.nn.Module, batch: int = 3, seed: int = 0, **kwargs: object):
    """A seeded forward pass of `unet` as a zero-argument callable (what capture_block_io runs)."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config.in_channels
    x = torch.randn(batch, c, 8, 8, generator=g)  # [B, C, 8, 8]
    t = torch.randint(0, 1000, (batch,), generator=g)  # [B]
    if isinstance(unet, UNet2DConditionModel):
        kwargs.setdefault("encoder_hidden_states", torch.randn(batch, 5, 12, generator=g))  # [B, L, D]
    return lambda: unet(x, t, **kwargs)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_unet(attention_head_dim=4)


@pytest.fixture(scope="module")
def cond_unet() -> UNet2DConditionModel:
    return tiny_cond_unet()


@pytest.fixture(params=["unet", "cond_unet"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    return request.getfixturevalue(request.param)


def test_every_parameter_in_exactly_one_block(model: torch.nn.Module) -> None:
    owners: dict[str, list[str]] = {}
    for block in partition_blocks(model):
        for m in block.modules:
            for p, _ in model.get_submodule(m).named_parameters():
                owners.setdefault(f"{m}.{p}", []).append(block.name)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(owners) == sorted(names)
    assert all(len(v) == 1 for v in owners.values()), {k: v for k, v in owners.items() if len(v) > 1}
    assert any("norm" in n for n in owners)  # norms are covered too


def test_execution_order_unconditional(unet: UNet2DModel) -> None:
    blocks = partition_blocks(unet)
    names = [b.name for b in blocks]
    assert names == [
        "time_embedding",
        "conv_in",
        "down_blocks.0.resnets.0",
        "down_blocks.0.downsamplers.0",
        "down_blocks.1.resnets.0",
        "down_blocks.1.attentions.0",
        "mid_block.resnets.0",
        "mid_block.attentions.0",  # the mid attention sits between its two resnets
        "mid_block.resnets.1",
        "up_blocks.0.resnets.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.resnets.1",
        "up_blocks.0.attentions.1",
        "up_blocks.0.upsamplers.0",
        "up_blocks.1.resnets.0",
        "up_blocks.1.resnets.1",
        "conv_out",
    ]
    assert blocks[-1].modules == ["conv_norm_out", "conv_act", "conv_out"]
    assert blocks[0].kind == "time_embedding" and blocks[-1].kind == "conv_out"


def test_execution_order_conditional(cond_unet: UNet2DConditionModel) -> None:
    names = [b.name for b in partition_blocks(cond_unet)]
    assert names[:2] == ["time_embedding", "conv_in"] and names[-1] == "conv_out"
    mid = names.index("mid_block.resnets.0")
    assert names[mid : mid + 3] == ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    assert all(n.startswith("down_blocks") for n in names[2:mid])
    assert all(n.startswith("up_blocks") for n in names[mid + 3 : -1])
    i = names.index("up_blocks.1.resnets.0")
    assert names[i : i + 4] == [
        "up_blocks.1.resnets.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.resnets.1",
        "up_blocks.1.attentions.1",
    ]


def test_run_block_reproduces_capture_exactly(model: torch.nn.Module) -> None:
    run = forward_fn(model)
    for block in partition_blocks(model):
        io = capture_block_io(model, block, run)
        assert io.batch_size == 3
        with torch.no_grad():
            out = run_block(model, block, io)
        assert_close(out, io.output, atol=0, rtol=0, msg=f"block {block.name}")


def test_up_block_resnet_receives_concatenated_skip(unet: UNet2DModel) -> None:
    blocks = {b.name: b for b in partition_blocks(unet)}
    run = forward_fn(unet)
    mid_out = capture_block_io(unet, blocks["mid_block.resnets.1"], run).output  # [B, 16, 4, 4]
    skip = capture_block_io(unet, blocks["down_blocks.1.attentions.0"], run).output  # [B, 16, 4, 4] last skip
    io = capture_block_io(unet, blocks["up_blocks.0.resnets.0"], run)
    x, temb = io.args
    assert x.shape[1] == unet.up_blocks[0].resnets[0].conv1.in_channels == mid_out.shape[1] + skip.shape[1]
    assert_close(x, torch.cat([mid_out, skip], dim=1), atol=0, rtol=0)
    assert temb.shape == (3, unet.time_embedding.linear_2.out_features)


def test_cross_attention_block_captures_text_conditioning(cond_unet: UNet2DConditionModel) -> None:
    ehs = torch.randn(3, 5, 12)
    block = next(b for b in partition_blocks(cond_unet) if b.kind == "attention")
    io = capture_block_io(cond_unet, block, forward_fn(cond_unet, encoder_hidden_states=ehs))
    assert_close(io.kwargs["encoder_hidden_states"], ehs, atol=0, rtol=0)
    assert io.kwargs["return_dict"] is False and io.kwargs["attention_mask"] is None


def test_capture_stops_the_forward_early(unet: UNet2DModel) -> None:
    calls = []
    handles = [
        unet.get_submodule(name).register_forward_hook(lambda *a, name=name: calls.append(name))
        for name in ("down_blocks.0.downsamplers.0", "mid_block.resnets.0", "conv_out")
    ]
    try:
        block = next(b for b in partition_blocks(unet) if b.name == "down_blocks.0.resnets.0")
        calls.clear()  # partition_blocks ran a full forward
        capture_block_io(unet, block, forward_fn(unet))
        assert calls == []
        capture_block_io(unet, Block("x", ["mid_block.resnets.0"], "resnet"), forward_fn(unet))
        assert calls == ["down_blocks.0.downsamplers.0", "mid_block.resnets.0"]
    finally:
        for h in handles:
            h.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())  # capture cleans up


def test_capture_raises_when_block_does_not_run(unet: UNet2DModel) -> None:
    block = partition_blocks(unet)[1]
    with pytest.raises(RuntimeError, match="conv_in"):
        capture_block_io(unet, block, lambda: None)


@pytest.mark.parametrize(
    "make",
    [
        lambda: tiny_unet(attention_head_dim=4, num_class_embeds=3),
        lambda: tiny_cond_unet(num_class_embeds=3, time_embedding_act_fn="silu"),
        lambda: tiny_cond_unet(num_class_embeds=3, class_embeddings_concat=True),
    ],
    ids=["unet-class", "cond-class-act", "cond-class-concat"],
)
def test_time_block_with_class_embedding_matches_unet_temb(make) -> None:
    model = make()
    blocks = partition_blocks(model)
    time_block = blocks[0]
    assert "class_embedding" in time_block.modules
    run = forward_fn(model, class_labels=torch.tensor([0, 2, 1]))
    io = capture_block_io(model, time_block, run)
    assert sorted(io.calls) == sorted(m for m in time_block.modules if m != "time_embed_act")
    temb = capture_block_io(model, blocks[2], run).args[1]  # what the first resnet actually receives
    assert_close(io.output, temb, atol=0, rtol=0)
    with torch.no_grad():
        assert_close(run_block(model, time_block, io), io.output, atol=0, rtol=0)


def test_blockio_slice_and_cat(cond_unet: UNet2DConditionModel) -> None:
    block = next(b for b in partition_blocks(cond_unet) if b.kind == "attention")
    io_a = capture_block_io(cond_unet, block, forward_fn(cond_unet, batch=3, seed=1))
    io_b = capture_block_io(cond_unet, block, forward_fn(cond_unet, batch=2, seed=2))
    both = BlockIO.cat([io_a, io_b])
    assert both.batch_size == 5 and both.args[0].shape[0] == 5
    assert both.kwargs["encoder_hidden_states"].shape == (5, 5, 12)
    assert both.kwargs["return_dict"] is False  # non-tensor arguments pass through
    part = both.slice([4, 0])
    assert_close(part.args[0], torch.stack([io_b.args[0][1], io_a.args[0][0]]), atol=0, rtol=0)
    assert_close(part.output, both.output[[4, 0]], atol=0, rtol=0)
    with torch.no_grad():
        assert_close(run_block(cond_unet, block, part), part.output)  # a different batch: not bitwise
    bad = BlockIO({k: type(c)(c.args, {**c.kwargs, "return_dict": True}) for k, c in io_b.calls.items()}, io_b.output)
    with pytest.raises(ValueError, match="differs"):
        BlockIO.cat([io_a, bad])


def test_run_block_lets_gradients_flow(unet: UNet2DModel) -> None:
    block = next(b for b in partition_blocks(unet) if b.name == "conv_out")
    io = capture_block_io(unet, block, forward_fn(unet))
    unet.conv_out.weight.requires_grad_(True)
    try:
        run_block(unet, block, io).square().mean().backward()
        assert unet.conv_out.weight.grad is not None
    finally:
        unet.conv_out.weight.requires_grad_(False)
        unet.conv_out.weight.grad = None


def test_partition_rejects_non_unet() -> None:
    with pytest.raises(TypeError, match="UNet2DModel"):
        partition_blocks(torch.nn.Linear(2, 2))


def test_a_quantized_model_partitions_like_its_float_original() -> None:
    """The traced example input takes a timestep from the quantized model's own table (t=10 was refused)."""
    from dq.quant import QuantSpec, calibrate_activations, quantize_model
    from dq.quant.split import concat_splits

    model = tiny_unet()
    float_blocks, float_splits = partition_blocks(model), concat_splits(model)
    quantize_model(model, QuantSpec(), timesteps=torch.tensor([900, 500, 100]))
    with torch.no_grad(), calibrate_activations(model):
        model(torch.randn(1, 1, 8, 8), 500)
    assert [b.name for b in partition_blocks(model)] == [b.name for b in float_blocks]
    assert concat_splits(model) == float_splits
