"""cpu device specifics: compiled-model cache, precision hint, OpenVINO errors translated."""

from __future__ import annotations

import kvfuse
import pytest
import torch
from kvcases import assert_close_lse, dense_attention, make_problem
from kvfuse.devices.cpu.device import CpuDevice

pytest.importorskip("openvino")


@pytest.fixture
def cpu(monkeypatch: pytest.MonkeyPatch) -> CpuDevice:
    """The cpu device with its torch decode path off: these tests are the OpenVINO graph's."""
    from kvfuse.devices.cpu import decode

    monkeypatch.setattr(decode, "DECODE_MAX_ELEMENTS", 0)
    dev = kvfuse.registry().get("cpu")
    assert isinstance(dev, CpuDevice)
    return dev


def _call(dev: CpuDevice, p: object, **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    return kvfuse.fusion_attention(*p.args(), p.segments, device=dev.name, **kw)  # type: ignore[attr-defined]


def _assert_matches(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    """out and lse within 1e-5 of the float64 definition; -inf where it is."""
    assert (got[0].double() - ref[0]).abs().max() < 1e-5
    assert_close_lse(got[1], ref[1], atol=1e-5, rtol=0)


def test_one_compile_serves_every_length(cpu: CpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "models", type(cpu.models)(capacity=4))
    for n in (5, 37, 200):  # token counts are dynamic dims of one model
        p = make_problem([[(n, 0)]], [[n - 1, n + 3]], hq=8, hkv=2, seed=n)
        _call(cpu, p)
    assert cpu.models.compiles == 1 and len(cpu.models) == 1
    _call(cpu, p, softcap=5.0)  # another signature
    assert cpu.models.compiles == 2


def test_cache_is_bounded_lru(cpu: CpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "models", type(cpu.models)(capacity=2))
    p = make_problem([[(20, 0)]], [[15, 19]], hq=4, hkv=2, seed=1)
    for window in (1, 2, 3):  # every window size shares one signature
        _call(cpu, p, window_left=window)
    _call(cpu, p, softcap=1.0)
    _call(cpu, p, causal=False)
    assert len(cpu.models) == 2 and cpu.models.compiles == 3
    _call(cpu, p, window_left=2)  # evicted earlier: compiled again
    assert cpu.models.compiles == 4 and len(cpu.models) == 2


def test_fp32_runs_in_f32(cpu: CpuDevice) -> None:
    p = make_problem([[(300, 0), (77, 400)]], [[299, 476, 500]], hq=8, hkv=2, d=128, seed=4)
    # bf16 inference (the CPU plugin's default on AVX-512 BF16 parts) errs by ~1e-3 here
    rope = kvfuse.RopeConfig(max_position=1024)
    _assert_matches(_call(cpu, p, rope=rope), dense_attention(p, rope=rope))
    sig = next(iter(cpu.models._models))
    compiled = cpu.models.get(sig)
    assert str(compiled.get_property("INFERENCE_PRECISION_HINT")) in {"f32", "<Type: 'float32'>"}


def test_openvino_errors_become_device_errors(cpu: CpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real OpenVINO failure (an invalid compile option) surfaces as DeviceError from it."""
    monkeypatch.setattr(cpu, "models", type(cpu.models)(capacity=2))
    monkeypatch.setattr(type(cpu.models), "config", lambda self, sig: {"INFERENCE_PRECISION_HINT": "f99"})
    p = make_problem([[(4, 0)]], [[3]], seed=2)
    with pytest.raises(kvfuse.DeviceError, match="OpenVINO failed in fusion_attention") as info:
        _call(cpu, p)
    assert isinstance(info.value.__cause__, Exception) and "f99" in str(info.value.__cause__)


def test_long_prefill_is_split_into_query_blocks(cpu: CpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks bound the score tensor; results equal the unsplit call."""
    p = make_problem([[(300, 0), (77, 400)]], [[*range(299, 340), 476]], hq=8, hkv=2, d=64, seed=6)
    whole = _call(cpu, p)
    monkeypatch.setattr("kvfuse.devices.cpu.device.SCORE_BYTES", 4 * 8 * 377 * 5)  # 5 queries per block
    assert cpu._blocks(0, torch.zeros(42), torch.zeros(377), 8, True)[:2] == [(0, 5), (5, 10)]
    split = _call(cpu, p)
    torch.testing.assert_close(split[0], whole[0], atol=0, rtol=0)
    torch.testing.assert_close(split[1], whole[1], atol=0, rtol=0)


def test_gather_staging_is_reused_and_per_thread(cpu: CpuDevice) -> None:
    import threading

    rows = torch.randn(100, 2, 8)
    a = cpu._gather(0, rows, torch.tensor([5, 1, 7]))
    assert a.is_contiguous() and torch.equal(a, rows[[5, 1, 7]].transpose(0, 1))  # head-major
    ptr = a.data_ptr()
    b = cpu._gather(0, rows, torch.tensor([9, 9]))  # smaller: same memory, no new allocation
    assert b.data_ptr() == ptr and torch.equal(b, rows[[9, 9]].transpose(0, 1))
    other: list[int] = []
    t = threading.Thread(target=lambda: other.append(cpu._gather(0, rows, torch.tensor([1])).data_ptr()))
    t.start()
    t.join()
    assert other[0] != ptr  # another thread never shares the buffer


def test_keys_every_query_sees_go_unmasked(cpu: CpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per inference, keys visible to all its queries skip the mask (their own graph part);
    decode steps need no mask at all, rows that see nothing still get out 0 / lse -inf."""
    monkeypatch.setattr(cpu, "models", type(cpu.models)(capacity=8))
    cases = {  # name -> (segments, q positions, call kwargs, (masked, tail) expected)
        "decode": ([(40, 0), (9, 60)], [68], {}, (False, False)),
        "prefill": ([(40, 0), (9, 60)], [*range(60, 69)], {}, (False, True)),
        "window": ([(40, 0), (9, 60)], [66, 68], {"window_left": 20}, (False, True)),
        "row-sees-nothing": ([(40, 10)], [5, 30], {}, (True, False)),
    }
    for name, (segs, q_pos, kw, expect) in cases.items():
        p = make_problem([segs], [q_pos], hq=8, hkv=2, d=64, seed=len(name))
        before = set(cpu.models._models)
        _assert_matches(_call(cpu, p, **kw), dense_attention(p, **kw))
        (sig,) = set(cpu.models._models) - before  # each case compiles its own signature
        assert (sig.masked, sig.tail) == expect, name


def test_bf16_scores_stay_f32(cpu: CpuDevice) -> None:
    """Logits of real-model size (|s| ~ 30): a bf16-rounded score would be off by up to 0.06,
    moving the lse by that much; f32 scores keep the lse of exactly-bf16 inputs near exact."""
    p = make_problem([[(200, 0)]], [[199, 150, 20]], hq=8, hkv=2, d=128, dtype=torch.bfloat16, seed=9)
    p.q.mul_(8)  # bf16 * 8 is exact
    out, lse = _call(cpu, p)
    ref_out, ref_lse = dense_attention(p)
    assert lse.abs().max() > 20
    assert ((lse.double() - ref_lse).abs() / ref_lse.abs()).max() < 1e-5
    assert ((out.double() - ref_out).abs() <= 1.5e-2 + 1e-2 * ref_out.abs()).all()


def test_causal_blocks_leave_out_keys_no_query_sees(cpu: CpuDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full causal prefill in query blocks: each block gathers only the keys up to its last
    query (the upper triangle is skipped), and the result equals the definition."""
    p = make_problem([[(300, 0)]], [list(range(300))], hq=8, hkv=2, d=64, seed=11)
    monkeypatch.setattr("kvfuse.devices.cpu.device.SCORE_BYTES", 4 * 8 * 300 * 64)  # 64 queries per block
    gathered: list[int] = []
    real = cpu._gather
    monkeypatch.setattr(
        cpu, "_gather", lambda which, rows, slots: gathered.append(len(slots)) or real(which, rows, slots)
    )
    _assert_matches(_call(cpu, p), dense_attention(p))
    # per block: k and v of the keys every query sees, then of the diagonal block's keys
    assert gathered[::2] == [1, 63, 65, 63, 129, 63, 193, 63, 257, 43]


@pytest.mark.parametrize("causal, window, softcap", [(True, -1, 0.0), (False, 5, 0.0), (True, 30, 8.0)])
def test_decode_path_matches_the_graph_and_compiles_nothing(
    monkeypatch: pytest.MonkeyPatch, causal: bool, window: int, softcap: float
) -> None:
    """Few queries over few key elements run in torch (no OpenVINO compile) and agree with
    the OpenVINO graph to fp32 rounding; above the crossover the graph runs."""
    from kvfuse.devices.cpu import decode

    dev = kvfuse.registry().get("cpu")
    assert isinstance(dev, CpuDevice)
    monkeypatch.setattr(dev, "models", type(dev.models)(capacity=4))
    rope = kvfuse.RopeConfig(max_position=512)
    p = make_problem([[(300, 0), (9, 300)], [(17, 40)]], [[308, 309], [56]], hq=9, hkv=3, seed=4)
    kw = {"causal": causal, "window_left": window, "softcap": softcap, "rope": rope}
    fast = _call(dev, p, **kw)
    assert dev.models.compiles == 0
    monkeypatch.setattr(decode, "DECODE_MAX_ELEMENTS", 0)
    graph = _call(dev, p, **kw)
    assert dev.models.compiles >= 1  # the graph (one or two key parts)
    assert torch.allclose(fast[0], graph[0], atol=2e-6) and torch.equal(fast[1].isinf(), graph[1].isinf())
    assert torch.allclose(fast[1][~fast[1].isinf()], graph[1][~graph[1].isinf()], atol=2e-6)
