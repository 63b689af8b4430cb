import pytest


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


def test_report_merges_a_complete_set_of_shards():
    """`bench --shard I/N` records of one commit are shown as one run once every shard is there; an incomplete
    set, or shards of another commit, merge nothing."""
    from tritonbits_harness import report

    def rec(date, shard, sha="abc", n_rows=2):
        env = {"date": date, "device": "GPU", "git_sha": sha}
        rows = [{"benchmark": "op", "shard": shard}] * n_rows
        return {
            "kind": "bench",
            "shard": shard,
            "environment": env,
            "benchmarks": {"op": {"baselines": []}},
            "rows": rows,
        }

    one, two = rec("2026-11-23T01:00:00Z", [1, 2]), rec("2026-11-23T02:00:00Z", [2, 2], n_rows=3)
    shown = report.latest_by_device([two, one])["GPU"]
    rec_shown, rows = shown["bench"]["op"]
    assert rec_shown["merged_from"] == [one["environment"]["date"], two["environment"]["date"]]
    assert rows == one["rows"] + two["rows"] and rec_shown["shard"] is None
    assert one in shown["runs"] and two in shown["runs"]
    assert (
        report.merged_shards([one]) == []
        and report.merged_shards([one, rec("2026-11-23T03:00:00Z", [2, 2], "def")]) == []
    )
    full = rec("2026-11-22T00:00:00Z", None)
    assert report.latest_by_device([full, one])["GPU"]["bench"]["op"][0] is full  # a lone shard is not shown


def test_bench_shards_cover_the_cases_once():
    from tritonbits_harness.bench import registry, runner

    bench = registry.Benchmark(name="op", kernel="k", description="d", cases=lambda cpu: [{"m": i} for i in range(7)],
                               bytes_model=None, setup=lambda case, device: {}, baselines=())  # fmt: skip
    parts = [runner.select_cases(bench, cpu=True, quick=False, shard=(i, 3)) for i in (1, 2, 3)]
    assert sorted(c["m"] for p in parts for c in p) == list(range(7))
    assert runner.parse_shard("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(ValueError, match="--shard"):
            runner.parse_shard(bad)


def test_linear_4bit_parse_shapes():
    from tritonbits_harness.bench import linear_4bit as B

    assert B.parse_shapes(None) == B.SHAPES and B.parse_shapes("") == B.SHAPES
    assert B.parse_shapes("4096x14336,14336x4096") == [(4096, 14336), (14336, 4096)]
