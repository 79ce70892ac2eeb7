"""Benchmarks are a product: every ``benchmarks/bench_*.py`` imports without running anything (no GPU, no sys.path
edits), answers ``--help`` on CPU, and writes the one results table's columns."""
from __future__ import annotations

import argparse
import csv
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHES = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def test_every_subject_has_a_bench():
    assert {"bench_attention", "bench_routed_gemm", "bench_layer", "bench_parallel_step", "bench_two_stage",
            "bench_decode", "bench_generate"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_bench_answers_help_on_cpu(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "probes").glob("*.py")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_sys_path_edits(path):
    assert "sys.path" not in path.read_text()


@pytest.mark.parametrize("path", sorted((ROOT / "probes").glob("*.py")), ids=lambda p: p.name)
def test_a_probe_states_its_question_and_finding(path):
    first = path.read_text().split("\n", 1)[0]
    assert first.startswith('"""Question:') and "Finding" in first, first


def test_rows_append_to_one_table_with_the_environment(tmp_path):
    from benchmarks.common import FIELDS, row, write_rows

    out = tmp_path / "results.csv"
    write_rows([row("attention", "512² ctx 64", "TFLOP/s", 437.0, "cudnn", 414.0)], out)
    write_rows([row("MoT layer exact", "gen step", "ms", 3.53)], out)
    rows = list(csv.DictReader(out.open()))
    assert tuple(rows[0]) == FIELDS and len(rows) == 2
    assert rows[0]["ratio"] == str(round(437.0 / 414.0, 4)) and rows[1]["peer"] == rows[1]["ratio"] == ""
    assert all(r["torch"] and r["triton"] and r["commit"] and r["date"] for r in rows)


def test_ratio_is_the_speedup_of_ours_for_time_and_throughput_metrics():
    """``ratio`` > 1 means ours is faster, whatever the metric's direction: a time-like row computed the old way
    (ours / peer, 0.5 for twice as fast) fails here."""
    from benchmarks.common import higher_is_better, row

    for metric in ("ms", "s", "ms/token", "s/image", "s/request", "s/step", "s to KV forwarded"):
        assert not higher_is_better(metric), metric
        assert row("layer", "x", metric, 2.0, "peer", 4.0)["ratio"] == 2.0, metric  # ours takes half the time
    for metric in ("TFLOP/s", "GB/s", "tokens/s"):
        assert higher_is_better(metric), metric
        assert row("gemm", "x", metric, 600.0, "peer", 300.0)["ratio"] == 2.0, metric
    with pytest.raises(ValueError):
        row("step", "x", "peak GiB", 1.0, "peer", 2.0)  # no direction: no ratio whose meaning is a guess
    # the table's history: a time-like row that is faster than its peer carries a ratio > 1
    with open(ROOT / "benchmarks" / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["ratio"]]
    layer = [r for r in rows if r["subject"] == "MoT layer exact"]
    assert layer and all(float(r["ratio"]) > 1 for r in layer)  # the layer beats mask/scatter + cuDNN (RESULTS.md)


def test_emit_keeps_the_rows_measured_before_a_run_dies(tmp_path):
    """A benchmark's rows reach the table one by one: a run killed by a time limit keeps what it measured."""
    import argparse

    from benchmarks.common import emit, row

    out = tmp_path / "results.csv"

    def measure():
        yield row("attention", "a", "TFLOP/s", 1.0)
        yield row("attention", "b", "TFLOP/s", 2.0)
        raise TimeoutError("the device's time limit")

    with pytest.raises(TimeoutError):
        emit(measure(), argparse.Namespace(csv=str(out), no_csv=False))
    assert [r["shape"] for r in csv.DictReader(out.open())] == ["a", "b"]


def test_kernel_breakdown_separates_hidden_from_exposed_communication():
    from benchmarks.common import summarize_spans

    # one call: GEMM 0-4 ms, attention 5-6, an all-to-all 3-5 (1 ms under the GEMM, 1 ms alone), idle 6-10
    spans = {"GEMM": [(0.0, 4.0)], "attention": [(5.0, 6.0)], "communication": [(3.0, 5.0)]}
    got = summarize_spans(spans, wall_ms=10.0, iters=1)
    assert got == {"GEMM": 4.0, "attention": 1.0, "communication": 2.0, "busy": 6.0, "wall": 10.0,
                   "exposed_comm": 1.0, "idle": 4.0}
    # two calls of the same: per call
    two = {k: v + [(a + 10, b + 10) for a, b in v] for k, v in spans.items()}
    assert summarize_spans(two, wall_ms=20.0, iters=2) == got


def test_the_results_table_has_the_schema():
    from benchmarks.common import FIELDS, RESULTS_CSV

    with open(RESULTS_CSV) as f:
        rows = list(csv.DictReader(f))
    assert rows and tuple(rows[0]) == FIELDS
    assert all(r["device"] and r["subject"] and r["metric"] and float(r["value"]) >= 0 for r in rows)


def test_bench_generate_times_fp8_against_bf16_in_the_same_run(tmp_path):
    """``--quantization none fp8``: each mode's seconds per request, the first mode the peer of the second (issue #30:
    fp8 rows with their peer in the same run), on CPU with the tiny preset."""
    from benchmarks import bench_generate

    out = tmp_path / "rows.csv"
    bench_generate.main(["--steps", "2", "--repeats", "1", "--quantization", "none", "fp8", "--csv", str(out)])
    rows = list(csv.DictReader(out.open()))
    per_request = {r["subject"]: r for r in rows if r["metric"] == "s/request"}
    assert set(per_request) == {"generate end to end (same image every run)",
                                "generate end to end, fp8 (same image every run)"}
    fp8 = per_request["generate end to end, fp8 (same image every run)"]
    assert fp8["peer"] == "generate end to end" and float(fp8["ratio"]) > 0


def test_bench_generate_refuses_a_mode_named_twice():
    from benchmarks import bench_generate

    with pytest.raises(SystemExit, match="twice"):
        bench_generate.main(["--quantization", "fp8", "fp8", "--no-csv"])


def test_bench_routed_gemm_fp8_sweep_is_refused_with_where_to_go(monkeypatch):
    from benchmarks import bench_routed_gemm

    monkeypatch.setattr(bench_routed_gemm, "require_cuda", lambda what: None)
    with pytest.raises(SystemExit, match="bench_fp8_gemm --sweep"):
        bench_routed_gemm.main(["--sweep", "--quantization", "fp8", "--no-csv"])


def test_bench_routed_gemm_fp8_gives_the_fp8_rows_every_option_they_read(monkeypatch):
    """``--quantization fp8`` runs bench_fp8_gemm's rows with that benchmark's own defaults (a hand-made namespace
    had lacked ``quick``, so the option died with an AttributeError on the GPU)."""
    from benchmarks import bench_fp8_gemm, bench_routed_gemm

    seen = []
    monkeypatch.setattr(bench_fp8_gemm, "run_rows", lambda args, label, routing: iter(seen.append(args) or ()))
    assert list(bench_routed_gemm.run_fp8(argparse.Namespace())) == [] and seen
    defaults = vars(bench_fp8_gemm.build_parser().parse_args([]))
    assert all(vars(args) == defaults for args in seen)


def test_bench_routed_gemm_names_an_unknown_schedule_variant_or_row_set_before_any_work():
    from benchmarks import bench_routed_gemm

    with pytest.raises(SystemExit, match=r"unknown --variants \['two partitions'\].*two consumer partitions"):
        bench_routed_gemm.main(["--sweep", "--variants", "two partitions", "--no-csv"])
    with pytest.raises(SystemExit, match=r"unknown row sets \['1024'\].*t2i 1024² step"):
        bench_routed_gemm.main(["--sweep", "--sets", "1024", "--no-csv"])
