"""The benchmark code runs and reports what it claims (no timing is asserted: see hf_prope.benchmarks)."""

from __future__ import annotations

import json

import pytest

from hf_prope import benchmarks
from hf_prope.cli import main


def test_quick_benchmarks_report_every_variant_against_its_baseline(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--repeats", "1", "--only", "rotary,train,decode", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["variant"] for r in rows if r["benchmark"].startswith("rotary")] == ["p=1", "p=0.75", "p=0.5", "p=0.25"]
    train = {r["variant"]: r for r in rows if r["benchmark"].startswith("training")}
    assert set(train) == {"hf-prope p=0.25", "hf-prope p=0.25, general path", "native proportional p=0.25"}
    assert all(r["baseline"] == "RoPE (unpatched)" for r in train.values())
    assert {r["benchmark"] for r in rows} == {"rotary application (q and k)", "training step (fwd+bwd)",
                                               "decoding with KV cache"}
    for r in rows:
        assert r["value"] > 0 and r["baseline_value"] > 0
        assert r["ratio"] == pytest.approx(r["value"] / r["baseline_value"])
        assert r["variant"] in printed
    assert data["machine"]["torch"] and data["quick"] is True


def test_unknown_benchmark_is_refused_before_any_work(tmp_path) -> None:
    out = tmp_path / "sub" / "bench.json"
    with pytest.raises(ValueError, match="Unknown benchmark 'rotery'.*rotary"):
        benchmarks.run(["rotery"], out=str(out))
    assert not out.parent.exists()


def test_cuda_without_a_gpu_is_refused() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no GPU"):
        benchmarks.run(["rotary"], device="cuda")


def test_profile_prints_the_top_operators_of_each_variant(capsys) -> None:
    benchmarks.run(["rotary"], repeats=1, quick=True, profile=True)
    err = capsys.readouterr().err
    assert "--- profile: rotary p=0.25, native ---" in err and "--- profile: rotary p=0.25, hf-prope ---" in err
    assert "aten::mul" in err  # transformers' formula multiplies by cos and sin


def test_distill_benchmark_measures_time_and_peak_memory_against_lm() -> None:
    rows = benchmarks.run(["distill"], repeats=1, quick=True)
    time, memory = rows
    assert time.baseline == "lm (cross-entropy)" and time.value > 0 and time.baseline_value > 0
    assert memory.unit == "MiB" and memory.value > 0 and memory.baseline_value > 0
    assert memory.target == "<= 1.25x" and memory.met == (memory.value <= 1.25 * memory.baseline_value)
