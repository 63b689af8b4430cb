"""Every check and GPU job of tritonbits. `uv run nox` runs the CPU sessions; GPU sessions are named
test-<gpu>-<dtype>, bench-<gpu>, tune-<gpu>, sanitize-<gpu>, e2e-<gpu> and run only when asked for.

Every session also runs with `--no-venv` against an already installed torch/triton (an offline GPU
machine): it then installs nothing and puts the three packages' src/ trees on PYTHONPATH.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nox
from nox.virtualenv import PassthroughEnv

nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "kernels-alone", "bench-cpu", "test-cpu"]

ROOT = Path(__file__).parent
SRC = [ROOT / "packages" / p / "src" for p in ("kernels", "reference", "harness")]
TESTS = [f"packages/{p}/tests" for p in ("reference", "harness", "kernels")]
GPUS = ("t4", "a100", "l4", "h100", "h200")
DTYPES = ("fp16", "bf16")
RECORDS = "docs/gpu-runs"


def no_venv(session: nox.Session) -> bool:
    return isinstance(session.virtualenv, PassthroughEnv)


def python(session: nox.Session) -> str:
    """The interpreter to run: the session venv's, or under --no-venv the one running nox (an offline GPU
    machine may have only `python3`)."""
    return sys.executable if no_venv(session) else "python"


def workspace(session: nox.Session) -> dict[str, str]:
    """Install the locked workspace into the session venv, or under --no-venv use the source trees."""
    env = {"PYTHONUNBUFFERED": "1"}
    if no_venv(session):
        paths = [str(p) for p in SRC] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        session.log("--no-venv: using the installed torch/triton and the packages' src/ trees")
    else:
        session.run_install("uv", "sync", "--locked", "--all-packages", "--group", "dev",
                            env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location})  # fmt: skip
    return env


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (format check, lint, import order) and mypy on all three packages, the noxfile and ci/."""
    env = workspace(session)
    session.run("ruff", "format", "--check", "packages", "noxfile.py", "ci", env=env)
    session.run("ruff", "check", "packages", "noxfile.py", "ci", env=env)
    session.run("mypy", env=env)


@nox.session(name="test-cpu")
def test_cpu(session: nox.Session) -> None:
    """All packages' tests; kernels run through the Triton interpreter on small shapes."""
    env = workspace(session)
    env["TRITON_INTERPRET"] = "1"
    session.run(python(session), "-m", "pytest", *TESTS, "-n", "2", *session.posargs, env=env)


@nox.session(name="kernels-alone")
def kernels_alone(session: nox.Session) -> None:
    """Install only `tritonbits` (torch + triton) in a fresh venv and run the smoke test there, proving the
    kernels import nothing from reference, harness or bitsandbytes."""
    env = {"TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}
    if no_venv(session):
        env["PYTHONPATH"] = str(SRC[0]) + os.pathsep + os.environ.get("PYTHONPATH", "")
    else:
        # the [cpu] extra brings numpy, the Triton interpreter's own import (triton does not declare it)
        session.install("./packages/kernels[cpu]", "pytest")
        session.run(python(session), "-c", CHECK_NOT_INSTALLED, env=env)
    session.run(python(session), "-c", CHECK_NOT_IMPORTED, env=env)
    session.run(python(session), "-m", "pytest", "packages/kernels/tests/test_smoke.py", "-o", "addopts=",
                "-p", "no:cacheprovider", *session.posargs, env=env)  # fmt: skip


CHECK_NOT_INSTALLED = """
import importlib.util, sys
present = [m for m in ("tritonbits_reference", "tritonbits_harness", "bitsandbytes")
           if importlib.util.find_spec(m) is not None]
sys.exit(f"kernels-alone venv must not contain {present}" if present else 0)
"""
CHECK_NOT_IMPORTED = """
import importlib.util, sys
import tritonbits
leaked = sorted(m for m in sys.modules if m.split(".")[0] in
                ("tritonbits_reference", "tritonbits_harness", "bitsandbytes"))
if "tritonbits.integrations.bitsandbytes" in sys.modules:
    leaked.append("tritonbits.integrations.bitsandbytes")
if leaked:
    sys.exit(f"import tritonbits pulled in {leaked}")
# the optional bnb integration is lazy: importing it imports no bitsandbytes, only enable() does
import tritonbits.integrations.bitsandbytes as tb_bnb
if "bitsandbytes" in sys.modules:
    sys.exit("importing tritonbits.integrations.bitsandbytes imported bitsandbytes")
if importlib.util.find_spec("bitsandbytes") is None:
    try:
        tb_bnb.enable()
        sys.exit("enable() without bitsandbytes did not raise")
    except ImportError as e:
        assert "tritonbits[bnb]" in str(e), e
print("tritonbits imports only torch/triton; the bnb integration imports bitsandbytes only when enabled")
"""


def _gpu_test_session(gpu: str, dtype: str):
    @nox.session(name=f"test-{gpu}-{dtype}", default=False, tags=["gpu", gpu, dtype])
    def session_fn(session: nox.Session) -> None:
        env = workspace(session)
        session.run(python(session), "-m", "pytest", *TESTS, f"--gpu-profile={gpu}", f"--dtypes={dtype}",
                    f"--record-dir={RECORDS}", "--hypothesis-profile=tritonbits-long", *session.posargs,
                    env=env)  # fmt: skip

    session_fn.__doc__ = f"The GPU suite for the {gpu} profile, {dtype} outputs (needs a CUDA device)."
    return session_fn


def _gpu_sanitize_session(gpu: str):
    @nox.session(name=f"sanitize-{gpu}", default=False, tags=["gpu", gpu, "sanitize"])
    def session_fn(session: nox.Session) -> None:
        env = workspace(session)
        session.run(python(session), "-m", "tritonbits_harness.sanitize", f"--gpu={gpu}", f"--record-dir={RECORDS}",
                    *session.posargs, env=env)  # fmt: skip

    session_fn.__doc__ = (f"The `sanitize` GPU tests (every op, small shapes; the Gluon kernels' forced configs) under "
                          f"compute-sanitizer memcheck, "
                          f"initcheck and racecheck on a {gpu}; a record and a log per tool "
                          "(`-- --tools memcheck` for one tool, `-- --dtypes fp16` for another dtype).")  # fmt: skip
    return session_fn


def _gpu_bench_session(gpu: str):
    @nox.session(name=f"bench-{gpu}", default=False, tags=["gpu", gpu, "bench"])
    def session_fn(session: nox.Session) -> None:
        env = workspace(session)
        session.run(python(session), "-m", "tritonbits_harness.bench", f"--gpu={gpu}", f"--record-dir={RECORDS}",
                    *session.posargs, env=env)  # fmt: skip

    session_fn.__doc__ = f"Every registered benchmark on a {gpu} (refuses another GPU unless -- --any-gpu)."
    return session_fn


def _gpu_tune_session(gpu: str):
    @nox.session(name=f"tune-{gpu}", default=False, tags=["gpu", gpu, "tune"])
    def session_fn(session: nox.Session) -> None:
        env = workspace(session)
        session.run(python(session), "-m", "tritonbits_harness.tune", f"--gpu={gpu}", *session.posargs, env=env)

    session_fn.__doc__ = (f"Tune one registered op on a {gpu} (`-- --op NAME`, default dequant_bias): write its "
                          "config table under the GPU family, or print its sweep (dequantize_4bit); "
                          "`-- --write PATH` writes the table elsewhere.")  # fmt: skip
    return session_fn


def _gpu_e2e_session(gpu: str):
    @nox.session(name=f"e2e-{gpu}", default=False, tags=["gpu", gpu, "e2e"])
    def session_fn(session: nox.Session) -> None:
        env = workspace(session)
        session.run(python(session), "-m", "tritonbits_harness.e2e", f"--gpu={gpu}", f"--record-dir={RECORDS}",
                    *session.posargs, env=env)  # fmt: skip

    session_fn.__doc__ = (f"tritonbits behind bitsandbytes end to end on a {gpu}: a Llama-3-8B-dims model through "
                          "transformers + peft (load, generate, QLoRA step, profile); refuses another GPU unless "
                          "-- --any-gpu.")  # fmt: skip
    return session_fn


for _gpu in GPUS:
    for _dtype in DTYPES:
        _gpu_test_session(_gpu, _dtype)
    _gpu_bench_session(_gpu)
    _gpu_tune_session(_gpu)
    _gpu_sanitize_session(_gpu)
    _gpu_e2e_session(_gpu)


@nox.session(name="bench-cpu")
def bench_cpu(session: nox.Session) -> None:
    """The benchmark registry end to end on tiny shapes under the interpreter (plumbing only; its numbers
    mean nothing and are labelled so)."""
    env = workspace(session)
    env["TRITON_INTERPRET"] = "1"
    session.run(python(session), "-m", "tritonbits_harness.bench", "--cpu", "--record-dir",
                session.create_tmp(), *session.posargs, env=env)  # fmt: skip


@nox.session
def report(session: nox.Session) -> None:
    """Render docs/benchmarks.md and the PNG plots from the records in docs/gpu-runs/."""
    env = workspace(session)
    session.run(python(session), "-m", "tritonbits_harness.report", f"--records={RECORDS}", "--out=docs", env=env)
