"""Whole-model ΔW scan: WeightWatcher delta analysis vs a lean full-spectrum pass vs SpectralMonitor.measure().

Model: ``GPT2LMHeadModel(GPT2Config())`` (GPT-2 small sizes, random init, no download). Layers: the
48 block matrices ``transformer.h.{0..11}.attn.c_attn`` (768x2304), ``.attn.c_proj`` (768x768),
``.mlp.c_fc`` (768x3072), ``.mlp.c_proj`` (3072x768) -- exactly what the monitor's default
``layers="all-linear"`` selects on this model (checked at run time); embeddings and ``lm_head`` are
out.

Update (per layer, canonical out x in orientation, seeded): ΔW = U diag(s) V^T + E with 2-24 random
orthonormal directions (s_1 = 3-10x the noise bulk's edge, s_j = s_1 j^-0.6) and dense Gaussian
noise E of std 1.5e-4..6e-4 (||ΔW||_F / ||W_0||_F about 2%, a typical fine-tuning size).
Later measurements see a further small update (10% of the first one's size), as in training.

Contenders, same process, same machine:

(a) ``ww.WeightWatcher(model=tuned).analyze(base_model=base, layers=<ids of the 48 layers>,
    plot=False, randomize=False, mp_fit=False, vectors=False, detX=False)`` -- WeightWatcher's delta
    analysis (per layer: W_tuned - W_base in float32 NumPy, full float64 SciPy SVD, power-law fit
    with its own 'ww' fitter on the eigenvalues > 1e-5, norm metrics). Layers are selected by WW
    layer id (= index in ``model.named_modules()``, ``start_ids=0``), since WW's layer *names* are
    the last name component ('c_proj' twice per block).
(b) the lean full-spectrum pass a careful user would write: per layer ΔW in float32, the Gram
    matrix of the smaller side, ``torch.linalg.eigvalsh``; then one batched
    ``fit_power_law(eigs, min_tail=1)`` over all 48 spectra.
(c) ``SpectralMonitor(model, MonitorConfig(...)).measure(step)``: the DEFAULT config, and with
    ``intruders=False``. The first measurement includes one-off work (W_0's SVD for base
    alignment, ||W_0||); later ones are steady state (warm-started). With ``adaptive_rank`` a layer
    whose tail the top-k does not cover gets k doubled for the next measurement, so ranks are
    printed per measurement.
(d) alpha agreement: our default measurement on layers it marks ``alpha_reliable`` (covered,
    n_tail >= 10, D <= 0.1), and a definition-matched run of ours (``full_every=1,
    alpha_min_tail=1``: whole spectrum, KS-optimal x_min like WW) on every layer.

Also: achieved fp32 GFLOP/s of a 4096^3 matmul here vs the scan's matmul FLOPs, a per-phase
profile of measure(), and a 4096-wide variant (four Llama-7B matrices: q_proj, o_proj 4096x4096,
up_proj 11008x4096, down_proj 4096x11008) for (b) vs (c) only (WW's float64 SVDs would take minutes
there).

Run: ``python benchmarks/bench_scan.py [--quick] [--threads N] [--json out.json]``
(``--quick``: 12 layers of 3 blocks, WW on those, no 4096 variant.)
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import statistics
import time

import torch
from _common import (
    PhaseProfile,
    base_parser,
    fmt_g,
    fmt_s,
    loadavg,
    machine_info,
    matmul_gflops,
    print_machine,
    print_table,
    write_json,
)
from torch import nn

from spectral_monitor import MonitorConfig, SpectralMonitor
from spectral_monitor.functional import fit_power_law

BLOCK_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


# ----------------------------------------------------------------------------- models and updates
def gpt2_pair(n_blocks: int, seed: int = 0) -> tuple[nn.Module, nn.Module, list[str]]:
    """(base, tuned, layer names): GPT-2 small from config, tuned = base + realistic update."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    base = GPT2LMHeadModel(GPT2Config(n_layer=n_blocks)).eval()
    names = [n for n, _ in base.named_modules() if n.endswith(BLOCK_SUFFIXES)]
    tuned = copy.deepcopy(base)
    apply_update(tuned, names, seed=seed + 1, scale=1.0)
    return base, tuned, names


class LlamaBlock7B(nn.Module):
    """Four of a Llama-7B decoder block's matrices as bias-free Linears with Llama's names:
    q_proj, o_proj (4096x4096), up_proj (11008x4096), down_proj (4096x11008)."""

    def __init__(self) -> None:
        super().__init__()
        h, f = 4096, 11008
        self.self_attn = nn.Module()
        for name in ("q_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(h, h, bias=False, device="meta"))
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(h, f, bias=False, device="meta")
        self.mlp.down_proj = nn.Linear(f, h, bias=False, device="meta")


def llama_pair(seed: int = 0) -> tuple[nn.Module, nn.Module, list[str]]:
    g = torch.Generator().manual_seed(seed)
    base = nn.Module()
    base.layers = nn.ModuleList([LlamaBlock7B()])
    base.to_empty(device="cpu")
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02, generator=g)
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    tuned = copy.deepcopy(base)
    apply_update(tuned, names, seed=seed + 1, scale=1.0)
    return base, tuned, names


def realistic_update(m: int, n: int, g: torch.Generator, scale: float) -> torch.Tensor:
    """(m, n) update: 2-24 low-rank directions above a dense Gaussian noise bulk (module doc)."""
    r = int(torch.randint(2, 25, (1,), generator=g))
    noise_std = float(1.5e-4 * 4 ** torch.rand(1, generator=g)) * scale
    edge = noise_std * (math.sqrt(m) + math.sqrt(n))
    s1 = edge * float(3 + 7 * torch.rand(1, generator=g))
    s = s1 * torch.arange(1, r + 1, dtype=torch.float32) ** -0.6
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    return torch.randn(m, n, generator=g).mul_(noise_std).addmm_(U * s, V.T)


@torch.no_grad()
def apply_update(model: nn.Module, names: list[str], *, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    for name in names:
        w = mods[name].weight
        conv1d = type(mods[name]).__name__ == "Conv1D"  # stored (in, out)
        m, n = (w.shape[1], w.shape[0]) if conv1d else tuple(w.shape)
        d = realistic_update(m, n, g, scale)
        w.add_(d.T if conv1d else d)


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    for p, q in zip(dst.parameters(), src.parameters()):
        p.copy_(q)


def canonical(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach()
    return w.T if type(mod).__name__ == "Conv1D" else w


# ----------------------------------------------------------------------------- contenders
def run_ww(base: nn.Module, tuned: nn.Module, names: list[str]):
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with contextlib.redirect_stderr(io.StringIO()):
        import weightwatcher as ww
    all_names = [n for n, _ in tuned.named_modules()]
    ids = [all_names.index(n) for n in names]  # WW layer_id with start_ids=0
    c0, t0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # base_model must reach WW with the model: analyze(base_model=...) alone on a watcher built
        # with WeightWatcher(model=tuned) is silently ignored (WeightWatcher.set_model_ only sets
        # base_model when a model is passed in the same call) and WW analyses W_tuned, not ΔW.
        watcher = ww.WeightWatcher(model=tuned, base_model=base)
        details = watcher.analyze(
            model=tuned,
            base_model=base,
            layers=ids,
            plot=False,
            randomize=False,
            mp_fit=False,
            vectors=False,
            detX=False,
        )
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    got = list(details["longname"])
    if got != names:
        raise RuntimeError(f"WW analysed other layers than asked: {got[:4]}... vs {names[:4]}...")
    out = {
        row.longname: {
            "alpha": float(row.alpha),
            "xmin": float(row.xmin),
            "n_tail": int(row.num_pl_spikes),
            "D": float(row.D),
        }
        for row in details.itertuples()
    }
    for row in details.itertuples():
        out[row.longname]["lambda_max"] = float(row.lambda_max)
    return dt, cpu, out, ww.__version__


@torch.no_grad()
def lean_pass(base: nn.Module, tuned: nn.Module, names: list[str], *, min_tail: int = 1):
    """Per layer ΔW, Gram of the smaller side, eigvalsh; one batched power-law fit."""
    bm, tm = dict(base.named_modules()), dict(tuned.named_modules())
    eigs = []
    for name in names:
        D = canonical(tm[name]).float() - canonical(bm[name]).float()
        G = D @ D.T if D.shape[0] <= D.shape[1] else D.T @ D
        eigs.append(torch.linalg.eigvalsh(G))
    k = max(e.shape[0] for e in eigs)
    batch = torch.stack([torch.nn.functional.pad(e, (k - e.shape[0], 0)) for e in eigs])  # 0 = ignored
    fit = fit_power_law(batch, min_tail=min_tail)
    return {
        n: {
            "alpha": float(fit.alpha[i]),
            "n_tail": int(fit.n_tail[i]),
            "xmin": float(fit.xmin[i]),
            "lambda_max": float(eigs[i][-1]),
            "eigs": eigs[i],
        }
        for i, n in enumerate(names)
    }


def lean_gflop(shapes: list[tuple[int, int]]) -> float:
    return sum(2 * m * n * min(m, n) for m, n in shapes) / 1e9


def scan_gflop(monitor: SpectralMonitor, *, first: bool) -> float:
    """Matmul FLOPs of one measure(): 2(q+1) products of the m x n matrix with an n x l or m x l
    block per randomized SVD (l = rank + oversample): ΔW's; W_0's on the first measurement (rank
    base_k); plus, for intruders, the one product of W_t with 15 columns."""
    from spectral_monitor import engine

    cfg = monitor.config
    warm_niter = getattr(cfg, "warm_niter", None)
    q_delta = cfg.niter if first or warm_niter is None else warm_niter
    top = getattr(engine, "INTRUDER_TOP", 10)
    intr_over = getattr(engine, "INTRUDER_OVERSAMPLE", cfg.oversample)
    total = 0.0
    for spec in monitor.specs:
        m, n = spec.shape
        rank = monitor._state(spec).rank
        work = [(q_delta, min(rank + cfg.oversample, m, n))]
        if cfg.intruders:  # one product W_t Ω: counted as half of a q = 0 randomized SVD
            total += 2 * m * n * min(top + intr_over, m, n)
        if first:
            work.append((cfg.niter, min(cfg.base_k + cfg.oversample, m, n)))
        total += sum((2 * q + 2) * 2 * m * n * l for q, l in work)
    return total / 1e9


def run_monitor(
    base: nn.Module,
    tuned: nn.Module,
    cfg: MonitorConfig,
    *,
    measurements: int,
    profile_at: int | None,
    drift_seed: int,
    names: list[str],
    exact_at: int | None = None,
):
    """Fresh model at the base, snapshot, load the tuned weights, measure ``measurements`` times
    (a further small update between measurements). Returns per-measurement dicts and reports."""
    model = copy.deepcopy(base)
    monitor = SpectralMonitor(model, cfg)
    selected = [s.name for s in monitor.specs]
    if selected != names:
        raise RuntimeError(f"monitor selected {len(selected)} layers, expected the {len(names)} block matrices")
    t0 = time.perf_counter()
    monitor.snapshot()
    snap_s = time.perf_counter() - t0
    copy_weights(model, tuned)
    rows, reports, profile = [], [], None
    for i in range(1, measurements + 1):
        if i > 1:
            apply_update(model, names, seed=drift_seed + i, scale=0.1)
        ranks = [monitor._state(s).rank for s in monitor.specs]
        gflop = scan_gflop(monitor, first=(i == 1))
        c0 = time.process_time()
        if profile_at == i:
            with PhaseProfile("cpu") as prof:
                rep = monitor.measure(i)
            profile = (prof, rep.elapsed_s)
        else:
            rep = monitor.measure(i)
        cpu = time.process_time() - c0
        reports.append(rep)
        if exact_at == i:  # exact spectra of the weights this measurement saw (outside the timing)
            rep.exact = lean_pass(base, model, names)
        rows.append(
            {
                "measurement": i,
                "measure_s": rep.elapsed_s,
                "cpu_s": cpu,
                "gflop": gflop,
                "profiled": profile_at == i,
                "rank_histogram": {str(r): ranks.count(r) for r in sorted(set(ranks))},
            }
        )
    nbytes = monitor.store.nbytes
    del model, monitor
    return {"snapshot_s": snap_s, "rows": rows}, reports, profile, nbytes


# ----------------------------------------------------------------------------- agreement
def agreement(ours: dict[str, float], ref: dict[str, float], layers: list[str]) -> dict:
    diffs = [abs(ours[n] - ref[n]) / abs(ref[n]) for n in layers if math.isfinite(ours[n]) and math.isfinite(ref[n])]
    if not diffs:
        return {"layers": 0}
    return {
        "layers": len(diffs),
        "max_rel": max(diffs),
        "median_rel": statistics.median(diffs),
        "within_2pct": sum(d <= 0.02 for d in diffs),
    }


def sigma_accuracy(rep, exact: dict, names: list[str]) -> dict:
    """Relative error of a report's randomized top-k singular values against exact ones."""
    errs, errs_tail = [], []
    rel, tails = rep.layer_values("alpha_reliable"), rep.layer_values("alpha_tail")
    for n in names:
        S = rep.spectra[n].double()
        ex = exact[n]["eigs"].flip(0)[: S.shape[0]].clamp_min(0).double().sqrt()
        rel_err = ((S - ex).abs() / ex).tolist()
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


def fmt_agree(a: dict) -> list[str]:
    if not a.get("layers"):
        return ["0", "-", "-", "-"]
    return [str(a["layers"]), fmt_g(a["median_rel"], 2), fmt_g(a["max_rel"], 2), f"{a['within_2pct']}/{a['layers']}"]


def timed(fn, repeats: int) -> dict:
    """Wall and process-CPU times of ``repeats`` calls (no warm-up here; callers warm up)."""
    wall, cpu, out = [], [], None
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "best_s": min(wall),
        "median_s": statistics.median(wall),
        "times": wall,
        "cpu_best_s": min(cpu),
        "cpu_times": cpu,
        "out": out,
    }


def tt(best: float, median: float | None = None) -> str:
    return fmt_s(best) if median is None or median == best else f"{fmt_s(best)} / {fmt_s(median)}"


def summarize(res: dict) -> dict:
    """First and steady-state (later, unprofiled) measurement times of one monitor run."""
    first, later = res["rows"][0], res["rows"][1:]
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


def ratio(a: float | None, b: float | None) -> str:
    return fmt_g(a / b) if a and b else "-"


def monitor_rows(
    name: str, sm: dict, refs: list[tuple[float | None, float | None]], steady: str = "steady"
) -> list[list[str]]:
    """The first and steady table rows of one monitor config (``sm``: :func:`summarize`): wall,
    CPU time, the wall and CPU ratio against each reference ``(wall_s, cpu_s)``, GFLOP, GFLOP/s."""
    out = []
    for phase, label, wall_s, wall, cpu_s in (
        ("first", "first", sm["first_s"], fmt_s(sm["first_s"]), sm["first_cpu_s"]),
        (
            "steady",
            steady,
            sm["steady_best_s"],
            tt(sm["steady_best_s"], sm["steady_median_s"]),
            sm["steady_cpu_best_s"],
        ),
    ):
        ratios = [r for ref_wall, ref_cpu in refs for r in (ratio(ref_wall, wall_s), ratio(ref_cpu, cpu_s))]
        gflop = sm[f"{phase}_gflop"]
        out.append(
            [f"(c) measure() [{name}], {label}", wall, fmt_s(cpu_s), *ratios, f"{gflop:.0f}", f"{gflop / wall_s:.0f}"]
        )
    return out


def rank_line(res: dict) -> str:
    return "; ".join(
        f"#{r['measurement']}: " + ", ".join(f"{c} at rank {k}" for k, c in r["rank_histogram"].items())
        for r in res["rows"]
    )


def main() -> None:
    p = base_parser(__doc__.splitlines()[0], device=False)
    p.add_argument("--skip-ww", action="store_true", help="leave WeightWatcher out")
    p.add_argument("--skip-4096", action="store_true", help="leave the 4096-wide variant out")
    args = p.parse_args()
    info = machine_info("cpu")
    print_machine(info, "bench_scan: whole-model ΔW scan")
    results: dict = {"machine": info, "args": vars(args)}

    peak = matmul_gflops("cpu", 4096, repeats=3)
    peak16 = matmul_gflops("cpu", 4096, repeats=3, dtype=torch.bfloat16)
    results["matmul_gflops_fp32_4096"], results["matmul_gflops_bf16_4096"] = peak, peak16
    auto = SpectralMonitor(nn.Linear(2, 2))._sketch_dtype(torch.device("cpu"))
    print(
        f"   matmul 4096^3 here: fp32 {peak:.0f} GFLOP/s (the ceiling used below), bf16 {peak16:.0f} GFLOP/s "
        f"(median of 3); the monitor's sketch dtype (auto): {auto}",
        flush=True,
    )

    n_blocks = 3 if args.quick else 12
    base, tuned, names = gpt2_pair(n_blocks)
    bmods, tmods = dict(base.named_modules()), dict(tuned.named_modules())
    shapes = [tuple(canonical(bmods[n]).shape) for n in names]
    print(
        f"   GPT-2 small, {n_blocks} blocks: {len(names)} layers ({sum(m * n for m, n in shapes) / 1e6:.1f} M "
        f"weights): transformer.h.*.{{{', '.join(BLOCK_SUFFIXES)}}}",
        flush=True,
    )
    w0 = sum(float(canonical(bmods[n]).square().sum()) for n in names)
    dw = sum(float((canonical(tmods[n]) - canonical(bmods[n])).square().sum()) for n in names)
    print(f"   update size: ||ΔW||_F / ||W_0||_F over these layers = {math.sqrt(dw / w0):.4f}", flush=True)

    # (a) WeightWatcher, one run
    ww_out, ww_s, ww_cpu = None, None, None
    if not args.skip_ww:
        ww_s, ww_cpu, ww_out, ww_version = run_ww(base, tuned, names)
        print(
            f"   (a) WeightWatcher {ww_version} delta analyze(): {fmt_s(ww_s)} wall, {fmt_s(ww_cpu)} CPU "
            f"(1 run; load {loadavg()})",
            flush=True,
        )
        results["ww"] = {"seconds": ww_s, "cpu_s": ww_cpu, "version": ww_version, "layers": ww_out}

    # (b) lean pass: 1 warm-up on two layers, 3 timed
    lean_pass(base, tuned, names[:2])
    lt = timed(lambda: lean_pass(base, tuned, names), 3)
    lean = lt.pop("out")
    print(
        f"   (b) lean pass: {tt(lt['best_s'], lt['median_s'])} wall (best / median of 3), "
        f"{fmt_s(lt['cpu_best_s'])} CPU (load {loadavg()})",
        flush=True,
    )
    results["lean"] = {**lt, "gflop": lean_gflop(shapes)}
    if ww_out:  # WW really analysed ΔW (not W_tuned): its lambda_max is ΔW's
        bad = [n for n in names if abs(ww_out[n]["lambda_max"] / lean[n]["lambda_max"] - 1) > 1e-3]
        if bad:
            raise RuntimeError(f"WW's lambda_max differs from ΔW's on {bad[:3]}: WW did not analyse ΔW")

    # (c) our monitor, on a fresh copy of the model each
    n_meas = 3 if args.quick else 4
    matched_label = "WW-matched: full_every=1, alpha_min_tail=1, intruders=False"
    configs = {
        "default": (MonitorConfig(), n_meas, n_meas),
        "intruders=False": (MonitorConfig(intruders=False), n_meas, n_meas),
        "warm_niter=0 (intruders on)": (MonitorConfig(warm_niter=0), 3, None),
        "sketch_dtype=float32": (MonitorConfig(sketch_dtype="float32"), 3, None),
        matched_label: (MonitorConfig(full_every=1, alpha_min_tail=1, intruders=False), 3, 3),
    }
    mon, reports, profiles = {}, {}, {}
    for label, (cfg, count, prof_at) in configs.items():
        res, reps, prof, store_bytes = run_monitor(
            base,
            tuned,
            cfg,
            measurements=count,
            profile_at=prof_at,
            drift_seed=100,
            names=names,
            exact_at=2 if label == "default" else None,
        )
        res["store_nbytes"] = store_bytes
        res["summary"] = summarize(res)
        mon[label], reports[label] = res, reps
        if prof is not None:
            profiles[label] = prof
        ts = ", ".join(f"#{r['measurement']}: {fmt_s(r['measure_s'])} ({fmt_s(r['cpu_s'])} CPU)" for r in res["rows"])
        print(
            f"   (c) SpectralMonitor [{label}]: snapshot {fmt_s(res['snapshot_s'])}; measure() {ts} (load {loadavg()})",
            flush=True,
        )
    results["monitor"] = mon

    # ---- timing table
    print(f"\n-- whole-model ΔW scan, GPT-2 small: {len(names)} block matrices")
    hdr = [
        "contender",
        "wall (best / median)",
        "CPU time",
        "vs WW (wall)",
        "vs WW (CPU)",
        "vs lean (wall)",
        "vs lean (CPU)",
        "matmul GFLOP",
        "GFLOP/s (wall)",
    ]
    rows = []
    if ww_s:
        rows.append(["(a) WeightWatcher delta analyze()", fmt_s(ww_s), fmt_s(ww_cpu), "1", "1", "-", "-", "-", "-"])
    lg = lean_gflop(shapes)
    rows.append(
        [
            "(b) lean pass: ΔW, Gram, eigvalsh, batched fit",
            tt(lt["best_s"], lt["median_s"]),
            fmt_s(lt["cpu_best_s"]),
            ratio(ww_s, lt["best_s"]),
            ratio(ww_cpu, lt["cpu_best_s"]),
            "1",
            "1",
            f"{lg:.0f}",
            f"{lg / lt['best_s']:.0f}",
        ]
    )
    summary = {"matmul_peak_gflops": peak}
    for label in configs:
        sm = mon[label]["summary"]
        summary[label] = {
            **sm,
            "first_vs_ww": ww_s / sm["first_s"] if ww_s else None,
            "steady_vs_ww": ww_s / sm["steady_best_s"] if ww_s else None,
            "steady_vs_ww_cpu": ww_cpu / sm["steady_cpu_best_s"] if ww_s else None,
            "first_vs_lean": lt["best_s"] / sm["first_s"],
            "steady_vs_lean": lt["best_s"] / sm["steady_best_s"],
            "steady_vs_lean_cpu": lt["cpu_best_s"] / sm["steady_cpu_best_s"],
            "steady_gflops": sm["steady_gflop"] / sm["steady_best_s"],
            "steady_fraction_of_peak": sm["steady_gflop"] / sm["steady_best_s"] / peak,
        }
        short = "WW-matched (full spectrum)" if label == matched_label else label
        rows.extend(monitor_rows(short, sm, [(ww_s, ww_cpu), (lt["best_s"], lt["cpu_best_s"])]))
    print_table(hdr, rows)
    print(
        f"   matmul ceilings here: fp32 {peak:.0f}, bf16 {peak16:.0f} GFLOP/s (the GFLOP/s column counts the "
        f"monitor's bf16 products like float32 ones). 'steady' = measurements #2..#{n_meas} except a "
        f"profiled one (the WW-matched run: #2). Ratios use best runs. matmul GFLOP counts the randomized "
        "SVDs' products only (rsvd ΔW, + W_t for intruders, + W_0 on the first); the lean pass's is its Gram."
    )
    for label, res in mon.items():
        print(f"   ranks [{label}]: {rank_line(res)}")
    results["summary"] = summary

    # ---- profile
    for label, (prof, measure_s) in profiles.items():
        print(f"\n-- where measure() spends its time [{label}], last measurement (profiled run, wall)")
        print_table(["phase", "time", "share", "calls"], prof.table(measure_s))
        results.setdefault("profile", {})[label] = {"measure_s": measure_s, "phases": prof.totals, "calls": prof.calls}

    # ---- agreement
    rep_def, rep_match = reports["default"][0], reports[matched_label][0]
    alpha_def, reliable = rep_def.layer_values("alpha"), rep_def.layer_values("alpha_reliable")
    tails = rep_def.layer_values("alpha_tail")
    alpha_match = rep_match.layer_values("alpha")
    lean_alpha = {n: v["alpha"] for n, v in lean.items()}
    rel_layers = [n for n in names if reliable.get(n) == 1.0]
    refs = [("WW", {n: v["alpha"] for n, v in ww_out.items()})] if ww_out else []
    refs.append(("lean pass", lean_alpha))
    arows, agree = [], {}
    for ref_name, ref in refs:
        a1, a2 = agreement(alpha_def, ref, rel_layers), agreement(alpha_match, ref, names)
        agree[f"default_reliable_vs_{ref_name}"], agree[f"matched_vs_{ref_name}"] = a1, a2
        arows.append([f"ours default, layers marked alpha_reliable, vs {ref_name}", *fmt_agree(a1)])
        arows.append([f"ours WW-matched (full spectrum, min_tail=1), all layers, vs {ref_name}", *fmt_agree(a2)])
    # the default fit's definition on EXACT eigenvalues: top-k of the lean pass's spectrum, same settings
    dcfg = MonitorConfig()
    exact_top = torch.stack([lean[n]["eigs"].flip(0)[: dcfg.rank] for n in names])
    totals = {lean[n]["eigs"].shape[0] for n in names}
    ex_fit = fit_power_law(exact_top, min_tail=dcfg.alpha_min_tail, max_ks=dcfg.alpha_max_ks, total=max(totals))
    alpha_ex = {n: float(ex_fit.alpha[i]) for i, n in enumerate(names)}
    ex_rel = [n for i, n in enumerate(names) if bool(ex_fit.reliable[i])]
    if ww_out:
        a4 = agreement(alpha_ex, refs[0][1], ex_rel)
        a5 = agreement(alpha_def, alpha_ex, [n for n in rel_layers if n in ex_rel])
        agree["exact_topk_default_fit_reliable_vs_WW"], agree["default_vs_exact_topk_fit"] = a4, a5
        arows.append(
            [
                f"same fit (top-{dcfg.rank}, min_tail={dcfg.alpha_min_tail}) on EXACT eigenvalues, its "
                "reliable layers, vs WW",
                *fmt_agree(a4),
            ]
        )
        arows.append(
            ["ours default vs that exact-eigenvalue fit (isolates the randomized SVD's error)", *fmt_agree(a5)]
        )
        a3 = agreement(lean_alpha, refs[0][1], names)
        agree["lean_vs_WW"] = a3
        arows.append(["lean pass vs WW, all layers", *fmt_agree(a3)])
    # accuracy of measure() #1's randomized top-k singular values against the exact ones
    sigma_acc = sigma_accuracy(rep_def, lean, names)
    agree["rsvd_sigma_rel_err_measure1"] = sigma_acc
    # steady state (#2, warm-started, after a further small update) against that step's exact spectra
    rep2 = reports["default"][1]
    exact2 = getattr(rep2, "exact", None)
    sigma_acc2 = None
    if exact2 is not None:
        sigma_acc2 = sigma_accuracy(rep2, exact2, names)
        agree["rsvd_sigma_rel_err_measure2"] = sigma_acc2
        alpha2, rel2 = rep2.layer_values("alpha"), rep2.layer_values("alpha_reliable")
        rel2_layers = [n for n in names if rel2.get(n) == 1.0]
        ex2_top = torch.stack([exact2[n]["eigs"].flip(0)[: dcfg.rank] for n in names])
        ex2_fit = fit_power_law(ex2_top, min_tail=dcfg.alpha_min_tail, max_ks=dcfg.alpha_max_ks, total=max(totals))
        alpha_ex2 = {n: float(ex2_fit.alpha[i]) for i, n in enumerate(names)}
        a6 = agreement(alpha2, {n: v["alpha"] for n, v in exact2.items()}, rel2_layers)
        a7 = agreement(
            alpha2, alpha_ex2, [n for i, n in enumerate(names) if n in rel2_layers and bool(ex2_fit.reliable[i])]
        )
        agree["measure2_reliable_vs_full_spectrum_fit"], agree["measure2_vs_exact_topk_fit"] = a6, a7
        arows.append(
            [
                "measure() #2 (warm start), reliable layers, vs the full-spectrum (WW-definition) fit of "
                "that step's exact eigenvalues",
                *fmt_agree(a6),
            ]
        )
        arows.append(
            ["measure() #2 (warm start) vs the same top-k fit on that step's exact eigenvalues", *fmt_agree(a7)]
        )
    print("\n-- alpha agreement (measurement #1: the weights WW saw)")
    print_table(["comparison", "layers", "median rel diff", "max rel diff", "within 2%"], arows)
    print(
        f"   measure() #1's randomized sigma_1..sigma_k vs exact (all layers): median rel err "
        f"{sigma_acc['median']:.2g}, 90th pct {sigma_acc['p90']:.2g}, max {sigma_acc['max']:.2g}; max within the "
        f"fitted tails of reliable layers {fmt_g(sigma_acc['max_within_fitted_tails'], 2)}"
    )
    if sigma_acc2 is not None:
        print(
            f"   measure() #2's (warm-started) sigma_1..sigma_k vs exact: median rel err {sigma_acc2['median']:.2g}, "
            f"90th pct {sigma_acc2['p90']:.2g}, max {sigma_acc2['max']:.2g}; max within fitted tails "
            f"{fmt_g(sigma_acc2['max_within_fitted_tails'], 2)}"
        )
    print(
        f"   default config: {len(rel_layers)}/{len(names)} layers alpha_reliable at #1 (tail covered by the "
        f"top-{MonitorConfig().rank}, n_tail >= {MonitorConfig().alpha_min_tail}, D <= {MonitorConfig().alpha_max_ks})"
    )
    if ww_out:
        ww_tails = sorted(v["n_tail"] for v in ww_out.values())
        inside = sum(t <= MonitorConfig().rank - 1 for t in ww_tails)
        print(
            f"   WW's KS-optimal tails (eigenvalues >= x_min): min {ww_tails[0]}, median "
            f"{ww_tails[len(ww_tails) // 2]}, max {ww_tails[-1]}; {inside}/{len(names)} lie inside a top-32, "
            f"{sum(t < MonitorConfig().alpha_min_tail for t in ww_tails)} are shorter than min_tail=10"
        )
        wrong = [n for n in rel_layers if ww_out[n]["n_tail"] != int(tails[n])]
        print(f"   layers marked reliable by ours whose tail differs from WW's: {len(wrong)}")
        agree["reliable_with_other_tail_than_ww"] = len(wrong)
    results["agreement"] = agree
    results["per_layer"] = {
        n: {
            "ww": ww_out[n] if ww_out else None,
            "lean": {k: v for k, v in lean[n].items() if k != "eigs"},
            "ours_default_alpha": alpha_def.get(n),
            "exact_topk_alpha": alpha_ex[n],
            "exact_topk_reliable": n in ex_rel,
            "ours_default_sigma": rep_def.spectra[n].tolist(),
            "ours_default_reliable": reliable.get(n),
            "ours_default_tail": tails.get(n),
            "ours_matched_alpha": alpha_match.get(n),
        }
        for n in names
    }
    base = tuned = bmods = tmods = None  # free the GPT-2 copies before the 4096-wide variant

    # ---- 4096-wide variant: lean pass vs measure()
    if not (args.quick or args.skip_4096):
        base7, tuned7, names7 = llama_pair()
        shapes7 = [tuple(dict(base7.named_modules())[n].weight.shape) for n in names7]
        l7 = timed(lambda: lean_pass(base7, tuned7, names7), 1)
        l7.pop("out")
        lg7 = lean_gflop(shapes7)
        print(
            f"   4096-wide lean pass: {tt(l7['best_s'], l7['median_s'])} wall, {fmt_s(l7['cpu_best_s'])} CPU "
            f"(load {loadavg()})",
            flush=True,
        )
        rows7 = [
            [
                "(b) lean pass",
                tt(l7["best_s"], l7["median_s"]),
                fmt_s(l7["cpu_best_s"]),
                "1",
                "1",
                f"{lg7:.0f}",
                f"{lg7 / l7['best_s']:.0f}",
            ]
        ]
        r7 = {"lean": l7, "shapes": shapes7}
        profiles7 = {}
        for label, cfg in (("default", MonitorConfig()), ("intruders=False", MonitorConfig(intruders=False))):
            res, _, prof7, _ = run_monitor(
                base7, tuned7, cfg, measurements=4, profile_at=4, drift_seed=200, names=names7
            )
            if prof7 is not None:
                profiles7[label] = prof7
            sm = summarize(res)
            r7[label] = {
                **res,
                "summary": sm,
                "steady_vs_lean": l7["best_s"] / sm["steady_best_s"],
                "steady_vs_lean_cpu": l7["cpu_best_s"] / sm["steady_cpu_best_s"],
            }
            rows7.extend(monitor_rows(label, sm, [(l7["best_s"], l7["cpu_best_s"])], steady="steady (#2, #3)"))
            print(
                f"   4096-wide [{label}]: "
                + ", ".join(f"#{r['measurement']}: {fmt_s(r['measure_s'])}" for r in res["rows"])
                + f"; ranks {rank_line(res)} "
                f"(load {loadavg()})",
                flush=True,
            )
        print(
            f"\n-- 4096-wide variant: Llama-7B matrices ({', '.join(f'{m}x{n}' for m, n in shapes7)}; "
            f"{sum(m * n for m, n in shapes7) / 1e6:.0f} M weights)"
        )
        print_table(
            [
                "contender",
                "wall (best / median)",
                "CPU time",
                "vs lean (wall)",
                "vs lean (CPU)",
                "matmul GFLOP",
                "GFLOP/s (wall)",
            ],
            rows7,
        )
        print(
            f"   gap to the lean pass, default config, steady state: GPT-2 small "
            f"{summary['default']['steady_vs_lean']:.1f}x -> 4096-wide {r7['default']['steady_vs_lean']:.1f}x "
            f"(wall); {summary['default']['steady_vs_lean_cpu']:.1f}x -> "
            f"{r7['default']['steady_vs_lean_cpu']:.1f}x (CPU)"
        )
        for label, (prof, measure_s) in profiles7.items():
            print(f"\n-- where measure() spends its time, 4096-wide [{label}], measurement #4 (profiled run, wall)")
            print_table(["phase", "time", "share", "calls"], prof.table(measure_s))
            r7.setdefault("profile", {})[label] = {"measure_s": measure_s, "phases": prof.totals, "calls": prof.calls}
        results["llama_block"] = r7

    info["loadavg_1m_at_end"] = loadavg()
    print(f"\n   load average (1 min) at end: {info['loadavg_1m_at_end']}")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
