"""pytest plugin shared by every package's tests: device selection, GPU profile, dtype matrix.

Loaded with `-p tritonbits_harness.pytest_plugin` (root pyproject addopts). Options:
  --gpu-profile NAME   run as a GPU session for that profile (t4, a100, l4, h100, h200); without a CUDA
                       device this is an error, never a silent pass.
  --dtypes fp16,bf16   output dtypes to test (default: the profile's, or all on CPU).
Without --gpu-profile the run is a CPU run: kernels go through the Triton interpreter on small shapes and
tests marked `gpu` are skipped (they need a device the CPU run does not have).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must happen before anything imports triton-jitted kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import gpus

try:  # hypothesis profiles: the tests that leave max_examples to the profile (kernels/tests/test_properties.py)
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("tritonbits-ci", max_examples=12, deadline=None)
    _hypothesis_settings.register_profile("tritonbits-long", max_examples=300, deadline=None)
    _hypothesis_settings.load_profile("tritonbits-ci")  # `--hypothesis-profile=NAME` overrides it
    _HYPOTHESIS = True
except ImportError:  # hypothesis is a dev dependency
    _HYPOTHESIS = False


def examples(at_least: int) -> int:
    """max_examples for a property test that needs more than the CI profile gives: `at_least`, or the loaded
    profile's count when that is larger (GPU sessions load `tritonbits-long`). Read at import, after pytest
    loaded the profile named by `--hypothesis-profile`."""
    if not _HYPOTHESIS:
        return at_least
    loaded = _hypothesis_settings.default
    return at_least if loaded is None else max(at_least, loaded.max_examples)


def pytest_addoption(parser):
    group = parser.getgroup("tritonbits")
    group.addoption("--gpu-profile", default=None, choices=sorted(gpus.PROFILES), help="GPU session profile")
    group.addoption("--dtypes", default=None, help="comma-separated output dtypes (fp16,bf16,fp32)")
    group.addoption("--record-dir", default=None, help="write a JSON run record (device, versions, counts) here")


def _state(config):
    return config._tritonbits  # type: ignore[attr-defined]


def pytest_configure(config):
    name = config.getoption("--gpu-profile")
    device = gpus.current_device()
    if name is not None and device is None:
        raise pytest.UsageError(
            f"--gpu-profile {name}: no CUDA device is visible here. GPU sessions need a GPU; run test-cpu instead."
        )
    profile = gpus.PROFILES[name] if name else None
    dtypes = config.getoption("--dtypes")
    dtype_names = tuple(dtypes.split(",")) if dtypes else (profile.dtypes if profile else ("fp16", "bf16", "fp32"))
    for d in dtype_names:
        if d not in gpus.DTYPES:
            raise pytest.UsageError(f"--dtypes: unknown dtype {d!r}; choose from {sorted(gpus.DTYPES)}")
    config._tritonbits = {"profile": profile, "device": device, "dtypes": dtype_names}


def pytest_report_header(config):
    st = _state(config)
    if st["device"] is None:
        return "tritonbits: CPU run, kernels under the Triton interpreter (TRITON_INTERPRET=1)"
    dev = st["device"]
    line = f"tritonbits: {dev.name} sm{dev.capability[0]}{dev.capability[1]}"
    if st["profile"] is not None:
        line += f", profile {st['profile'].name}"
        if dev.profile is None or dev.profile.name != st["profile"].name:
            line += f" (NOTE: really running on {dev.name}, not a {st['profile'].name.upper()})"
    return line + f", dtypes {','.join(st['dtypes'])}"


def pytest_collection_modifyitems(config, items):
    if _state(config)["device"] is not None:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs in the GPU sessions)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """cuda when a GPU is present, else cpu (kernels then run under the interpreter)."""
    return torch.device("cuda") if _state(request.config)["device"] is not None else torch.device("cpu")


@pytest.fixture(scope="session")
def on_gpu(device) -> bool:
    return device.type == "cuda"


@pytest.fixture(scope="session")
def test_dtypes(request) -> list[torch.dtype]:
    return [gpus.DTYPES[d] for d in _state(request.config)["dtypes"]]


@pytest.fixture
def gen(request) -> torch.Generator:
    """A fresh CPU generator per test with a random seed (fresh inputs every run); the seed is attached
    to the test report so that a failure can be replayed."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            item.add_report_section("call", "seed", f"gen seed: {seeds[0]}")


def pytest_generate_tests(metafunc):
    """Tests that take `out_dtype` run for each dtype of the session's matrix."""
    if "out_dtype" in metafunc.fixturenames:
        names = _state(metafunc.config)["dtypes"]
        metafunc.parametrize("out_dtype", [gpus.DTYPES[d] for d in names], ids=list(names))


@pytest.fixture
def fake_capability(monkeypatch, request):
    """Make torch (and tritonbits' cached capability lookup) report another compute capability.

    Usage: ``fake_capability((7, 5))`` inside a test; undone at teardown."""
    from tritonbits import _runtime

    def set_capability(cap: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        _runtime.capability.cache_clear()

    request.addfinalizer(_runtime.capability.cache_clear)
    return set_capability


# --- run records --------------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report):
    """Counts a test once: its call's outcome, or an error where setup or teardown failed, or a failure where its
    xdist worker died under it (xdist reports that test with when="???"); failed and errored node ids listed."""
    counts = _RECORD["counts"]
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = "error" if report.when == "setup" and report.outcome == "failed" else report.outcome
    elif report.when == "teardown" and report.outcome == "failed":
        outcome = "error"
    elif report.when not in ("setup", "call", "teardown") and report.outcome == "failed":
        outcome = "failed"  # the worker running it crashed
    else:
        return
    counts[outcome] = counts.get(outcome, 0) + 1
    if outcome in ("failed", "error"):
        _RECORD["failures"].append(report.nodeid)


_RECORD: dict = {"counts": {}, "failures": []}


def pytest_sessionfinish(session, exitstatus):
    record_dir = session.config.getoption("--record-dir", None)
    st = getattr(session.config, "_tritonbits", None)
    if not record_dir or st is None or hasattr(session.config, "workerinput"):
        return
    from . import records

    name = f"{st['profile'].name if st['profile'] else 'cpu'}-{'-'.join(st['dtypes'])}"
    path = records.write(record_dir, "tests", name, {
        "profile": st["profile"].name if st["profile"] else None,
        "dtypes": list(st["dtypes"]),
        "exitstatus": int(exitstatus),
        "counts": _RECORD["counts"],
        "failures": _RECORD["failures"],
        "args": list(session.config.invocation_params.args),
    })  # fmt: skip
    print(f"\ntritonbits: test record written to {path}")
