"""Weight-only int8/int4: round trips, quantized linears, tiny models at TP 1 and 2, clear errors.

Quantized layers compute in bfloat16 on CPU, which rounds activations and outputs to 8
significant bits (2^-8 relative at most, each time). Tolerances below are built from that and
from each scheme's half-a-step bound; none is fitted to the numbers these tests happen to see.
"""

from __future__ import annotations

import dataclasses
import datetime
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pdserve.engine.attention import PrefillMetadata
from pdserve.engine.config import ModelConfig, ModelLoadError
from pdserve.engine.layers import Linear, RowParallelLinear
from pdserve.engine.loader import load_model
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup, make_process_group
from pdserve.engine.quant_linear import Int4Weight, Int8Weight, QuantizedWeight
from pdserve.engine.quantization import (
    QuantSpec,
    cpu_int4_kernel_block_rows,
    dequantize_int4_t,
    dequantize_int8,
    int4_group,
    pack_int4,
    quantize_int4,
    quantize_int8,
)
from pdserve.engine.tiny_model import TINY_ARCHS

BF16 = 2.0**-8  # largest relative rounding of one bf16 conversion
PROMPTS = (8, 100)  # tokens: the fused CPU kernels, then dequantize + one bf16 GEMM
# A random tiny model turns a relative error in its linears into a ~6-8x larger one in its
# logits (int8's ~0.5% rms weight error gives 3-4%). bf16 compute (a few 2^-9 roundings) thus
# moves logits by up to ~2%; 4% leaves room, while any wrong code, scale or shard moves them
# by at least int4's own error (~30%) and usually scrambles them (~140%).
SAME_MATH = 0.04
# Logits against the float model: ~8x the rms weight error (int8 ~0.5%, int4 in groups of 32
# ~6%), with room; an unrelated model would sit near 1.4.
FLOAT_BOUND = {"int8": 0.1, "int4": 0.7}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_int8_round_trip_is_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(0)
    # rows five decades apart, and an all-zero row
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 2, 64)[:, None]
    w[5] = 0
    q, scale = quantize_int8(w, torch.bfloat16)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, scale) - w).abs()
    step = scale.float()[:, None]
    assert (err <= step / 2 * (1 + 1e-6)).all()
    # and the step follows each row: its absmax / 127, up to bf16's rounding of the scale
    assert (step[:, 0] <= w.abs().amax(1) / 127 * (1 + BF16) + 1e-30).all()
    assert not err[5].any()


def test_int4_round_trip_is_within_half_a_step_of_each_group() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)
    w[:, :32] = w[:, :32].abs() * 0.1 + 3  # a group far from zero, all on one side
    q, scale_zero = quantize_int4(w, 32, torch.bfloat16)
    assert int(q.max()) <= 15 and scale_zero.shape == (4, 48, 2)
    deq = dequantize_int4_t(pack_int4(q, 48), scale_zero, 48).t()
    scale = scale_zero[..., 0].float().t().repeat_interleave(32, dim=1)
    zero = scale_zero[..., 1].float().t().repeat_interleave(32, dim=1)
    err = (deq - w).abs()
    assert (err <= scale / 2 + BF16 * (zero.abs() + 8 * scale) + 1e-6).all()
    # asymmetric: the one-sided group gets a step of its own range / 15, about 0.02 here,
    # where +-absmax over 15 levels would step by 0.45
    assert float(err[:, :32].max()) < 0.02


def test_packed_layouts_hold_the_same_codes() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(128, 64, generator=g)
    q, scale_zero = quantize_int4(w, 32, torch.bfloat16)
    one_block = dequantize_int4_t(pack_int4(q, 128), scale_zero, 128)
    for rows in (64, 32, 2):
        torch.testing.assert_close(
            dequantize_int4_t(pack_int4(q, rows), scale_zero, 128), one_block, rtol=0, atol=0
        )
    rows = cpu_int4_kernel_block_rows()  # torch's own layout, where ours matches it
    if rows is not None:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        assert torch.equal(pack_int4(q, rows).flatten(), theirs.flatten())


def _half_step(weight: QuantizedWeight) -> torch.Tensor:
    """The a-priori bound on |W - W_hat| per weight [out, in] from the round-trip tests."""
    if isinstance(weight, Int8Weight):
        return weight.scale.float()[:, None].expand(-1, weight.in_features) / 2
    assert isinstance(weight, Int4Weight)
    sz = weight.scale_zero.float()
    scale = sz[..., 0].t().repeat_interleave(weight.group, dim=1)
    zero = sz[..., 1].t().repeat_interleave(weight.group, dim=1)
    return scale / 2 + BF16 * (zero.abs() + 8 * scale)


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32), QuantSpec("int4", 64)])
@pytest.mark.parametrize("tokens", [3, 200])
@pytest.mark.parametrize(
    ("out_f", "in_f"),
    [(128, 192), (48, 176), (64, 88)],  # the kernels' shapes; int4 group falls back; K % 16 != 0
)
def test_quantized_linear_matches_float_reference(
    spec: QuantSpec, tokens: int, out_f: int, in_f: int
) -> None:
    g = torch.Generator().manual_seed(tokens + in_f)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    b, x = torch.randn(out_f, generator=g), torch.randn(tokens, in_f, generator=g)
    layer = Linear(in_f, out_f, True, torch.float32, spec)
    assert layer.weight is None and layer.bias is not None and layer.qweight is not None
    layer.bias.copy_(b)
    layer.load_quantized(w)
    y, w_hat = layer(x), layer.qweight.dequantize()
    # bf16 compute: x, the weights (int4's dequantized copy), the product and int8's scaling
    # are each rounded once at most: 4 roundings of 2^-8 against sum |x| |w_hat|.
    bf16_tol = 4.1 * BF16 * (x.abs() @ w_hat.abs().t())
    assert ((y - F.linear(x, w_hat, b)).abs() <= bf16_tol + 1e-6).all()
    # against the float layer: each weight within its half step, plus the bf16 compute
    quant_tol = x.abs() @ _half_step(layer.qweight).t()
    assert ((y - F.linear(x, w, b)).abs() <= quant_tol + bf16_tol + 1e-6).all()
    if (out_f, in_f) == (128, 192) and cpu_int4_kernel_block_rows() is not None:
        assert getattr(layer.qweight, "fused", False)  # so the 3-token case ran the kernel


def _rounded_float_twin(quant: CausalLM, config: ModelConfig) -> CausalLM:
    """The float model with every quantized linear's weight set to what `quant` multiplies by."""
    twin = load_model(config, TPGroup.single())
    for name, module in quant.named_modules():
        if isinstance(module, Linear | RowParallelLinear) and module.qweight is not None:
            twin.get_submodule(name).weight.copy_(module.qweight.dequantize())
    return twin


def _logits(model: CausalLM, n: int) -> torch.Tensor:
    ids = torch.randint(6, 768, (n,), generator=torch.Generator().manual_seed(n))
    return model.compute_logits(model(ids, torch.arange(n), PrefillMetadata([n])))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_quantized_model_is_the_float_model_with_rounded_weights(
    arch: str, scheme: str, tiny_models: dict[str, Path]
) -> None:
    config = ModelConfig.from_pretrained(str(tiny_models[arch]))
    quant = load_model(dataclasses.replace(config, quantization=scheme), TPGroup.single())
    twin, ref = _rounded_float_twin(quant, config), load_model(config, TPGroup.single())
    for n in PROMPTS:
        logits = _logits(quant, n)
        assert _rel(logits, _logits(twin, n)) < SAME_MATH
        assert _rel(logits, _logits(ref, n)) < FLOAT_BOUND[scheme]


def _tp1_slice(name: str, w: torch.Tensor, rank: int, config: ModelConfig) -> torch.Tensor:
    """Rank `rank`'s part (of 2) of a TP 1 linear weight: its heads, MLP rows or columns."""
    if name.endswith("qkv_proj"):
        q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        q, k, v = w.split([q_rows, kv_rows, kv_rows])
        return torch.cat([part.chunk(2)[rank] for part in (q, k, v)])
    if name.endswith("gate_up_proj"):
        return torch.cat([part.chunk(2)[rank] for part in w.chunk(2)])
    return w.chunk(2, dim=1)[rank]  # o_proj, down_proj: input columns


def _tp2(config: ModelConfig) -> list[tuple[dict[str, torch.Tensor], list[torch.Tensor]]]:
    """Both ranks of a TP 2 group in two threads: (dequantized linears, logits per prompt)."""
    timeout = datetime.timedelta(seconds=60)
    master = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout, wait_for_workers=False)

    def rank_main(rank: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        store = master if rank == 0 else dist.TCPStore("127.0.0.1", master.port, 2, False)
        pg = make_process_group("gloo", store, rank, 2, timeout_s=60)
        model = load_model(config, TPGroup(rank, 2, pg))
        weights = {
            name: m.dequantize()
            for name, m in model.named_modules()
            if isinstance(m, QuantizedWeight)
        }
        return weights, [_logits(model, n) for n in PROMPTS]

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(rank_main, range(2)))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tp2_ranks_hold_tp1s_codes_and_give_its_logits(
    arch: str, scheme: str, tiny_models: dict[str, Path]
) -> None:
    config = dataclasses.replace(
        ModelConfig.from_pretrained(str(tiny_models[arch])), quantization=scheme
    )
    tp1 = load_model(config, TPGroup.single())
    ranks = _tp2(config)
    for rank, (weights, _) in enumerate(ranks):
        assert len(weights) == 4 * config.num_layers
        for name, w in weights.items():
            owner = name.removesuffix(".qweight")
            qweight = tp1.get_submodule(owner).qweight
            assert qweight is not None
            expected = _tp1_slice(owner, qweight.dequantize(), rank, config)
            assert torch.equal(w, expected), f"rank {rank} {owner} quantized differently"
    (_, logits0), (_, logits1) = ranks
    for n, a, b in zip(PROMPTS, logits0, logits1, strict=True):
        assert torch.equal(a, b)
        assert _rel(a, _logits(tp1, n)) < SAME_MATH  # only the bf16 partial sums differ


def test_unknown_scheme_and_bad_group_sizes_error_clearly(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="not one of none, int8, int4"):
        QuantSpec.parse("int3")
    with pytest.raises(ModelLoadError, match="below 16"):
        QuantSpec.parse("int4-g8")
    assert QuantSpec.parse("none") is None and QuantSpec.parse("int4") == QuantSpec("int4", 32)
    config = ModelConfig.from_pretrained(str(tiny_models["llama"]))
    with pytest.raises(ModelLoadError, match="fp4"):
        load_model(dataclasses.replace(config, quantization="fp4"), TPGroup.single())
    # groups tile the rank's columns: a width the group does not divide takes the largest
    # divisor below it (176 columns and their TP 2 half, 88, both use 22)...
    assert [int4_group(k, 32, "x") for k in (576, 176, 88, 32)] == [32, 22, 22, 32]
    # ...and with none of 16 or more, the layer is refused, naming itself and the ways out
    with pytest.raises(ModelLoadError, match=r"down_proj has 67 input columns.*int8"):
        Linear(67, 64, False, torch.float32, QuantSpec("int4", 32), "down_proj")
