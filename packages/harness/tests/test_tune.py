"""The tuner: a registry of tunable ops, each table written through tritonbits.configs.write with the op's
own key function, so that the op's lookup finds every tuned entry."""

import dataclasses
import json

import pytest
import torch
from rich.console import Console

from tritonbits import configs
from tritonbits.ops import dequant_bias as db
from tritonbits_harness import tune
from tritonbits_harness.bench import dequant_bias as bench


def _fake_ms(case, config, rep_ms):
    """Deterministic 'timings': 1-D for N=1000, else BLOCK_M 8, then narrow tiles, then 4 warps."""
    if config[0] == "1d":
        return 0.01 + config[1] / 1e6 if case["n"] == 1000 else 100
    _, bm, bn, warps = config
    return abs(bm - 8) + bn / 1000 + warps / 100


def test_registered_ops():
    assert tune.TUNABLE["dequant_bias"].has_table
    assert not tune.TUNABLE["dequantize_4bit"].has_table
    assert tune.TUNABLE["dequant_bias"].key is tune._dequant_bias_key


def test_register_refuses_incomplete_ops():
    with pytest.raises(ValueError, match="'x' has a key but no candidates"):
        tune.register(tune.TunableOp(name="x", description="", key=lambda c: ""))
    with pytest.raises(ValueError, match="'y' has neither a table"):
        tune.register(tune.TunableOp(name="y", description=""))
    with pytest.raises(ValueError, match="'dequant_bias' registered twice"):
        tune.register(tune.TUNABLE["dequant_bias"])


def test_tuner_writes_the_keys_the_op_looks_up(tmp_path, monkeypatch):
    path = tmp_path / "dequant_bias.json"
    path.write_text(json.dumps({"h200": {"bf16/1x4096": ["2d", 2, 512, 8]}}))  # another family stays
    op = dataclasses.replace(tune.TUNABLE["dequant_bias"], time=_fake_ms)
    written = tune.tune_table(op, "interpreter", Console(quiet=True), rep_ms=1, path=path)
    assert written == path
    table = json.loads(path.read_text())
    assert table["h200"] == {"bf16/1x4096": ["2d", 2, 512, 8]}
    entries = table["interpreter"]
    cases = bench.cases(cpu=False)
    want_keys = {db.config_key(bench.ACC[c["acc"]], c["m"], c["n"]) for c in cases}
    assert set(entries) == want_keys
    reps = tune.representatives(op)
    for key, case in reps.items():
        best = min(tune.candidate_configs(case["m"]), key=lambda cfg: _fake_ms(case, cfg, 1))
        assert entries[key] == list(best)
    # the op's own lookup (family "interpreter" for CPU tensors) finds the tuned config of every case
    monkeypatch.setattr(configs, "table_path", lambda op_name: path)
    configs.table.cache_clear()
    db._config.cache_clear()  # lookups cached by earlier tests saw the checked-in table
    try:
        cpu = torch.device("cpu")
        for c in cases:
            got = db.config_for(cpu, bench.ACC[c["acc"]], c["m"], c["n"])
            assert list(got) == entries[db.config_key(bench.ACC[c["acc"]], c["m"], c["n"])]
    finally:
        configs.table.cache_clear()
        db._config.cache_clear()
    assert {v[0] for k, v in entries.items() if k.endswith("x1024")} == {"1d"}


def test_tuning_some_keys_keeps_the_others(tmp_path, monkeypatch):
    """--keys: only the keys containing one of the substrings are swept; the family's other entries stay, and a
    filter matching no key is an error."""
    path = tmp_path / "dequant_bias.json"
    op = dataclasses.replace(tune.TUNABLE["dequant_bias"], time=_fake_ms)
    reps = tune.representatives(op)
    first, *rest = sorted(reps)
    old = {key: ["2d", 2, 512, 8] for key in reps}
    path.write_text(json.dumps({"interpreter": old, "h200": {"k": ["1d", 1024, 4]}}))
    tune.tune_table(op, "interpreter", Console(quiet=True), rep_ms=1, path=path, keys=[first])
    table = json.loads(path.read_text())
    best = min(tune.candidate_configs(reps[first]["m"]), key=lambda cfg: _fake_ms(reps[first], cfg, 1))
    assert table["interpreter"][first] == list(best) != old[first]
    assert {k: table["interpreter"][k] for k in rest} == {k: old[k] for k in rest}
    assert table["h200"] == {"k": ["1d", 1024, 4]}
    # a family with no entries of its own starts from its fallback family's (what it ran with)
    monkeypatch.setitem(configs.FALLBACK_FAMILY, "newgpu", "interpreter")
    tune.tune_table(op, "newgpu", Console(quiet=True), rep_ms=1, path=path, keys=[rest[0]])
    newgpu = json.loads(path.read_text())["newgpu"]
    assert newgpu == {**json.loads(path.read_text())["interpreter"], rest[0]: newgpu[rest[0]]} and len(newgpu) == len(
        reps
    )
    with pytest.raises(ValueError, match="no dequant_bias key"):
        tune.tune_table(op, "interpreter", Console(quiet=True), rep_ms=1, path=path, keys=["no such key"])


def test_a_stopped_sweep_keeps_the_keys_it_finished(tmp_path):
    """The table and the dump are saved after every key: a run stopped mid-sweep (a time limit) leaves the keys
    it finished over the table as it was, not nothing (nor, for a full run, a table cut down to those keys)."""
    path, dump = tmp_path / "dequant_bias.json", tmp_path / "dump.json"
    op0 = dataclasses.replace(tune.TUNABLE["dequant_bias"], time=_fake_ms)
    reps = tune.representatives(op0)
    keys = list(reps)
    old = {key: ["2d", 2, 512, 8] for key in reps}
    path.write_text(json.dumps({"interpreter": old}))
    timed: list[str] = []

    def stop_at_third_key(case, config, rep_ms):
        key = db.config_key(bench.ACC[case["acc"]], case["m"], case["n"])
        if key not in timed:
            timed.append(key)
        if len(timed) == 3:
            raise KeyboardInterrupt  # the time limit's kill, as far as the sweep can tell
        return _fake_ms(case, config, rep_ms)

    op = dataclasses.replace(op0, time=stop_at_third_key)
    with pytest.raises(KeyboardInterrupt):
        tune.tune_table(op, "interpreter", Console(quiet=True), rep_ms=1, path=path, dump=dump)
    table = json.loads(path.read_text())["interpreter"]
    done = keys[:2]
    for key in done:
        best = min(tune.candidate_configs(reps[key]["m"]), key=lambda cfg: _fake_ms(reps[key], cfg, 1))
        assert table[key] == list(best)
    assert {k: v for k, v in table.items() if k not in done} == {k: v for k, v in old.items() if k not in done}
    assert [r["key"] for r in json.loads(dump.read_text())["rows"]] == done


def test_candidates_name_both_paths_and_the_launcher_runs_them():
    cands = tune.candidate_configs(4096)
    assert {c[0] for c in cands} == {"1d", "2d"}
    assert all(db.as_config(c) == c for c in cands)
    assert all(c[1] <= 2 for c in tune.candidate_configs(1) if c[0] == "2d")


def test_heuristic_comparison_times_the_heuristic_in_the_same_sweep():
    op = dataclasses.replace(tune.TUNABLE["dequant_bias"], time=_fake_ms)
    reps = tune.representatives(op, op.compare_cases)
    assert {c["n"] for c in reps.values()} == set(tune.COMPARE_NS)
    rows: list[dict] = []
    from tritonbits_harness.bench.runner import progress_bar

    with progress_bar(Console(quiet=True)) as progress:
        tune.sweep(op, 1, progress, reps, rows)
    assert len(rows) == len(reps)
    for r in rows:
        assert r["heuristic"] == db.heuristic_config(r["case"]["m"], r["case"]["n"], True)
        assert r["heuristic_ms"] == _fake_ms(r["case"], r["heuristic"], 1)
    assert tune.print_comparison(Console(quiet=True), "dequant_bias", rows) == sum(
        r["heuristic_ms"] / r["best_ms"] > 1.05 for r in rows
    )


def test_linear_4bit_dump_keeps_every_candidate_and_the_heuristic():
    """linear_4bit's configs are dicts: each candidate has its own timing in the dump (not one key per dict's
    keys), and the comparison row names the op's heuristic."""
    from tritonbits.ops import linear_4bit as L
    from tritonbits_harness.bench import linear_4bit as lbench

    def fake(case, config, rep_ms):
        return 1.0 + len(tune.config_json(config)) / 1e3 + (0.5 if config.get("path") == "dequant" else 0.0)

    def heuristic(case):
        return L.heuristic_config(lbench.DTYPES[case["dtype"]], case["m"], case["n"], case["k"], 132)

    op = dataclasses.replace(tune.TUNABLE["linear_4bit"], time=fake, heuristic=heuristic,
                             candidates=lambda c: tune.linear_4bit_candidates(c["m"], c["n"], c["k"], 132))  # fmt: skip
    reps = dict(list(tune.representatives(op).items())[:2])
    assert reps
    rows: list[dict] = []
    from tritonbits_harness.bench.runner import progress_bar

    with progress_bar(Console(quiet=True)) as progress:
        entries = tune.sweep(op, 1, progress, reps, rows)
    for r in rows:
        case = r["case"]
        cands = tune.linear_4bit_candidates(case["m"], case["n"], case["k"], 132)
        assert len(r["times"]) == len({tune.config_json(c) for c in cands}) > 1
        assert r["heuristic"] == heuristic(case)
        # the near-tie rule: of the candidates within LINEAR_4BIT_TIE of the fastest, the fewest launches
        fastest = min(fake(case, c, 1) for c in cands)
        near = [c for c in cands if fake(case, c, 1) <= fastest * (1 + tune.LINEAR_4BIT_TIE)]
        want = min(near, key=lambda c: (L.launch_count(c, case["m"], case["n"], case["k"]), fake(case, c, 1)))
        assert entries[r["key"]] == want


def test_the_near_tie_rule_takes_one_launch_only_within_the_tie():
    """linear_4bit's tuner writes a one-launch config over a faster two-launch one only within LINEAR_4BIT_TIE."""
    one = {"path": "mma", "warps": 4, "split_k": 1, "kwarps": 4, "prefetch": True}
    two = {"path": "mma", "warps": 4, "split_k": 8, "prefetch": True}
    case = {"m": 4, "n": 4096, "k": 4096, "dtype": "bf16"}
    for slower, want in ((1.0 + tune.LINEAR_4BIT_TIE / 2, one), (1.0 + 2 * tune.LINEAR_4BIT_TIE, two)):
        times = {tune.config_json(one): slower, tune.config_json(two): 1.0}
        op = dataclasses.replace(tune.TUNABLE["linear_4bit"], candidates=lambda c: [two, one], cases=lambda: [case],
                                 time=lambda c, cfg, rep, t=times: t[tune.config_json(cfg)])  # fmt: skip
        from tritonbits_harness.bench.runner import progress_bar

        with progress_bar(Console(quiet=True)) as progress:
            entries = tune.sweep(op, 1, progress, {"k": case})
        assert entries == {"k": want}, slower


def test_sweep_refuses_an_op_without_a_table():
    with pytest.raises(ValueError, match="'dequantize_4bit' has no config table"):
        tune.sweep(tune.TUNABLE["dequantize_4bit"], 1, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_main_needs_a_gpu():
    assert tune.main(["--gpu", "h100"]) == 2


def test_mma_candidates_stop_at_mma_tune_max_m():
    """The tuner times the mma kernel up to MMA_TUNE_MAX_M (its NOTE: it lost at M = 64), one split with K warps
    included, and none where K is not a multiple of its 256-column segment."""
    from tritonbits_harness import tune

    assert tune.mma_candidates(tune.MMA_TUNE_MAX_M + 1, 4096, 4096) == []
    cands = tune.mma_candidates(tune.MMA_TUNE_MAX_M, 4096, 4096)
    assert cands and all(c["path"] == "mma" for c in cands)
    assert any(c["split_k"] == 1 and c.get("kwarps", 1) > 1 for c in cands)
    assert tune.mma_candidates(16, 4096, 4096 + 128) == []
