"""The benchmark registry drives the runner, --quick and the report: nothing else names a benchmark."""

import inspect
import sys
from pathlib import Path

import pytest
import torch
import triton.testing

from tritonbits_harness import bench, records, report, timing
from tritonbits_harness.bench import runner
from tritonbits_harness.bench.registry import Benchmark

BENCH_DIR = Path(bench.__file__).parent


def test_load_all_imports_every_benchmark_module():
    on_disk = {p.stem for p in BENCH_DIR.glob("*.py")} - {"__init__"} - bench.NOT_BENCHMARKS
    assert set(bench.benchmark_modules()) == on_disk
    registry = bench.load_all()
    for name in on_disk:
        assert f"tritonbits_harness.bench.{name}" in sys.modules
    assert {"dequant_bias", "dequantize_4bit", "unsloth_puzzle", "mlp_compile"} <= set(registry)


def test_a_new_module_is_found_without_naming_it(tmp_path, monkeypatch):
    """A module dropped into the bench package registers itself through load_all, and only it."""
    (tmp_path / "zz_fake_quant.py").write_text(
        "from tritonbits_harness.bench.registry import Benchmark, register\n"
        "register(Benchmark(name='zz_fake_quant', kernel='k', description='d', cases=lambda cpu: [{}],\n"
        "                   bytes_model=None, setup=lambda c, d: {}, baselines=()))\n"
    )
    monkeypatch.setattr(bench, "__path__", [*bench.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "tritonbits_harness.bench.zz_fake_quant", raising=False)
    try:
        assert "zz_fake_quant" in bench.benchmark_modules()
        assert "zz_fake_quant" in bench.load_all()
    finally:
        bench.REGISTRY.pop("zz_fake_quant", None)
        sys.modules.pop("tritonbits_harness.bench.zz_fake_quant", None)


def _fake(name="zz_fake", **kw) -> Benchmark:
    def setup(case, device):
        x = torch.ones(case["n"])
        return {"tritonbits": lambda: x * 2, "eager": lambda: x + x}

    return Benchmark(name=name, kernel="fake", description="a fake elementwise op",
                     cases=lambda cpu: [{"n": n} for n in (8, 16, 32)], bytes_model=lambda c: 8 * c["n"],
                     setup=setup, baselines=("eager",), modes=("wall",), **kw)  # fmt: skip


def test_quick_keeps_only_what_the_registration_keeps():
    fake = _fake(quick=lambda c: c["n"] == 16)
    assert runner.select_cases(fake, cpu=False, quick=True) == [{"n": 16}]
    assert len(runner.select_cases(fake, cpu=False, quick=False)) == 3
    assert len(runner.select_cases(fake, cpu=True, quick=True)) == 3  # CPU cases are tiny already
    with pytest.raises(ValueError, match=r"'zz_fake'.*keeps none"):
        runner.select_cases(_fake(quick=lambda c: False), cpu=False, quick=True)


def test_dequant_bias_cases_and_quick_subset():
    from tritonbits_harness.bench import dequant_bias as db

    full = db.cases(False)
    assert len(full) == 9 * 12 * 3
    assert {c["n"] for c in full} >= {1000, 6144, 11008, 28672}
    assert {c["m"] for c in full} == {1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536}
    quick = runner.select_cases(bench.load_all()["dequant_bias"], cpu=False, quick=True)
    assert 0 < len(quick) < len(full) and all(c in full for c in quick)


def _run_fake(fake: Benchmark) -> list[dict]:
    with runner.progress_bar(runner.Console(quiet=True)) as progress:
        return runner.run_benchmark(fake, torch.device("cpu"), cpu=True, rep_ms=5, copy_gbps=None,
                                    progress=progress)  # fmt: skip


def test_rows_carry_p20_p50_p80():
    rows = _run_fake(_fake())
    assert len(rows) == 3 * 2
    for r in rows:
        assert r["p20"] <= r["p50"] <= r["p80"]
        assert r["ms"] == r["p50"]
        assert r["gbps"] == pytest.approx(timing.gbps(r["bytes"], r["p50"]))


def test_quantiles_of_interpolates_like_do_bench():
    assert timing.quantiles_of([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx({"p20": 1.8, "p50": 3.0, "p80": 4.2})
    with pytest.raises(ValueError, match="times_ms is empty"):
        timing.quantiles_of([])


def test_bench_asks_triton_for_the_three_quantiles(monkeypatch):
    assert "quantiles" in inspect.signature(triton.testing.do_bench).parameters
    assert "quantiles" in inspect.signature(triton.testing.do_bench_cudagraph).parameters
    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen["quantiles"] = quantiles
        return [1.0, 2.0, 3.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert timing.bench_quantiles(lambda: None) == {"p20": 1.0, "p50": 2.0, "p80": 3.0}
    assert seen["quantiles"] == [0.2, 0.5, 0.8]


def _record(tmp_path: Path, fake: Benchmark, rows: list[dict]) -> Path:
    rec_dir = tmp_path / "records"
    records.write(rec_dir, "bench", "fakegpu", {
        "meaningless": False, "copy_gbps": 1000.0, "rows": rows,
        "benchmarks": {fake.name: {"kernel": fake.kernel, "description": fake.description,
                                   "baselines": list(fake.baselines), "subject": fake.subject}},
    })  # fmt: skip
    return rec_dir


def test_a_registered_benchmark_renders_through_the_generic_section(tmp_path, monkeypatch):
    fake = _fake()
    monkeypatch.setitem(bench.REGISTRY, fake.name, fake)
    rows = _run_fake(fake)
    text = report.render(str(_record(tmp_path, fake, rows)), str(tmp_path / "out")).read_text()
    assert "### zz_fake — a fake elementwise op" in text
    assert "| case | tritonbits (ms) | eager (ms) | eager / tritonbits | tritonbits GB/s |" in text
    for n in (8, 16, 32):
        assert f"| n={n} |" in text
    assert "| zz_fake | 3 | wall | eager " in text  # the run list


def test_a_custom_section_replaces_the_generic_one(tmp_path, monkeypatch):
    fake = _fake(section=lambda inp: [f"### custom {inp.name} {len(inp.rows)} rows", ""])
    monkeypatch.setitem(bench.REGISTRY, fake.name, fake)
    text = report.render(str(_record(tmp_path, fake, _run_fake(fake))), str(tmp_path / "out")).read_text()
    assert "### custom zz_fake 6 rows" in text
    assert "### zz_fake — " not in text


def test_report_names_no_benchmark():
    source = Path(report.__file__).read_text()
    for name in bench.load_all():
        assert f'"{name}"' not in source, f"report.py names benchmark {name!r}"
