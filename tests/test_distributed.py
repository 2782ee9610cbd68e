"""spectral_monitor.distributed: scheduling and detection in-process; the collective code on 2 gloo
processes (FSDP2, FSDP1, DDP, DeepSpeed ZeRO-3 where installed), checked against exact float64 SVDs
of the full ΔW that the frameworks' own gathers (``full_tensor``, ``summon_full_params``,
``GatheredParameters``) return."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from spectral_monitor import distributed as smd
from tests import _distributed_worker as worker

F64 = torch.float64
WORLD = 2


def _spawn(scenario: str, tmp_path: Path, timeout: float = 90.0) -> list[dict]:
    """Run ``worker.scenario_<scenario>`` on WORLD gloo ranks; a rank still running after ``timeout``
    (a hang) fails the test and the processes it started are killed."""
    ctx = mp.start_processes(
        worker.run, args=(WORLD, scenario, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"scenario {scenario!r}: ranks still running after {timeout:.0f} s")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _exact(w0: torch.Tensor, wt: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The canonical (out, in) ΔW in float64."""
    D = wt.to(F64) - w0.to(F64)
    return D.mT if transposed else D


TRANSPOSED = {"2"}  # the Conv1D layer of worker.model()


def _check_layer(res: dict, D: torch.Tensor, top: int = 4) -> None:
    """Top singular values to 1e-3 relative, ‖ΔW‖_F² to 1e-5, and U, V that diagonalise ΔW."""
    S0 = torch.linalg.svdvals(D)
    S = res["S"].to(F64)
    k = min(top, S.numel())
    assert S0[0] > 0
    big = S0[:k] > 1e-3 * S0[0]  # values that are not round-off
    rel = (S[:k] - S0[:k]).abs() / S0[:k]
    assert rel[big].max() < 1e-3, (rel, S0[:k])
    assert abs(res["fro"] - D.square().sum().item()) <= 1e-5 * D.square().sum().item()
    U, V = res["U"].to(F64), res["V"].to(F64)
    assert U.shape == (D.shape[0], S.numel()) and V.shape == (D.shape[1], S.numel())
    proj = U[:, :k].mT @ D @ V[:, :k]  # = diag(S) when U, V are the singular vectors, rows in order
    torch.testing.assert_close(proj, torch.diag(S[:k]), atol=1e-3 * S0[0].item(), rtol=0)


# ------------------------------------------------------------------------------------------------
# in-process


def test_lpt_assign_by_hand() -> None:
    # sorted 5, 4, 3, 3, 3: 5 -> r0 (5); 4 -> r1 (4); 3 -> r1 (7); 3 -> r0 (8); 3 -> r1 (10)
    assert smd.lpt_assign([3, 5, 3, 4, 3], 2) == [1, 0, 0, 1, 1]
    assert smd.lpt_assign([2, 2, 2], 3) == [0, 1, 2]  # ties: lower index to lower rank
    assert smd.lpt_assign([1.0], 2, loads=[5.0, 0.0]) == [1]
    assert smd.lpt_assign([], 4) == []
    with pytest.raises(ValueError):
        smd.lpt_assign([1.0], 0)


def test_shard_kind_from_parameter_types() -> None:
    lin = torch.nn.Linear(4, 3)
    assert smd.shard_kind(lin.weight) == "replicated"
    flat = torch.nn.Parameter(torch.zeros(5))
    flat._fsdp_flattened = True  # what FSDP1 marks its use_orig_params views with
    assert smd.shard_kind(flat) == "fsdp1"
    empty = torch.nn.Parameter(torch.zeros(0))
    empty.ds_id, empty.ds_tensor = 3, torch.zeros(6)  # DeepSpeed ZeRO-3: data of shape [0]
    assert smd.shard_kind(empty) == "zero3"
    assert smd.shard_kind(torch.nn.Parameter(torch.zeros(7))) == "replicated"  # 1-D, no FSDP around


def test_orth_factor_handles_rank_deficient_and_zero_gram() -> None:
    gen = torch.Generator().manual_seed(0)
    Y = torch.randn(40, 3, generator=gen, dtype=F64) @ torch.randn(3, 8, generator=gen, dtype=F64)  # rank 3 of 8
    T = smd._orth_factor(Y.mT @ Y)
    Q = Y @ T
    G = Q.mT @ Q
    kept = G.diagonal() > 0.5
    assert int(kept.sum()) == 3  # exactly the directions Y has
    torch.testing.assert_close(G, torch.diag(kept.to(F64)), atol=1e-10, rtol=0)
    assert torch.linalg.matrix_rank(torch.cat([Q[:, kept], Y], 1)) == 3  # same span as Y
    assert torch.equal(smd._orth_factor(torch.zeros(2, 8, 8, dtype=F64)), torch.zeros(2, 8, 8, dtype=F64))
    full = torch.randn(40, 8, generator=gen, dtype=F64)
    Qf = full @ smd._orth_factor(full.mT @ full)
    torch.testing.assert_close(Qf.mT @ Qf, torch.eye(8, dtype=F64), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# 2 gloo processes


@pytest.mark.distributed
def test_sharded_rsvd_on_split_matrices(tmp_path: Path) -> None:
    ranks = _spawn("svd", tmp_path)
    d = ranks[0]
    A, low = d["A"], d["low"]
    S0 = torch.linalg.svdvals(A)[:6]
    for case in ("rows_even", "rows_uneven_base", "rows_empty", "cols_uneven", "cols_warm", "batch"):
        for r in ranks:
            S = r[case]["S"][0] if case == "batch" else r[case]["S"]
            U = r[case]["U"][0] if case == "batch" else r[case]["U"]
            V = r[case]["V"][0] if case == "batch" else r[case]["V"]
            assert ((S - S0).abs() / S0).max() < 1e-10, case  # float64 input, fast decay: round-off
            torch.testing.assert_close(U.mT @ A @ V, torch.diag(S), atol=1e-10, rtol=0)
        assert torch.equal(ranks[0][case]["S"], ranks[1][case]["S"])
    # bf16 products: the mixed-precision basis correction runs through the distributed Gram
    S = ranks[0]["bf16"]["S"].to(F64)
    assert ((S - S0).abs() / S0).max() < 3e-3  # measured 8.8e-4
    U = ranks[0]["bf16"]["U"].to(F64)
    torch.testing.assert_close(U.mT @ U, torch.eye(6, dtype=F64), atol=1e-5, rtol=0)
    # exactly rank 2 (singular Gram): two values, then zeros with zero columns
    S_low = torch.linalg.svdvals(low)
    for S, U in ((d["rank2"]["S"], d["rank2"]["U"]), (d["batch"]["S"][1], d["batch"]["U"][1])):
        assert ((S[:2] - S_low[:2]).abs() / S_low[:2]).max() < 1e-10
        assert torch.all(S[2:] == 0) and torch.all(U[:, 2:] == 0)
        torch.testing.assert_close(U[:, :2].mT @ U[:, :2], torch.eye(2, dtype=F64), atol=1e-10, rtol=0)
    assert torch.all(d["zero"]["S"] == 0) and torch.all(d["zero"]["U"] == 0)
    # ill-conditioned float32 sketch: CholeskyQR2's second pass keeps U orthonormal
    U = d["ill"]["U"].to(F64)
    torch.testing.assert_close(U.mT @ U, torch.eye(16, dtype=F64), atol=1e-5, rtol=0)
    # gather=False: each rank keeps its own rows of U (50 and 20)
    assert ranks[0]["local_U"]["U"].shape == (50, 6) and ranks[1]["local_U"]["U"].shape == (20, 6)
    torch.testing.assert_close(
        torch.cat([ranks[0]["local_U"]["U"], ranks[1]["local_U"]["U"]]), d["rows_uneven_base"]["U"], atol=1e-12, rtol=0
    )
    for r in ranks:  # a bad tiling raises on every rank (none hangs)
        assert r["tile_error"] is not None and "do not tile" in r["tile_error"]
    for r in ranks:  # a DTensor on a 2-D mesh (HSDP-like) is gathered, whatever the size
        assert r["mesh2d"]["route"] == "gather" and r["mesh2d"]["error"] is None
        _check_layer(r["mesh2d"], d["A"].float().to(F64))


@pytest.fixture(scope="module")
def fsdp2_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One FSDP2 run shared by the tests that read it."""
    return _spawn("fsdp2", tmp_path_factory.mktemp("fsdp2"))


@pytest.mark.distributed
def test_fsdp2_both_routes_match_exact_svd(fsdp2_ranks: list[dict]) -> None:
    ranks = fsdp2_ranks
    d = ranks[0]
    assert set(d["kinds"].values()) == {"dtensor"}
    for mode, route in (("sharded", "sharded"), ("gathered", "gather"), ("warm", "sharded")):
        for name in d["w0"]:
            D = _exact(d["w0"][name], d["wt"][name], name in TRANSPOSED)
            for r in ranks:
                res = r[mode][name]
                assert res["route"] == route and res["error"] is None
                _check_layer(res, D)
            assert torch.equal(ranks[0][mode][name]["S"], ranks[1][mode][name]["S"])
        # the planted rank-1 update reads as one
        p = d["planted"]
        rho1 = [r[mode][p]["S"][0].item() ** 2 / r[mode][p]["fro"] for r in ranks]
        D = _exact(d["w0"][p], d["wt"][p], False)
        exact_rho1 = (torch.linalg.svdvals(D)[0] ** 2 / D.square().sum()).item()
        assert min(rho1) > 0.99 and abs(rho1[0] - exact_rho1) < 1e-4


@pytest.mark.distributed
def test_fsdp2_base_memory_is_split(fsdp2_ranks: list[dict]) -> None:
    ranks = fsdp2_ranks
    total, one_row = 0, 0
    for name, w0 in ranks[0]["w0"].items():
        rows = [r["base_pieces"][name][0] for r in ranks]
        assert all(r["base_pieces"][name][1:] == tuple(w0.shape[1:]) for r in ranks)  # stored rows, full width
        assert sum(rows) == w0.shape[0] and max(rows) == -(-w0.shape[0] // WORLD)  # torch.chunk: 17 + 16, 1 + 0
        total += w0.numel() * w0.element_size()
        one_row += w0.shape[1] * w0.element_size()
    nbytes = [r["base_nbytes"] for r in ranks]
    assert sum(nbytes) == total and max(nbytes) <= total / WORLD + one_row  # half each, within a row per layer


@pytest.mark.distributed
def test_fsdp1_flat_views_gathered(tmp_path: Path) -> None:
    ranks = _spawn("fsdp1", tmp_path)
    d = ranks[0]
    assert set(d["kinds"].values()) == {"fsdp1"}
    assert all(len(r["views"][n]) == 1 for r in ranks for n in d["names"])  # 1-D views (some empty)
    for name in d["names"]:
        D = _exact(d["w0"][name], d["wt"][name], name in TRANSPOSED)
        for r in ranks:
            assert r["results"][name]["route"] == "gather" and r["results"][name]["error"] is None
            _check_layer(r["results"][name], D)


@pytest.mark.distributed
def test_ddp_layers_split_by_cost(tmp_path: Path) -> None:
    ranks = _spawn("ddp", tmp_path)
    d = ranks[0]
    assert set(d["kinds"].values()) == {"replicated"}
    owners = d["owners"]
    assert set(owners.values()) == {0, 1}
    for rank, r in enumerate(ranks):  # each rank stores only the base of the layers it owns
        assert r["base_names"] == sorted(n for n, o in owners.items() if o == rank)
    for name in d["w0"]:
        D = _exact(d["w0"][name], d["wt"][name], name in TRANSPOSED)
        for rank, r in enumerate(ranks):
            res = r["results"][name]
            assert res["route"] == "local" and res["owner"] == owners[name]
            _check_layer(res, D)
            # share_factors=False: only the owner holds them, and they are the same
            if owners[name] == rank:
                assert torch.equal(r["own"][name], res["S"])
            else:
                assert r["own"][name] is None


@pytest.mark.distributed
def test_failure_on_one_rank_does_not_hang(tmp_path: Path) -> None:
    ranks = _spawn("failure", tmp_path)
    results = [r["results"] for r in ranks]
    failed = [{n for n, x in res.items() if x["error"]} for res in results]
    assert failed[0] == failed[1]
    owned_by_1 = {n for n, x in results[0].items() if x["route"] == "gather" and x["owner"] == 1}
    assert results[0]["4"]["route"] == "sharded" and owned_by_1
    assert failed[0] == owned_by_1 | {"4"}
    assert "rank 1: BaseMismatchError" in results[0]["4"]["error"]
    assert all("injected failure" in results[0][n]["error"] for n in owned_by_1)
    for name in set(results[0]) - failed[0]:  # the rest is right, on both ranks
        D = _exact(ranks[0]["w0"][name], ranks[0]["wt"][name], name in TRANSPOSED)
        for res in results:
            _check_layer(res[name], D)
    assert all(x["error"] is None for r in ranks for x in r["after"].values())  # collectives still in step
    for r in ranks:  # NaN in rank 0's rows: non-finite norm and zero factors everywhere, not an error
        res = r["nan"]["0"]
        assert res["route"] == "sharded" and res["error"] is None and res["fro"] != res["fro"]
        assert torch.all(res["S"] == 0) and torch.all(res["U"] == 0)
        assert "rank 0: NonFiniteError" in r["nan_error"]


@pytest.mark.distributed
def test_deepspeed_zero3(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    ranks = _spawn("zero3", tmp_path, timeout=120.0)
    d = ranks[0]
    assert set(d["kinds"].values()) == {"zero3"}
    for name in d["w0"]:
        D = _exact(d["w0"][name], d["wt"][name], name in TRANSPOSED)
        for r in ranks:
            assert r["results"][name]["route"] == "gather" and r["results"][name]["error"] is None
            _check_layer(r["results"][name], D)


# ------------------------------------------------------------------------ the monitor on 2 ranks
def _single_process(weights: dict, steps: list[int]) -> list[dict]:
    """The oracle: a single-process SpectralMonitor on the same weights (the full matrices)."""
    from torch import nn

    from spectral_monitor import SpectralMonitor

    names = sorted(weights[0])
    net = nn.ModuleDict({n: nn.Linear(1, 1, bias=False) for n in names})
    for n in names:
        net[n].weight = nn.Parameter(weights[0][n].clone())
    mon = SpectralMonitor(net, layers="re:.", rank=32, niter=4, intruders=False, sketch_dtype="float32")
    mon.snapshot()
    out = []
    for step in steps:
        with torch.no_grad():
            for n in names:
                net[n].weight.copy_(weights[step][n])
        out.append(mon.measure(step).layers)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "fsdp1"])
def test_the_monitor_on_two_ranks_matches_one_process(tmp_path, kind):
    """Both ranks build the same reports; they match a single-process monitor of the same ΔW to 1e-3;
    the planted rank-1 update reads rho1 > 0.99; each rank holds about half the base."""
    ranks = _spawn(f"monitor_{kind}", tmp_path)
    a, b = ranks
    assert a["steps"] == b["steps"] == [1, 2, 3, 4]
    assert a["sink_steps"] == [1, 2, 3, 4] and b["sink_steps"] == []  # rank 0 writes the sinks
    for la, lb in zip(a["layers"], b["layers"]):  # every rank judges the same numbers (NaN: no fit)
        assert {n: {k: str(v) for k, v in m.items()} for n, m in la.items()} == {
            n: {k: str(v) for k, v in m.items()} for n, m in lb.items()
        }
    oracle = _single_process(a["weights"], a["steps"])
    names = {worker._short(n) for n in a["specs"]}
    for got, want in zip(a["layers"], oracle):
        got = {worker._short(n): v for n, v in got.items()}
        assert set(got) == names
        for name, values in got.items():
            ref = want[name]
            for metric in ("update_norm", "update_rel", "sigma1", "rho1", "stable_rank", "gap"):
                assert values[metric] == pytest.approx(ref[metric], rel=1e-3, abs=1e-6), (name, metric)
            # estimated from the top k and the residual: its smallest values carry float32 round-off
            assert values["erank"] == pytest.approx(ref["erank"], rel=1e-2), name
            assert "align_base" not in values and "intruders" not in values  # not under sharding
    last = {worker._short(n): v for n, v in a["layers"][-1].items()}
    assert last["4"]["rho1"] > 0.99
    total = sum(t.numel() * t.element_size() for t in a["weights"][0].values())
    assert a["base_bytes"] + b["base_bytes"] == pytest.approx(total, rel=0.2)  # not a full copy per rank
    assert max(a["base_bytes"], b["base_bytes"]) < 0.75 * total


@pytest.mark.distributed
def test_the_monitor_under_deepspeed_zero3_matches_one_process(tmp_path):
    pytest.importorskip("deepspeed")
    a, b = _spawn("monitor_zero3", tmp_path, timeout=180.0)
    assert a["steps"] == b["steps"] == [1, 2, 3] and not any(a["skipped"])
    oracle = _single_process(a["weights"], a["steps"])
    for got, want in zip(a["layers"], oracle):
        assert set(got) == set(want)
        for name, values in got.items():
            for metric in ("update_norm", "update_rel", "sigma1", "rho1", "stable_rank"):
                assert values[metric] == pytest.approx(want[name][metric], rel=1e-3, abs=1e-6), (name, metric)
    total = sum(t.numel() * t.element_size() for t in a["weights"][0].values())
    assert max(a["base_bytes"], b["base_bytes"]) < 0.75 * total  # each rank keeps its partitions only


@pytest.mark.distributed
def test_the_budget_schedule_is_the_same_on_every_rank(tmp_path):
    a, b = _spawn("monitor_budget", tmp_path)
    assert a["steps"] == b["steps"] and a["steps"][0] == 1 and a["steps"][-1] == 40 and len(a["steps"]) > 2
    assert a["main"] and not b["main"]  # rank 0 writes the sinks by default
