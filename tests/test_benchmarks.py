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
    for shape in ("SmolLM2-135M", "Llama-3-8B"):
        rotary = [r for r in rows if r["benchmark"] == f"rotary forward, {shape}"]
        assert [r["variant"] for r in rotary] == ["p=1", "p=0.75", "p=0.5", "p=0.25"]
        assert all(r["baseline"] == "transformers" for r in rotary)
    for shape in ("SmolLM2-shaped", "Llama-3-8B-shaped"):
        train = {r["variant"]: r for r in rows if r["benchmark"] == f"training step, {shape}"}
        assert set(train) == {"hf-prope p=0.25", "hf-prope p=0.25, general path", "native proportional p=0.25"}
        assert all(r["baseline"] == "RoPE (unpatched)" for r in train.values())
        assert train["hf-prope p=0.25"]["target"] == ">= 0.99x"  # a CPU's; a GPU's is 1.03x
    # Without a GPU (or triton's interpreter) there is no kernel to time, no backward, no CUDA memory.
    assert {r["benchmark"] for r in rows} == {
        "rotary forward, SmolLM2-135M",
        "rotary forward, Llama-3-8B",
        "training step, SmolLM2-shaped",
        "training step, Llama-3-8B-shaped",
        "decoding with KV cache",
    }
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
    assert "--- profile: rotary SmolLM2-135M p=0.25, transformers ---" in err
    assert "--- profile: rotary SmolLM2-135M p=0.25, hf-prope ---" in err
    assert "aten::mul" in err  # transformers' formula multiplies by cos and sin


def test_distill_benchmark_measures_time_and_peak_memory_against_lm() -> None:
    rows = benchmarks.run(["distill"], repeats=1, quick=True)
    time, memory, transfer_time, transfer_memory = rows
    for t in (time, transfer_time):
        assert t.baseline == "lm (cross-entropy)" and t.value > 0 and t.baseline_value > 0
    assert transfer_time.variant.startswith("transfer") and transfer_time.baseline_value == time.baseline_value
    assert memory.unit == "MiB" and memory.value > 0 and memory.baseline_value > 0
    assert memory.target == "<= 1.25x" and memory.met == (memory.value <= 1.25 * memory.baseline_value)
    assert transfer_memory.target == "<= 1.0x" and transfer_memory.met == (
        transfer_memory.value <= transfer_memory.baseline_value
    )


def test_rotary_benchmark_sets_the_kernel_against_liger_and_transformers_under_the_interpreter(tmp_path) -> None:
    """Where the kernel runs (here: triton's interpreter on the CPU), it is timed against Liger-Kernel's
    fused RoPE and forward + backward too, with the GPU targets; each variant's output is checked
    against transformers' formula before timing (the run fails otherwise)."""
    pytest.importorskip("triton")
    pytest.importorskip("liger_kernel")
    import os
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "hf_prope", "bench", "--quick", "--repeats", "1", "--only", "rotary", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for shape in ("SmolLM2-135M", "Llama-3-8B"):
        for mode in ("forward", "forward+backward"):
            kernel = {
                r["variant"]: r
                for r in rows
                if r["benchmark"] == f"rotary {mode}, {shape}" and r["baseline"] == "Liger-Kernel"
            }
            assert list(kernel) == ["p=1, kernel", "p=0.75, kernel", "p=0.5, kernel", "p=0.25, kernel"]
            assert kernel["p=1, kernel"]["target"] == "<= 1.05x" and kernel["p=0.25, kernel"]["target"] == "<= 0.4x"
            ours = [r for r in rows if r["benchmark"] == f"rotary {mode}, {shape}" and r["baseline"] == "transformers"]
            assert [r["variant"] for r in ours] == ["p=1", "p=0.75", "p=0.5", "p=0.25"]
            for r in kernel.values():
                assert set(r["extra"]["times_ms"]) == {"transformers", "hf-prope", "hf-prope kernel", "Liger-Kernel"}
                assert r["value"] == pytest.approx(r["extra"]["times_ms"]["hf-prope kernel"])


def test_long_window_benchmark_compares_chunked_scoring_with_the_whole_logits() -> None:
    memory, seconds = benchmarks.run(["long_window"], repeats=1, quick=True)
    assert memory.baseline == "transformers' loss (whole logits)" and memory.unit == "MiB"
    assert memory.value > 0 and memory.baseline_value > 0 and seconds.value > 0 and seconds.baseline_value > 0
    assert seconds.unit == "s" and "1 x 1024" in memory.note
