"""Runs each world size's plans once per test session (see harness.py) and hands out results."""

from __future__ import annotations

import os

import pytest

from tests.parallelisms.harness import (PLANS, RTOL, assert_same_training, launch_world, load_results, load_structure,
                                       load_validation_loss)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process parity run (still part of CI)")


@pytest.fixture(scope="session")
def plan_results(tmp_path_factory):
    """plan_results(name) -> (losses, params) of that plan from `PLANS`."""
    launched: dict[int, str] = {}

    def results(name: str) -> tuple:
        nproc = PLANS[name].nproc
        if nproc not in launched:
            out_dir = str(tmp_path_factory.mktemp(f"world{nproc}"))
            launched[nproc] = out_dir
            launch_world(out_dir, nproc, [plan for plan, spec in PLANS.items() if spec.nproc == nproc])
        return load_results(os.path.join(launched[nproc], name))

    results.launched = launched
    return results


@pytest.fixture(scope="session")
def plan_structure(plan_results):
    """plan_structure(name) -> every rank's description of its modules under that plan (run_plan.py)."""

    def structure(name: str) -> list[dict]:
        plan_results(name)  # launches the plan's world if no test has yet
        return load_structure(os.path.join(plan_results.launched[PLANS[name].nproc], name))

    return structure


@pytest.fixture(scope="session")
def assert_plan_matches_reference(plan_results):
    """assert_plan_matches_reference(name): the plan's losses and final parameters equal the
    single-process run on the same global batch."""

    def check(name: str) -> None:
        reference = plan_results(PLANS[name].reference_name())
        assert_same_training(plan_results(name), reference)

    return check


@pytest.fixture(scope="session")
def assert_plan_validates_like_reference(plan_results):
    """assert_plan_validates_like_reference(name): the trained model's validation loss under the plan
    (a plan with `validate`) equals the single process's evaluation of the same batches."""

    def check(name: str) -> None:
        reference = PLANS[name].reference_name()
        assert PLANS[name].validate and PLANS[reference].validate, (name, reference)
        plan_results(name)  # launches the plans' worlds once per session
        plan_results(reference)
        ours, expected = (load_validation_loss(os.path.join(plan_results.launched[PLANS[plan].nproc], plan))
                          for plan in (name, reference))
        assert expected > 0
        assert abs(ours - expected) <= RTOL * expected, (ours, expected)

    return check
