"""randomized_svd vs torch's exact and randomized SVDs on LLM layer shapes (time and top-k accuracy).

For each shape (GPT-2 small: 768x2304, 768x768, 768x3072, 3072x768; a 7B Llama: 4096x4096,
11008x4096, 4096x11008) one float32 matrix with a realistic spectrum is built: a heavy-tailed top
(256 singular values decaying as i^-1/2, i.e. eigenvalues with a power-law density of exponent
alpha = 3) over a Marchenko-Pastur noise bulk, plus a planted rank-1 spike (sigma_1 = 3 sigma_2).
Then, in one process on one device:

* ``torch.linalg.svdvals`` (the exact reference for sigma_i) and ``torch.linalg.svd``
  (full_matrices=False; on CPU only where it takes < ~30 s);
* ``torch.svd_lowrank(A, q=42, niter=2)``;
* ``spectral_monitor.functional.randomized_svd(A, rank=32, oversample=10, niter=2)`` (cold);
* the same with ``sketch_dtype=torch.bfloat16`` (products in bf16), cold and warm-started;
* the same warm-started: ``init`` = V of the previous measurement, i.e. of ``A_prev = A - E``
  with a small update E (||E||_F = 1% of ||A||_F: half in a new rank-4 direction, half dense),
  with niter = 2 (the engine default) and niter = 0.

Accuracy (k = 32): max_i |s_i - sigma_i| / sigma_i over i <= k, the same for sigma_1 and sigma_k,
and |cos(u_1, u_1*)| with u_1* from 60 float64 power iterations on A^T A (exact here: the planted
gap of 3 contracts the error by 9 per iteration).

Run: ``python benchmarks/bench_rsvd.py [--quick] [--device cuda] [--json out.json]``
"""

from __future__ import annotations

import math

import torch
from harness import Timing, fmt_g, fmt_s, parser, start, sync, timeit

from spectral_monitor.functional import randomized_svd

GPT2_SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
LLAMA7B_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
RANK, OVERSAMPLE, NITER = 32, 10, 2


def make_matrix(m: int, n: int, *, seed: int, device: str, top: int = 256) -> torch.Tensor:
    """Heavy-tailed top-``top`` spectrum over an MP bulk, with a planted spike (see module doc)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = min(top, m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q.to(device)
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q.to(device)
    s = torch.arange(1, r + 1, dtype=torch.float32, device=device) ** -0.5  # lambda density ~ x^-3
    s[0] = 3.0 * s[1]
    # Gaussian bulk with top edge ~ s_top: ||G||_2 ~ (sqrt(m)+sqrt(n)) std
    noise_std = float(s[-1]) / (math.sqrt(m) + math.sqrt(n))
    A = torch.randn(m, n, generator=g).to(device).mul_(noise_std)
    A.addmm_(U * s, V.T)
    return A


def update_of(A: torch.Tensor, *, seed: int, rel: float = 0.01) -> torch.Tensor:
    """Small update E: ||E||_F = rel ||A||_F, half in a random rank-4 direction, half dense noise."""
    g = torch.Generator(device="cpu").manual_seed(seed + 1000)
    m, n = A.shape
    L = torch.randn(m, 4, generator=g).to(A.device) @ torch.randn(4, n, generator=g).to(A.device)
    D = torch.randn(m, n, generator=g).to(A.device)
    target = rel * float(torch.linalg.matrix_norm(A))
    L *= target / math.sqrt(2) / float(torch.linalg.matrix_norm(L))
    D *= target / math.sqrt(2) / float(torch.linalg.matrix_norm(D))
    return L + D


def top_u(A: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """u_1 by float64 power iteration on A A^T (exact here thanks to the planted gap)."""
    A64 = A.double()
    g = torch.Generator(device="cpu").manual_seed(7)
    v = torch.randn(A.shape[1], generator=g, dtype=torch.float64).to(A.device)
    for _ in range(iters):
        v = A64.T @ (A64 @ v)
        v /= v.norm()
    u = A64 @ v
    return (u / u.norm()).float()


def accuracy(S: torch.Tensor | None, U1: torch.Tensor | None, ref_s: torch.Tensor, ref_u: torch.Tensor) -> dict:
    out = {}
    if S is not None:
        k = min(RANK, S.shape[-1])
        rel = ((S[:k].double() - ref_s[:k].double()).abs() / ref_s[:k].double()).cpu()
        out.update(max_rel_err=float(rel.max()), s1_rel_err=float(rel[0]), sk_rel_err=float(rel[-1]))
    if U1 is not None:
        out["cos_u1"] = float((U1.double() @ ref_u.double()).abs() / U1.double().norm() / ref_u.double().norm())
    return out


def bench_shape(
    m: int, n: int, *, device: str, repeats: int, full_svd: bool, seed: int, skip_note: str = ""
) -> list[dict]:
    A = make_matrix(m, n, seed=seed, device=device)
    E = update_of(A, seed=seed)
    A_prev = A - E
    sync(device)
    rows: list[dict] = []

    def add(method: str, t: Timing | None, S=None, U1=None, note: str = "") -> None:
        rows.append(
            {
                "shape": f"{m}x{n}",
                "method": method,
                "median_s": t.median if t else None,
                "best_s": t.best if t else None,
                "cpu_s": t.cpu_median if t else None,
                "repeats": len(t.wall) if t else 0,
                **accuracy(S, U1, ref_s, ref_u),
                "note": note,
            }
        )

    # exact reference, timed (one repeat for big shapes)
    t_vals = timeit(lambda: torch.linalg.svdvals(A), device=device, repeats=repeats, warmup=0 if m * n > 4e6 else 1)
    ref_s = t_vals.result
    ref_u = top_u(A)
    add("torch.linalg.svdvals", t_vals, ref_s, None, "reference for sigma")
    if full_svd:
        t_svd = timeit(
            lambda: torch.linalg.svd(A, full_matrices=False),
            device=device,
            repeats=repeats,
            warmup=0 if m * n > 4e6 else 1,
        )
        U, S, _ = t_svd.result
        add("torch.linalg.svd", t_svd, S, U[:, 0])
        del U
    else:
        add("torch.linalg.svd", None, note=skip_note or "skipped")

    rk = dict(repeats=repeats * 2, warmup=1)
    t = timeit(lambda: torch.svd_lowrank(A, q=RANK + OVERSAMPLE, niter=NITER), device=device, **rk)
    U, S, _ = t.result
    add(f"torch.svd_lowrank(q={RANK + OVERSAMPLE}, niter={NITER})", t, S, U[:, 0])

    t = timeit(lambda: randomized_svd(A, RANK, oversample=OVERSAMPLE, niter=NITER), device=device, **rk)
    U, S, _ = t.result
    add(f"randomized_svd(rank={RANK}, p={OVERSAMPLE}, niter={NITER})", t, S, U[:, 0])

    _, _, V_prev = randomized_svd(A_prev, RANK, oversample=OVERSAMPLE, niter=NITER)
    for q in (NITER, 0):
        t = timeit(
            lambda q=q: randomized_svd(A, RANK, oversample=OVERSAMPLE, niter=q, init=V_prev), device=device, **rk
        )
        U, S, _ = t.result
        add(f"randomized_svd warm (init=V_prev), niter={q}", t, S, U[:, 0])

    # bf16 products (what the monitor's sketch_dtype="auto" picks on AMX/AVX512-BF16 CPUs and
    # sm80+ GPUs): A is rounded to bf16 inside the call, which the time includes
    bf16 = torch.bfloat16
    t = timeit(
        lambda: randomized_svd(A, RANK, oversample=OVERSAMPLE, niter=NITER, sketch_dtype=bf16), device=device, **rk
    )
    U, S, _ = t.result
    add(f"randomized_svd bf16 sketch, niter={NITER}", t, S, U[:, 0], "A rounded inside the call")
    A16 = A.to(bf16)
    for q in (NITER, 1):
        t = timeit(
            lambda q=q: randomized_svd(A16, RANK, oversample=OVERSAMPLE, niter=q, init=V_prev, sketch_dtype=bf16),
            device=device,
            **rk,
        )
        U, S, _ = t.result
        add(f"randomized_svd bf16 sketch warm (A already bf16), niter={q}", t, S, U[:, 0], "errors vs exact SVD of A")
    return rows


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats for GPT-2 shapes (default 5; quick 2)")
    p.add_argument("--skip-7b", action="store_true", help="GPT-2 shapes only")
    args = p.parse_args()
    device = args.device
    out = start("bench_rsvd: randomized_svd vs torch SVDs", args)
    repeats = args.repeats or (2 if args.quick else 5)
    shapes = [(s, repeats, True) for s in GPT2_SHAPES]
    if not (args.quick or args.skip_7b):
        on_cpu = device == "cpu"
        for s in LLAMA7B_SHAPES:
            shapes.append((s, 1 if on_cpu else repeats, not on_cpu or s == (4096, 4096)))
    all_rows: list[dict] = []
    for i, ((m, n), reps, full_svd) in enumerate(shapes):
        rows = bench_shape(
            m,
            n,
            device=device,
            repeats=reps,
            full_svd=full_svd,
            seed=i,
            skip_note="skipped on CPU (109 s for 11008x4096, 2 threads, in a trial run here)",
        )
        base = rows[0]["median_s"]
        ours = next(r for r in rows if r["method"].startswith("randomized_svd("))["median_s"]
        for r in rows:
            r["vs_svdvals"] = base / r["median_s"] if r["median_s"] else None
            r["ours_speedup"] = r["median_s"] / ours if r["median_s"] else None
        out.table(
            f"{m}x{n} (repeats: {reps}; exact-SVD rows {'1 run' if reps == 1 else f'median of {reps}'})",
            [
                "method",
                "time",
                "CPU time",
                "speed-up vs svdvals",
                "time / randomized_svd's",
                "max rel err s_1..32",
                "rel err s_1",
                "rel err s_32",
                "abs cos u_1",
                "note",
            ],
            [
                [
                    r["method"],
                    fmt_s(r["median_s"]),
                    fmt_s(r["cpu_s"]),
                    fmt_g(r["vs_svdvals"]),
                    fmt_g(r["ours_speedup"]),
                    fmt_g(r.get("max_rel_err"), 2),
                    fmt_g(r.get("s1_rel_err"), 2),
                    fmt_g(r.get("sk_rel_err"), 2),
                    fmt_g(r.get("cos_u1"), 8),
                    r["note"],
                ]
                for r in rows
            ],
        )
        all_rows.extend(rows)
    out.data["rows"] = all_rows
    out.finish()


if __name__ == "__main__":
    main()
