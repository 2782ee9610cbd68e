"""The measurement schedule: a fixed cadence, or a wall-time budget, on simulated clocks."""

from __future__ import annotations

import itertools

import pytest

from spectral_monitor.config import MonitorConfig
from spectral_monitor.schedule import MAX_GROUPS, Schedule


def simulate(config: MonitorConfig, *, step_s: float, cost_s: float, n_layers: int, steps: int, first_cost: float = 0):
    """A training loop on a simulated clock: each step takes ``step_s``; a measurement of ``k`` of
    the ``n_layers`` layers costs ``cost_s * k / n_layers`` (the first, cold one ``first_cost``).
    Returns the schedule, the measured steps and, per measurement, the layer group."""
    sched = Schedule(config, n_layers)
    now = 0.0
    sched.begin(now)
    measured, groups = [], []
    for step in range(1, steps + 1):
        now += step_s
        sched.tick(now)
        final = step == steps
        if sched.due(step, first=not measured, final=final):
            group = sched.group(everything=final or not measured)
            layers = n_layers if group is None else len(range(group, n_layers, sched.groups))
            spent = first_cost if (first_cost and not measured) else cost_s * layers / n_layers
            now += spent
            sched.spent(spent, now)
            sched.measured(step, spent, layers=layers)
            measured.append(step)
            groups.append(group)
    return sched, measured, groups


def test_a_fixed_cadence_ignores_the_budget():
    _, measured, _ = simulate(MonitorConfig(every_n_steps=10), step_s=0.1, cost_s=5.0, n_layers=4, steps=40)
    assert measured == [1, 10, 20, 30, 40]


@pytest.mark.parametrize(("step_s", "cost_s"), [(0.2, 0.07), (0.5, 0.3), (0.01, 0.002)])
def test_the_budget_sets_the_gap_from_cost_and_step_time(step_s, cost_s):
    sched, measured, groups = simulate(MonitorConfig(), step_s=step_s, cost_s=cost_s, n_layers=36, steps=3000)
    expected_gap = -(-cost_s // (0.01 * step_s))  # ceil(cost / (overhead * step))
    gaps = sorted(b - a for a, b in itertools.pairwise(measured[1:-1]))  # steady state
    assert gaps[len(gaps) // 2] == pytest.approx(expected_gap, abs=1) and sched.groups == 1
    assert measured[0] == 1 and measured[-1] == 3000 and all(g is None for g in groups)
    assert sched.overhead <= 0.0105  # the budget, measured on the simulated clock


def test_a_slow_model_and_a_fast_model():
    """The same monitor cost: on a slow model it measures often, on a fast one it spreads out."""
    slow, slow_steps, _ = simulate(MonitorConfig(), step_s=2.0, cost_s=0.3, n_layers=36, steps=600)
    fast, fast_steps, _ = simulate(MonitorConfig(), step_s=0.05, cost_s=0.3, n_layers=36, steps=600)
    assert slow.gap < fast.gap and len(slow_steps) > 3 * len(fast_steps)
    assert slow.overhead <= 0.0105
    # 600 fast steps: the first and the last (full) measurements alone are 2 % of 30 s of training;
    # a longer run amortises them
    assert fast.overhead > 0.02
    longer, _, _ = simulate(MonitorConfig(), step_s=0.05, cost_s=0.3, n_layers=36, steps=20000)
    assert longer.overhead <= 0.011


def test_an_expensive_measurement_is_split_into_round_robin_groups():
    """A full measurement needs 600 steps of budget, more than max_every=100: the layers are split
    into 6 groups, each measured every 6 measurements (100 steps apart), and the budget holds."""
    sched, _measured, groups = simulate(
        MonitorConfig(max_every=100), step_s=0.1, cost_s=0.6, n_layers=24, steps=20000, first_cost=1.0
    )
    assert sched.groups == 6 and sched.gap == 100  # 0.6 / (0.01 * 0.1) = 600 steps
    assert set(groups[-7:-1]) == set(range(6))  # once the estimate settles, six in a row cover every layer
    assert sched.overhead <= 0.011  # 1 % in steady state, plus the first and last full measurements


def test_groups_are_capped_and_the_overhead_then_says_so():
    sched, _, _ = simulate(MonitorConfig(max_every=10), step_s=0.01, cost_s=5.0, n_layers=64, steps=2000)
    assert sched.groups == MAX_GROUPS and sched.gap == 10
    assert sched.overhead > 0.05 and sched.expected > 0.05  # the budget cannot be kept; the numbers say it


def test_state_round_trip():
    sched, _, _ = simulate(MonitorConfig(), step_s=0.2, cost_s=0.07, n_layers=4, steps=200)
    again = Schedule(MonitorConfig(), 4)
    again.load_state_dict(sched.state_dict())
    assert again.state_dict() == sched.state_dict()


def test_a_short_run_keeps_the_budget_with_a_cold_first_and_the_forced_last_measurement():
    """Steps of 0.265 s, a measurement 0.1 s (the first, cold one 0.22 s), as on the benchmark
    model: the schedule pays back the first and keeps room for the last, in a short run and a longer one."""
    for steps, at_least in ((200, 2), (400, 6), (2000, 45)):
        sched, measured, _ = simulate(
            MonitorConfig(), step_s=0.265, cost_s=0.1, n_layers=16, steps=steps, first_cost=0.22
        )
        assert measured[0] == 1 and measured[-1] == steps and len(measured) >= at_least
        assert sched.overhead <= 0.0101
