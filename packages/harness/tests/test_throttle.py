"""The clock-slowdown watch: nvidia-smi's counters parsed, a throttled run flagged in records and the report,
and a tuner sweep the GPU throttled through leaves the table as it was."""

import dataclasses
import json

import pytest
from rich.console import Console

from tritonbits import configs
from tritonbits_harness import report, throttle, tune

SMI = """
==============NVSMI LOG==============
GPU 00000000:00:06.0
    Performance State                                  : P0
    Clocks Event Reasons
        Idle                                           : Active
        SW Thermal Slowdown                            : Not Active
    Clocks Event Reasons Counters
        SW Power Capping                               : 85364835 us
        Sync Boost                                     : 0 us
        SW Thermal Slowdown                            : 105411838 us
        HW Thermal Slowdown                            : 2759275 us
        HW Power Braking                               : 0 us
    Sparse Operation Mode                              : Disabled
"""


def test_parse_counters_reads_the_counters_section_only():
    got = throttle.parse_counters(SMI)
    assert got == {"sw_power_capping": 85.364835, "sync_boost": 0.0, "sw_thermal_slowdown": 105.411838,
                   "hw_thermal_slowdown": 2.759275, "hw_power_braking": 0.0}  # fmt: skip
    # NVML's older "Throttle" naming of the same section is read too
    assert throttle.parse_counters(SMI.replace("Event", "Throttle")) == got
    assert throttle.parse_counters("no counters here\n  SW Power Capping : 5 us\n") == {}


def test_parse_counters_skips_na_and_stops_at_the_section_end():
    na = SMI.replace("Sync Boost                                     : 0 us", "Sync Boost : N/A")
    assert "Sync Boost : N/A" in na
    got = throttle.parse_counters(na)
    assert got["sw_thermal_slowdown"] == 105.411838 and got["hw_power_braking"] == 0.0 and "sync_boost" not in got
    # two GPUs, the first with every counter N/A: nothing of the second GPU's section is read as the first's
    first = "\n".join(line.replace(line.split(":")[-1], " N/A") if line.strip().endswith(" us") else line
                      for line in SMI.splitlines())  # fmt: skip
    assert throttle.parse_counters(first + SMI) == {}


def test_slowdown_is_the_increase_of_slowing_reasons():
    before = throttle.parse_counters(SMI)
    after = {**before, "sw_thermal_slowdown": before["sw_thermal_slowdown"] + 37.8, "sync_boost": 9.0}
    assert throttle.slowdown(before, after) == {"sw_thermal_slowdown": 37.8}
    assert throttle.slowdown(before, before) == {}
    assert throttle.slowdown(None, before) is None


def _counters(monkeypatch, readings):
    it = iter(readings)
    monkeypatch.setattr(throttle, "counters", lambda index=0: next(it))


def test_watch_flags_thermal_slowdown_not_power_capping(monkeypatch):
    base = throttle.parse_counters(SMI)
    _counters(monkeypatch, [base, {**base, "sw_power_capping": base["sw_power_capping"] + 3}])
    with throttle.Watch() as w:
        pass
    assert w.slowdown == {"sw_power_capping": 3.0} and w.thermal_s == 0 and w.warning() is None
    assert not throttle.is_throttled({"throttle": w.record()})
    _counters(monkeypatch, [base, {**base, "hw_thermal_slowdown": base["hw_thermal_slowdown"] + 2}])
    with throttle.Watch() as w:
        pass
    assert w.thermal_s == 2.0 and "2.0 s" in w.warning()
    assert throttle.is_throttled({"throttle": w.record()})
    _counters(monkeypatch, [None, None])  # no nvidia-smi: unknown, not flagged
    with throttle.Watch() as w:
        pass
    assert w.slowdown is None and w.warning() is None and not throttle.is_throttled({"throttle": w.record()})


def test_combine_sums_shards_and_report_flags_a_throttled_record():
    a = {"seconds": 100.0, "slowdown_s": {"sw_thermal_slowdown": 4.0}}
    b = {"seconds": 50.0, "slowdown_s": {"sw_thermal_slowdown": 1.5, "sw_power_capping": 2.0}}
    assert throttle.combine([a, b]) == {
        "seconds": 150.0,
        "slowdown_s": {"sw_thermal_slowdown": 5.5, "sw_power_capping": 2.0},
    }
    assert throttle.combine([a, None]) == {"seconds": 100.0, "slowdown_s": {"sw_thermal_slowdown": 4.0},
                                           "partial": True}  # an older record without the entry  # fmt: skip
    assert throttle.is_throttled({"throttle": throttle.combine([a, None])})
    assert throttle.combine([None, None]) is None
    env = {"device": "NVIDIA H100", "capability": [9, 0], "driver": "1", "torch": "2", "triton": "3",
           "bitsandbytes": None, "git_sha": "abc", "date": "2026-11-24T04:00:00Z"}  # fmt: skip
    assert "throttled" not in report.env_line({"environment": env, "throttle": {"seconds": 1.0, "slowdown_s": {}}})
    assert "throttled" not in report.env_line({"environment": env})  # records before the watch
    line = report.env_line({"environment": env, "throttle": a})
    assert "**the GPU throttled**: 4.0 s of thermal slowdown in the run's 100 s" in line and "{" not in line


def _fake_ms(case, config, rep_ms):
    return 1.0 if config[0] == "1d" else 2.0


OLD_TABLE = {"h100": {"bf16/1x4096": ["2d", 2, 512, 8]}}
BASE = throttle.parse_counters(SMI)
HOT = {**BASE, "sw_thermal_slowdown": BASE["sw_thermal_slowdown"] + 30}


@pytest.fixture
def sweep(tmp_path):
    """(the op with fake timings, a table file holding OLD_TABLE); tritonbits' table cache cleared around it."""
    path = tmp_path / "dequant_bias.json"
    path.write_text(json.dumps(OLD_TABLE))
    configs.table.cache_clear()
    yield dataclasses.replace(tune.TUNABLE["dequant_bias"], time=_fake_ms), path
    configs.table.cache_clear()


def test_a_throttled_sweep_leaves_the_table_as_it_was(sweep, monkeypatch):
    op, path = sweep
    _counters(monkeypatch, [BASE, HOT])
    assert tune.tune_unless_throttled(op, "h100", Console(quiet=True), 1, path) == 3
    assert json.loads(path.read_text()) == OLD_TABLE
    _counters(monkeypatch, [BASE, HOT])  # --allow-throttled keeps it (and still says so: exit 3)
    assert tune.tune_unless_throttled(op, "h100", Console(quiet=True), 1, path, allow_throttled=True) == 3
    assert json.loads(path.read_text())["h100"] != OLD_TABLE["h100"]
    path.write_text(json.dumps(OLD_TABLE))
    _counters(monkeypatch, [BASE, BASE])  # a cool GPU: written, exit 0
    assert tune.tune_unless_throttled(op, "h100", Console(quiet=True), 1, path) == 0
    written = json.loads(path.read_text())["h100"]
    assert len(written) > 1 and all(v == ["1d", 256, 1] for v in written.values())  # the first fastest candidate


def test_the_dump_carries_the_throttle_and_a_failed_sweep_still_restores(sweep, monkeypatch, tmp_path):
    op, path = sweep
    dump = tmp_path / "dump.json"
    _counters(monkeypatch, [BASE, HOT])
    assert tune.tune_unless_throttled(op, "h100", Console(quiet=True), 1, path, dump) == 3
    assert json.loads(dump.read_text())["throttle"]["slowdown_s"] == {"sw_thermal_slowdown": 30.0}
    _counters(monkeypatch, [BASE, HOT])

    def fail(*args, **kwargs):  # the report after the table was written raises
        raise RuntimeError("report failed")

    monkeypatch.setattr(tune, "print_comparison", fail)
    with pytest.raises(RuntimeError, match="report failed"):
        tune.tune_unless_throttled(op, "h100", Console(quiet=True), 1, path)
    assert json.loads(path.read_text()) == OLD_TABLE
