"""``benchmarks/bench_forgetting.py``: its statistics against independent oracles (pairwise AUROC counts,
hand-computed leads and patience, Hugging Face's own loss and ``generate``), and ``--quick`` end to end."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_forgetting as bf  # noqa: E402

from spectral_monitor import StepReport  # noqa: E402
from spectral_monitor.alerts import KnowledgeLoss  # noqa: E402


def pairwise_auroc(pos, neg):
    """The definition: share of (positive, negative) pairs ordered correctly, ties half."""
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_auroc_is_the_pairwise_share_with_ties_half():
    assert bf.auroc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(3.5 / 4)
    assert bf.auroc([1.0], [2.0]) == 0.0
    assert bf.auroc([5.0, 5.0], [5.0]) == 0.5
    rng = random.Random(0)
    for _ in range(20):
        pos = [rng.choice(range(8)) / 2 for _ in range(rng.randint(1, 12))]  # many ties
        neg = [rng.choice(range(8)) / 2 for _ in range(rng.randint(1, 12))]
        assert bf.auroc(pos, neg) == pytest.approx(pairwise_auroc(pos, neg), abs=1e-12)
    # non-finite values are dropped; an empty class gives NaN
    assert bf.auroc([1.0, math.nan], [0.0, math.inf]) == 1.0
    assert math.isnan(bf.auroc([], [1.0])) and math.isnan(bf.auroc([1.0], [math.nan]))


def make_run(name, seed, rows, base_loss=1.0):
    """A RunLog from (step, gt_loss, gt_em, {signal: value}, kl) rows; the report carries the probe's kl."""
    ms = []
    for step, loss, em, signals, kl in rows:
        report = StepReport(step=step, probes={"kl": kl})
        ms.append(bf.Measurement(step, loss, em, dict(signals), [], report))
    return bf.RunLog(bf.Scenario(name, {"add": 1.0}, 1e-3), seed, ms, base_loss, 1.0, 0.01)


def test_truths_threshold_lead_and_cross_seed_counts():
    # healthy runs reach rho1 0.5 (seed 0) and 0.7 (seed 1); the forgetting run crosses 0.7 at step 20,
    # its loss rises 20 % at step 30 (truth A) and its exact match falls to 0.9 at step 40 (truth B)
    h0 = make_run("h", 0, [(1, 1.0, 1.0, {"rho1_mean": 0.1}, 0), (10, 1.1, 1.0, {"rho1_mean": 0.5}, 0)])
    h1 = make_run("h", 1, [(1, 1.0, 1.0, {"rho1_mean": 0.2}, 0), (10, 1.0, 0.95, {"rho1_mean": 0.7}, 0)])
    f0 = make_run(
        "f",
        0,
        [
            (1, 1.0, 1.0, {"rho1_mean": 0.1}, 0),
            (10, 1.1, 1.0, {"rho1_mean": 0.6}, 0),
            (20, 1.19, 1.0, {"rho1_mean": 0.8}, 0),
            (30, 1.2, 0.95, {"rho1_mean": 0.9}, 0),
            (40, 2.0, 0.9, {"rho1_mean": 0.95}, 0),
        ],
    )
    a, b = bf.TRUTHS
    assert (a.step(h0), a.step(h1), a.step(f0)) == (None, None, 30)
    assert (b.step(h0), b.step(h1), b.step(f0)) == (None, None, 40)
    runs = [h0, h1, f0]
    _, data = bf.signal_table(runs, a, early=10)
    d = data["rho1_mean"]
    assert d["quiet_threshold"] == 0.7
    assert d["caught"] == 1 and d["leads"] == [30 - 20]
    # end values: forgetting 0.95 vs healthy 0.5, 0.7 -> 1; at step 10: 0.6 vs 0.5, 0.7 -> 0.5
    assert d["auroc_end"] == 1.0 and d["auroc_early"] == 0.5 and d["auroc_end_runs"] == [1, 2]
    # pooled: 'forgotten now' at steps 30, 40 (0.9, 0.95) vs the other 7 measurements (all lower)
    assert d["auroc_pooled"] == 1.0
    # cross-seed: seed 0 gets seed 1's threshold 0.7 (f0 fires, h0 quiet); seed 1 gets 0.5 (h1 fires at 0.7)
    assert (d["cv_caught"], d["cv_false_alarms"]) == (1, 1)
    # a "low" signal is negated: erank falls below every healthy value at step 20
    for r, values in ((h0, [9, 8]), (h1, [9, 7]), (f0, [9, 8, 6, 5, 4])):
        for m, v in zip(r.measurements, values):
            m.signals["erank_mean"] = v
    _, data = bf.signal_table(runs, a, early=10)
    assert data["erank_mean"]["quiet_threshold"] == 7 and data["erank_mean"]["leads"] == [10]
    # truth B: f0 forgets at step 40, so the same crossing at step 20 leads by 20
    _, data_b = bf.signal_table(runs, b, early=10)
    assert data_b["rho1_mean"]["leads"] == [20]


def test_rule_replay_applies_patience_and_counts_false_alarms():
    kl = [0.1, 0.3, 0.3, 0.1, 0.3, 0.3, 0.3]
    run = make_run("f", 0, [(10 * i + 10, 1.0, 1.0 if i < 4 else 0.5, {}, k) for i, k in enumerate(kl)])
    quiet = make_run("h", 0, [(10, 1.0, 1.0, {}, 0.3), (20, 1.0, 1.0, {}, 0.1), (30, 1.0, 1.0, {}, 0.3)])
    # patience 2: the second and later consecutive hits fire -> steps 30, 60, 70; a lone hit never does
    assert bf.replay([KnowledgeLoss(kl=0.2, loss_rise=None)], run) == {"knowledge_loss": [30, 60, 70]}
    assert bf.replay([KnowledgeLoss(kl=0.2, loss_rise=None)], quiet) == {"knowledge_loss": []}
    noisy = make_run("h", 1, [(10, 1.0, 1.0, {}, 0.3), (20, 1.0, 1.0, {}, 0.3)])
    fired = {r.name: bf.replay([KnowledgeLoss(kl=0.2, loss_rise=None)], r)["knowledge_loss"] for r in (run, noisy)}
    cells, d = bf.rule_row([run, quiet, noisy], bf.TRUTHS[1], lambda r: fired.get(r.name, []))
    # run forgets (EM 0.5) at step 50, the rule first fires at 30: lead +20; `noisy` is a false alarm
    assert d == {"detections": 1, "false_alarms": 1, "leads": [20], "at_or_before_truth": 1}
    assert cells[:2] == ["1/1", "1/2"]


def test_round_up_is_a_round_number_above_one_and_a_half_times():
    assert bf.round_up(0.2) == pytest.approx(0.3)
    assert bf.round_up(0.31) == pytest.approx(0.5)
    assert bf.round_up(0.7) == pytest.approx(1.5)
    assert math.isnan(bf.round_up(0.0)) and math.isnan(bf.round_up(math.nan))


@pytest.mark.slow  # importing transformers alone takes ~5-9 s on the shared machine
def test_ground_truth_and_own_probe_against_hugging_face():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = bf.build_model({"n_layer": 1, "n_embd": 32}).eval()
    tok = bf.CharTokenizer()
    pairs = [(3, 4), (12, 88), (99, 99), (50, 7)]
    gt = bf.GroundTruth(tok, pairs)
    loss, em = gt(model)
    # oracle: HF's own shifted loss with the prompt masked, and greedy decoding by generate()
    ids = gt.ids
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        assert loss == pytest.approx(float(model(input_ids=ids, labels=labels).loss), rel=1e-5)
        out = model.generate(ids[:, :6], max_new_tokens=3, do_sample=False, pad_token_id=bf.PAD)
    assert em == sum(out[i, 6:].tolist() == ids[i, 6:].tolist() for i in range(len(pairs))) / len(pairs)
    # the own-data probe: prompts of two lengths, only the 3 generated tokens count, 0 KL at the base
    prompts = [bf.prompt_answer("add", 1, 2)[0], bf.prompt_answer("new", 5, 9)[0], bf.prompt_answer("max", 3, 3)[0]]
    batches = bf.continuation_batches(tok, model, prompts)
    assert sorted(b["input_ids"].shape[1] for b in batches) == [9, 10]
    assert sum(int((b["labels"] != -100).sum()) for b in batches) == 3 * len(prompts)
    probe = bf.Probe(batches)
    probe.start(model)
    assert probe.measure(model).kl == pytest.approx(0.0, abs=1e-7)


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "json.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_forgetting.py"), "--quick", "--threads", "1", "--out", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    titles = [t["title"] for t in data["tables"]]
    for want in ("the base", "ground truth per run", "signals vs truth A", "signals vs truth B", "rules as run",
                 "what the default thresholds need", "what-if rules", "cost per measurement"):  # fmt: skip
        assert any(t.startswith(want) for t in titles), want
    runs = data["data"]["runs"]
    assert len(runs) == 4  # 2 scenarios x 2 seeds
    assert all([m["step"] for m in r["measurements"]] == [1, 10, 20, 30] for r in runs)
    for r in runs:  # every measurement carries the spectra, the held-out probe and the own-data KL
        signals = r["measurements"][-1]["signals"]
        assert {"rho1_mean", "update_rel_max", "probe_kl", "probe_loss_rel", "own_kl"} <= set(signals)
    rules = data["data"]["rules"]["A"]
    assert set(rules) == {"nonfinite_weights", "update_norm_blowup", "knowledge_loss", "rank1_collapse",
                          "alpha_out_of_band", "intruder_dimensions", "erank_drop"}  # fmt: skip
    assert list(tmp_path.glob("base_*.pt"))  # the base is cached for reruns
    assert len(list((tmp_path / "runs").glob("*/metrics.jsonl"))) == 4
