"""Test sessions, one per Keras backend, plus lint.

nox                      # everything (what CI runs)
nox -s tests-jax         # one backend
nox -s tests-torch -- -k parity   # extra arguments go to pytest
"""

import os
import shutil

import nox

nox.options.sessions = ["lint", "tests-jax", "tests-tensorflow", "tests-torch", "tests-keras-min"]

# The lowest Keras that pyproject.toml admits; the model, loading and generation
# tests run against it (the reference comparisons need today's keras-hub).
LOWEST_KERAS = "keras==3.8.0"
CORE_TESTS = [
    "tests/layers",
    "tests/test_config.py",
    "tests/test_cache.py",
    "tests/test_models.py",
    "tests/test_generation.py",
    "tests/test_loading_errors.py",
    "tests/test_tokenizer.py",
]
nox.options.reuse_existing_virtualenvs = True


def drop_environment_if_asked(session):
    """Deletes the session's environment when NOX_DROP_ENVIRONMENTS=1 (as .ci/run sets).

    Each test environment holds TensorFlow, PyTorch and JAX, a few GB; a CI machine
    with little free disk then needs room for one at a time, not four.
    """
    if os.environ.get("NOX_DROP_ENVIRONMENTS") == "1":
        shutil.rmtree(session.virtualenv.location, ignore_errors=True)


def run_tests(session, backend, requirements, tests=("tests",)):
    """Installs `requirements` and runs pytest on `backend` (extra arguments replace `tests`)."""
    try:
        session.install("-c", "constraints.txt", *requirements)
        session.run(
            "pytest",
            *(session.posargs or tests),
            env={"KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    finally:
        drop_environment_if_asked(session)


@nox.session(name="tests-jax")
def tests_jax(session):
    run_tests(session, "jax", ["-e", ".[test,jax]"])


@nox.session(name="tests-tensorflow")
def tests_tensorflow(session):
    run_tests(session, "tensorflow", ["-e", ".[test,tensorflow]"])


@nox.session(name="tests-torch")
def tests_torch(session):
    run_tests(session, "torch", ["-e", ".[test,torch]"])


@nox.session(name="tests-keras-min")
def tests_keras_min(session):
    run_tests(session, "jax", ["-e", ".[jax]", "pytest", LOWEST_KERAS], CORE_TESTS)


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
