"""A small run of bench/customer_load.py: customers asking at once through the link against `tunebot run` and a
model server on loopback. No reply lost or duplicated, no error, every "passed to the team" queued for the experts
with its customer. (Times are the benchmark's to report, not this test's to judge.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from emulator import Emulator, EmulatorUnavailable

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("customer_load", ROOT / "bench" / "customer_load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_customers_asking_at_once_each_get_one_reply(tmp_path):
    try:
        Emulator().close()
    except EmulatorUnavailable as exc:
        pytest.skip(str(exc))
    bench = load_bench()
    result = bench.run(customers=6, questions=7, model="fake", timeout_s=120, max_new_tokens=16, workdir=tmp_path)
    assert result["questions"] == 42 and result["replies"] == 42
    assert (result["lost"], result["duplicated"], result["error_replies"], result["tracebacks_in_log"]) == (0, 0, 0, 0)
    assert result["passed_to_team"] >= 6  # each customer asked at least one question that means nothing
    assert result["queued_for_experts"] == result["passed_to_team"]
    assert result["answered"] + result["passed_to_team"] == 42
    assert result["first_reply_ms"]["p50"] is not None and result["final_reply_ms"]["p95"] is not None


def test_the_question_plan_mixes_known_unknown_and_nonsense():
    plan = load_bench().question_plan(3, 10)
    assert len(plan) == 3 and all(len(qs) == len(set(qs)) == 10 for qs in plan.values())
    assert len({tuple(qs) for qs in plan.values()}) == 3
