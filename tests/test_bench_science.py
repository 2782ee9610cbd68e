"""``benchmarks/bench_science.py``: its spectral numbers against numpy float64, its one-forward exact
match against Hugging Face's greedy ``generate``, its statistics by hand, and ``--quick`` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_science as bs  # noqa: E402


def test_spectrum_matches_numpy_on_known_singular_values():
    rng = np.random.default_rng(0)
    m, n = 40, 24
    U, _ = np.linalg.qr(rng.standard_normal((m, n)))
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    s = 3.0 * np.arange(1, n + 1, dtype=np.float64) ** -0.8  # a power-law-ish spectrum
    M = (U * s) @ V.T
    sp = bs.spectrum(torch.from_numpy(M).float())
    fro2 = np.sum(s**2)
    assert sp.fro == pytest.approx(math.sqrt(fro2), rel=1e-6)
    assert sp.rho1 == pytest.approx(s[0] ** 2 / fro2, rel=1e-5)
    assert sp.stable_rank == pytest.approx(fro2 / s[0] ** 2, rel=1e-5)
    assert sp.top4 == pytest.approx(np.sum(s[:4] ** 2) / fro2, rel=1e-5)
    assert sp.gap == pytest.approx(s[0] / s[1], rel=1e-5)
    p = s / s.sum()
    assert sp.erank == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-5)
    # u1 is the top left singular vector (up to sign)
    assert abs(float(sp.u1.numpy() @ U[:, 0])) == pytest.approx(1.0, abs=1e-5)
    # α is fitted to the eigenvalues σ², not to σ: the MLE for the reported tail, by hand
    lam = np.sort(s**2)[::-1][: sp.alpha_tail]
    assert sp.alpha_tail >= 2
    assert sp.alpha == pytest.approx(1 + len(lam) / np.sum(np.log(lam / lam[-1])), rel=1e-4)


def test_tail_tests_agree_with_the_powerlaw_package():
    pytest.importorskip("powerlaw")
    rng = np.random.default_rng(1)
    # singular values whose squares are Pareto (α = 2.5) samples: the power law beats an exponential
    eigs = np.sort(rng.pareto(1.5, 80) + 1.0)[::-1]
    U, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    V, _ = np.linalg.qr(rng.standard_normal((80, 80)))
    sp = bs.spectrum(torch.from_numpy((U * np.sqrt(eigs)) @ V.T))
    tests = bs.tail_tests(sp)
    # powerlaw's own MLE for the same x_min is the oracle of fit_power_law's α
    assert tests["alpha_pl"] == pytest.approx(sp.alpha, rel=1e-5)
    assert tests["R_exponential"] > 0 and tests["p_exponential"] < 0.1
    assert bs.tail_verdicts([tests], "exponential") == (1, 0, 0)
    assert bs.tail_verdicts([{}, {"R_lognormal": -1.0, "p_lognormal": 0.01}], "lognormal") == (0, 1, 1)


def test_spectrum_of_a_rank_one_update():
    u, v = torch.randn(30, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    sp = bs.spectrum(torch.outer(u, v))
    assert sp.rho1 == pytest.approx(1.0, abs=1e-12)
    assert sp.stable_rank == pytest.approx(1.0, abs=1e-12)
    assert sp.erank == pytest.approx(1.0, abs=1e-6)
    assert sp.gap > 1e6  # σ₂ is round-off
    assert abs(float(sp.u1 @ u / u.norm())) == pytest.approx(1.0, abs=1e-12)


def test_statistics_by_hand():
    assert bs.spread([1.0, 2.0, 6.0]) == (3.0, 1.0, 6.0)
    assert bs.spread([math.nan, 2.0, None]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(x) for x in bs.spread([math.nan]))
    assert bs.fmt_spread([0.5, 0.25, 0.75]) == "0.5 [0.25–0.75]"
    assert bs.fmt_spread([0.5]) == "0.5"
    assert bs.fmt_spread([0.5, 1.0], pct=True) == "75% [50%–100%]"
    assert bs.fmt_spread([]) == "-"
    assert bs.accuracy_se(0.5, 100) == pytest.approx(0.05)
    assert bs.accuracy_se(0.0, 100) == 0.0
    # lock-in: from step 20 on every cosine is >= 0.9 (the dip at 10 resets it)
    assert bs.lock_in_step([1, 5, 10, 20, 30], [0.95, 0.92, 0.5, 0.91, 0.99]) == 20
    assert bs.lock_in_step([1, 5], [0.95, 0.2]) is None
    assert bs.lock_in_step([1, 5], [0.95, 0.9]) == 1
    # half change: from 1.0 to 0.0; 0.5 of the way is reached at step 3 (value 0.4)
    assert bs.half_change_step([1, 2, 3, 4], [0.9, 0.6, 0.4, 0.0], 1.0) == 3
    assert bs.half_change_step([1, 2], [0.0, 2.0], 0.0) == 2
    assert bs.half_change_step([1, 2], [1.0, 1.0], 1.0) is None
    # paired standard error: 2 of 4 items flip (one each way): d = (1, -1, 0, 0), sd 1/sqrt(2), over sqrt(4)
    before, after = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 0, 1, 0])
    assert bs.paired_se(after, before) == pytest.approx(math.sqrt(0.5) / 2)
    assert bs.paired_se(before, before) == 0.0


@pytest.mark.slow  # builds a transformers GPT-2
def test_one_forward_exact_match_is_greedy_decoding():
    pytest.importorskip("transformers")
    from spectral_monitor.demo.tasks import PAD, Task, char_tokenizer, model

    torch.manual_seed(0)
    net = model(0).eval()
    with torch.no_grad():  # sharpen the random model so its greedy path is not a tie
        for p in net.parameters():
            p.mul_(3.0)
    tok = char_tokenizer()
    task = Task("+", 0, n_test=40)
    prompts = torch.tensor([tok(task.prompt(a, b))["input_ids"] for a, b in task.test])
    width = prompts.shape[1]
    # oracle: Hugging Face's greedy generate; its continuation is the "answer" of half the rows,
    # and the other half get one answer token changed
    out = net.generate(
        prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=4, min_new_tokens=4, do_sample=False,
        pad_token_id=PAD, eos_token_id=None,
    )  # fmt: skip
    labels = out.clone()
    labels[:, :width] = -100
    wrong = torch.arange(len(out)) % 2 == 1
    pos = width + torch.arange(len(out)) % 4
    changed = (out[wrong, pos[wrong]] + 1) % 17
    out[wrong, pos[wrong]] = changed
    labels[wrong, pos[wrong]] = changed
    hits = bs.exact_hits(net, out, labels)
    assert hits.tolist() == [i % 2 == 0 for i in range(len(out))]
    assert not net.training  # the mode is kept


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "science.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_science.py"), "--quick", "--out", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    titles = [t["title"] for t in data["tables"]]
    wanted = (
        "accuracies",
        "claim 1:",
        "claim 1 over time",
        "claim 2:",
        "claim 3:",
        "claim 4: the top",
        "claim 4: when",
    )
    for want in (*wanted, "forgetting: held-out", "forgetting: when", "runtime"):
        assert any(t.startswith(want) for t in titles), want
    runs = data["data"]["runs"]
    kinds = [r["kind"] for r in runs]
    assert kinds[:2] == ["grpo", "sft"] and set(kinds) <= {"grpo", "sft", "sft_matched"}
    for r in runs:
        steps = [c["step"] for c in r["checkpoints"]]
        assert steps == sorted(steps) and len(r["checkpoints"][-1]["layers"]) == 12
        sub = r["substitution"]
        # the unsubstituted model is the run's last checkpoint
        assert sub["trained/full/add_acc"] == r["checkpoints"][-1]["add_acc"]
        # the substitution's rank-1 energy share (its own SVD) is Σσ₁² / Σ‖ΔW‖² of the float64 spectra
        layers = r["checkpoints"][-1]["layers"].values()
        total = sum(v["fro"] ** 2 for v in layers)
        if r["kind"] != "grpo":  # a quick GRPO run may not move at all (no reward at a near-random base)
            want = sum(v["rho1"] * v["fro"] ** 2 for v in layers) / total
            assert sub["trained/rank1/energy_share"] == pytest.approx(want, rel=1e-4)
        # the demo's greedy accuracy() (the oracle) agrees with the one-forward exact match at the base
        greedy, one_forward = r["extra"]["greedy_check"]
        assert greedy == pytest.approx(one_forward, abs=1e-12)
    sft = next(r for r in runs if r["kind"] == "sft")
    layers = sft["checkpoints"][-1]["layers"].values()
    assert all(0.0 < v["rho1"] <= 1.0 and v["stable_rank"] == pytest.approx(1 / v["rho1"]) for v in layers)
    assert list(tmp_path.glob("base_seed0_*.pt"))  # the base is cached for reruns
