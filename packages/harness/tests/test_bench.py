def test_report_shows_the_newest_run_even_when_quick():
    """An older full sweep measured an older kernel: the newest run (here a --quick one) is the one shown."""
    from tritonbits_harness import report

    def rec(date, n_rows, quick):
        return {"kind": "bench", "quick": quick, "environment": {"date": date, "device": "GPU"},
                "benchmarks": {"op": {}}, "rows": [{"benchmark": "op"}] * n_rows}  # fmt: skip

    full, quick = rec("2026-11-22T00:00:00Z", 40, False), rec("2026-11-23T00:00:00Z", 5, True)
    shown = report.latest_by_device([quick, full])["GPU"]
    assert shown["bench"]["op"][0] is quick
    assert shown["runs"] == [full, quick]


def test_report_skips_a_reverted_run():
    """A run of a change that was reverted is listed, not shown: the run before it measured what ships."""
    from tritonbits_harness import report

    def rec(date, **extra):
        return {"kind": "bench", "environment": {"date": date, "device": "GPU", "git_sha": "abc"},
                "benchmarks": {"op": {"baselines": []}}, "rows": [{"benchmark": "op"}], **extra}  # fmt: skip

    kept, reverted = rec("2026-11-22T00:00:00Z"), rec("2026-11-23T00:00:00Z", reverted_by="b2b1125")
    shown = report.latest_by_device([reverted, kept])["GPU"]
    assert shown["bench"]["op"][0] is kept
    assert shown["runs"] == [kept, reverted]


def test_linear_4bit_parse_shapes():
    from tritonbits_harness.bench import linear_4bit as B

    assert B.parse_shapes(None) == B.SHAPES and B.parse_shapes("") == B.SHAPES
    assert B.parse_shapes("4096x14336,14336x4096") == [(4096, 14336), (14336, 4096)]
