"""fit_power_law vs powerlaw.Fit and WeightWatcher's own fitter (time and alpha agreement).

Spectra: eigenvalues of W^T W for heavy-tailed W (i.i.d. Student-t(3) entries, W of shape 2n x n,
so n eigenvalues), n = 768, 1024, 2048, 3072, 4096; computed once in float64.

Fitters, all continuous power law, x_min by minimal KS distance:

* ours: ``spectral_monitor.functional.fit_power_law(torch.tensor(x))`` (defaults: min_tail=1, the
  KS-optimal choice; float64 inside; CPU tensor input);
* ``powerlaw.Fit(x, parameter_ranges={"alpha": [1, 100]}, verbose=0)`` (powerlaw 2.0.0 with its
  alpha <= 3 cap lifted; the same call as the oracle in tests/functional/test_powerlaw.py);
* WeightWatcher's fitter: ``weightwatcher.WW_powerlaw.pl_fit(data=x[x > EVALS_THRESH],
  xmax=None, distribution="power_law", pl_package="ww")`` -- exactly what
  ``WeightWatcher.fit_powerlaw`` runs for ``fit="power_law"`` with the default
  ``pl_package="ww"`` (a ``WWFit``: a Python loop over every x_min candidate with NumPy inside);
  EVALS_THRESH = 1e-5 on CPU.

Definition differences (all three use alpha = 1 + n / sum ln(x_i / x_min) and D over the tail):
powerlaw and ours skip the two largest distinct values as x_min candidates; WW skips only the
largest (it also tries a 2-value tail, whose D is always 1 - e^-2 - 1/2 = 0.365, so it never wins on
these spectra). WW drops values <= 1e-5; these spectra have none.

Also: one batched call on 49 spectra of 768 values (GPT-2 small shapes: 12 x {768x2304,
768x768, 768x3072, 3072x768} block matrices + one 768x768), against 49 separate calls of ours,
of WW's fitter and of powerlaw.Fit.

Timing: best and median of repeated runs after one warm-up; ratios use the best run (the machine
may be shared; the best run is the least disturbed one). Run:
``python benchmarks/bench_powerlaw.py [--quick] [--json out.json]``
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
from harness import fmt_g, loadavg, parser, quiet, start, timeit

from spectral_monitor.functional import fit_power_law

SIZES = [768, 1024, 2048, 3072, 4096]
GPT2_BLOCK_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]


def heavy_tailed_eigs(m: int, n: int, seed: int) -> np.ndarray:
    """Eigenvalues of W^T W (min(m, n) values), W with Student-t(3) entries (float64, ascending)."""
    rng = np.random.default_rng(seed)
    W = torch.from_numpy(rng.standard_t(3, size=(m, n)).astype(np.float32))
    G = W.T @ W if m >= n else W @ W.T
    return torch.linalg.eigvalsh(G.double()).numpy()


def powerlaw_fit(x: np.ndarray):
    import powerlaw

    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        return powerlaw.Fit(x, parameter_ranges={"alpha": [1, 100]}, verbose=0)


def ww_fit(x: np.ndarray):
    from weightwatcher.constants import EVALS_THRESH
    from weightwatcher.WW_powerlaw import pl_fit

    return pl_fit(data=x[x > EVALS_THRESH], xmax=None, verbose=False, distribution="power_law", pl_package="ww")


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    out = start("bench_powerlaw: fit_power_law vs powerlaw.Fit and WeightWatcher's fitter", args)
    device = args.device  # of our fitter; powerlaw and WW run on NumPy
    with quiet():  # weightwatcher logs its SVD backend on import
        import weightwatcher
    import powerlaw

    print(f"   powerlaw {getattr(powerlaw, '__version__', '2.0.0')}, weightwatcher {weightwatcher.__version__}")
    sizes = [768, 2048] if args.quick else SIZES
    reps = 3 if args.quick else 7
    rows, out_rows = [], []
    fit_power_law(torch.rand(64, dtype=torch.float64, device=device) + 1)  # one-off warm-up outside any timing
    for n in sizes:
        x = heavy_tailed_eigs(2 * n, n, seed=n)
        xt = torch.from_numpy(x).to(device)
        t_ours = timeit(lambda xt=xt: fit_power_law(xt), repeats=reps * 3, warmup=1, device=device)
        t_pl = timeit(lambda x=x: powerlaw_fit(x), repeats=2 if n >= 2048 else reps, warmup=0)
        t_ww = timeit(lambda x=x: ww_fit(x), repeats=reps, warmup=1)
        ours, ref, ww = t_ours.result, t_pl.result, t_ww.result
        a = float(ours.alpha)
        r = {
            "n": n,
            "ours_best_s": t_ours.best,
            "ours_median_s": t_ours.median,
            "powerlaw_best_s": t_pl.best,
            "powerlaw_median_s": t_pl.median,
            "ww_best_s": t_ww.best,
            "ww_median_s": t_ww.median,
            "speedup_vs_powerlaw": t_pl.best / t_ours.best,
            "speedup_vs_ww": t_ww.best / t_ours.best,
            "alpha_ours": a,
            "alpha_powerlaw": float(ref.alpha),
            "alpha_ww": float(ww.alpha),
            "alpha_rel_diff_powerlaw": rel(a, ref.alpha),
            "alpha_rel_diff_ww": rel(a, ww.alpha),
            "xmin_same_powerlaw": bool(np.float32(ref.xmin) == float(ours.xmin)),
            "xmin_same_ww": bool(np.float32(ww.xmin) == float(ours.xmin)),
            "n_tail_ours": int(ours.n_tail),
            "n_tail_powerlaw": int(ref.n_tail),
        }
        out_rows.append(r)
        rows.append(
            [
                n,
                t_ours.fmt(),
                t_pl.fmt(),
                t_ww.fmt(),
                f"{r['speedup_vs_powerlaw']:.0f}x",
                f"{r['speedup_vs_ww']:.1f}x",
                f"{a:.4f}",
                fmt_g(r["alpha_rel_diff_powerlaw"], 2),
                fmt_g(r["alpha_rel_diff_ww"], 2),
                f"{int(ours.n_tail)}/{int(ref.n_tail)}",
            ]
        )
        print(f"   n={n} done (load {loadavg()})", flush=True)
    out.table(
        "one spectrum per call (time: best / median)",
        [
            "n values",
            "ours",
            "powerlaw.Fit",
            "WW fitter",
            "ours vs powerlaw",
            "ours vs WW",
            "alpha (ours)",
            "rel diff vs powerlaw",
            "rel diff vs WW",
            "n_tail ours/powerlaw",
        ],
        rows,
    )

    # ---- batched: 49 GPT-2-small-shaped spectra in one call
    shapes = [GPT2_BLOCK_SHAPES[i % 4] for i in range(48)] + [(768, 768)]
    spectra = [heavy_tailed_eigs(m, n, seed=1000 + i) for i, (m, n) in enumerate(shapes)]
    batch = torch.from_numpy(np.stack(spectra)).to(device)
    t_batch = timeit(lambda: fit_power_law(batch), repeats=reps, warmup=1, device=device)
    t_seq = timeit(
        lambda: [fit_power_law(torch.from_numpy(s).to(device)) for s in spectra], repeats=3, warmup=0, device=device
    )
    t_ww49 = timeit(lambda: [ww_fit(s) for s in spectra], repeats=3, warmup=0)
    n_pl = 10 if args.quick else 49
    t_pl49 = timeit(lambda: [powerlaw_fit(s) for s in spectra[:n_pl]], repeats=1, warmup=0)
    bfit = t_batch.result
    ww_alphas = np.array([f.alpha for f in t_ww49.result])
    pl_alphas = np.array([f.alpha for f in t_pl49.result])
    ours_alphas = bfit.alpha.double().cpu().numpy()
    seq_alphas = np.array([float(f.alpha) for f in t_seq.result])
    d_ww = np.abs(ours_alphas - ww_alphas) / ww_alphas
    d_pl = np.abs(ours_alphas[:n_pl] - pl_alphas) / pl_alphas
    pl_scale = 49 / n_pl
    batch_row = {
        "spectra": 49,
        "values_each": 768,
        "ours_batched_best_s": t_batch.best,
        "ours_batched_median_s": t_batch.median,
        "ours_49_calls_best_s": t_seq.best,
        "ww_49_calls_best_s": t_ww49.best,
        "powerlaw_calls": n_pl,
        "powerlaw_calls_s": t_pl49.best,
        "speedup_vs_powerlaw": t_pl49.best * pl_scale / t_batch.best,
        "speedup_vs_ww": t_ww49.best / t_batch.best,
        "speedup_vs_49_own_calls": t_seq.best / t_batch.best,
        "alpha_max_rel_diff_ww": float(d_ww.max()),
        "alpha_max_rel_diff_powerlaw": float(d_pl.max()),
        "batched_equals_single": bool(np.allclose(ours_alphas, seq_alphas, rtol=1e-6)),
        "alpha_range": [float(ours_alphas.min()), float(ours_alphas.max())],
    }
    out.table(
        "49 GPT-2-small-shaped spectra (768 values each): one batched call vs one call per spectrum",
        ["fitter", "time (best / median)", "ours batched faster by", "max alpha rel diff vs ours"],
        [
            ["ours, one batched call", t_batch.fmt(), "1", "-"],
            [
                "ours, 49 calls",
                t_seq.fmt(),
                f"{batch_row['speedup_vs_49_own_calls']:.1f}x",
                fmt_g(float(np.abs(ours_alphas - seq_alphas).max() / ours_alphas.min()), 2),
            ],
            [
                "WW fitter, 49 calls",
                t_ww49.fmt(),
                f"{batch_row['speedup_vs_ww']:.1f}x",
                fmt_g(batch_row["alpha_max_rel_diff_ww"], 2),
            ],
            [
                f"powerlaw.Fit, {n_pl} calls" + ("" if n_pl == 49 else " (x4.9 for the ratio)"),
                t_pl49.fmt(),
                f"{batch_row['speedup_vs_powerlaw']:.0f}x",
                fmt_g(batch_row["alpha_max_rel_diff_powerlaw"], 2),
            ],
        ],
    )
    print(f"   alpha range over the 49 spectra: {ours_alphas.min():.3f} .. {ours_alphas.max():.3f}")
    out.data.update(single=out_rows, batched=batch_row)
    out.finish()


if __name__ == "__main__":
    main()
