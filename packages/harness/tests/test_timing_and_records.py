import json

import pytest
import torch

from tritonbits_harness import records, timing


def test_gbps():
    assert timing.gbps(2e9, 1.0) == pytest.approx(2000.0)


def test_record_round_trip(tmp_path):
    path = records.write(tmp_path, "tests", "cpu-fp16", {"counts": {"passed": 3}})
    rec = json.loads(path.read_text())
    assert rec["kind"] == "tests" and rec["counts"] == {"passed": 3}
    assert rec["environment"]["torch"] == torch.__version__
    assert records.load(tmp_path)[0]["name"] == "cpu-fp16"


@pytest.mark.gpu
def test_copy_bandwidth_is_plausible(device):
    gbps = timing.copy_gbps(1 << 28, device)
    assert 100 < gbps < 20_000


@pytest.mark.gpu
def test_bench_and_graph_time_real_work(device):
    x = torch.randn(1 << 24, device=device)
    y = torch.empty_like(x)
    ms = timing.bench(lambda: y.copy_(x))
    graph_ms = timing.bench_graph(lambda: y.copy_(x))
    assert graph_ms > 0 and ms > 0
    assert torch.equal(y, x)


def test_report_renders_the_committed_records(tmp_path):
    """The report is rendered from the records alone: tables, run list and plots for every GPU device."""
    from pathlib import Path

    from tritonbits_harness import report

    record_dir = Path(__file__).resolve().parents[3] / "docs" / "gpu-runs"
    if not any(record_dir.glob("*-bench-*.json")):
        pytest.fail(f"no benchmark records in {record_dir}")
    path = report.render(str(record_dir), str(tmp_path))
    text = path.read_text()
    for heading in ("### dequantize_4bit", "### dequant_bias", "### All benchmark runs", "### GPU test sessions"):
        assert heading in text
    assert list((tmp_path / "plots").glob("dequantize_4bit-*.png"))
    assert list((tmp_path / "plots").glob("dequant_bias-*.png"))


def test_test_record_counts_each_way_a_test_can_end(monkeypatch):
    """The tests record counts a call's outcome, setup / teardown errors, and a test whose xdist worker crashed
    (reported with when="???", as the tests-h100 records of 20261124T140410Z lost one), listing the failed ones."""
    from types import SimpleNamespace

    from tritonbits_harness import pytest_plugin

    monkeypatch.setattr(pytest_plugin, "_RECORD", {"counts": {}, "failures": []})
    reports = [("a", "setup", "passed"), ("a", "call", "passed"), ("a", "teardown", "passed"),
               ("b", "setup", "passed"), ("b", "call", "failed"), ("b", "teardown", "passed"),
               ("c", "setup", "skipped"),
               ("d", "setup", "failed"),
               ("e", "setup", "passed"), ("e", "call", "passed"), ("e", "teardown", "failed"),
               ("f", "???", "failed")]  # fmt: skip
    for nodeid, when, outcome in reports:
        pytest_plugin.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, when=when, outcome=outcome))
    assert pytest_plugin._RECORD["counts"] == {"passed": 2, "failed": 2, "skipped": 1, "error": 2}
    assert pytest_plugin._RECORD["failures"] == ["b", "d", "e", "f"]
