"""Recipe: a Lightning fine-tuning run watched by ``SpectralMonitorCallback`` (CPU, under a minute, no downloads).

A tiny 2-block transformer is first trained on modular addition (``a + b mod 47``, generated
data), then fine-tuned on modular subtraction (``a - b mod 47``). The fine-tuning ``Trainer``
carries the callback, which takes the base W_0 when that fit starts and measures ΔW = W_t − W_0 of
every attention (q/k/v/o) and MLP (up/down) projection every ``--every`` optimizer steps. It writes

* TensorBoard (``--out/tb``): aggregates ``spectral/model/*`` next to ``train_loss`` and the
  validation accuracy on both tasks (``val_acc/sub`` learned, ``val_acc/add`` forgotten), per-layer
  ``spectral/<metric>/<layer>``, singular-value histograms and alerts;
* ``--out/spectral_monitor/metrics.jsonl``: one record per measurement (``spectral-monitor report``);
* ``trainer.callback_metrics``: the aggregates, for ``EarlyStopping``/``ModelCheckpoint``.

    python integrations/lightning.py                 # ~30 s on 2 CPU cores
    python integrations/lightning.py --quick         # a few seconds (smoke test)
    python integrations/lightning.py --early-stop    # let the alert rules stop fine-tuning
    tensorboard --logdir lightning_spectral/tb
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# This file is called lightning.py: run as a script, its folder comes first on sys.path and would
# shadow the lightning package, so drop that entry before importing it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from spectral_monitor.integrations.lightning import SpectralMonitorCallback

P = 47  # modulus; tokens 0..P-1 are numbers, P is "="


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP with separately named q/k/v/o/up/down projections."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        return x + self.down_proj(F.gelu(self.up_proj(self.ln2(x))))


class ModArith(L.LightningModule):
    """Reads ``a b =`` and predicts the answer from the last position."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, lr: float = 3e-3, wd: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(P + 1, d)
        self.pos = nn.Parameter(torch.randn(3, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, P)  # left out by the default layer selection, like lm_head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.ln(x[:, -1]))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        task = self.val_tasks[dataloader_idx]
        self.log(f"val_acc/{task}", (self(x).argmax(-1) == y).float().mean(), add_dataloader_idx=False)

    def configure_optimizers(self):
        h = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.wd, betas=(0.9, 0.98))


def data(op: str, train_frac: float = 0.8, batch_size: int = 256) -> tuple[DataLoader, DataLoader]:
    """Train/validation loaders of every ``a op b mod P`` (same split for both tasks)."""
    a, b = torch.cartesian_prod(torch.arange(P), torch.arange(P)).T
    x = torch.stack([a, b, torch.full_like(a, P)], dim=1)
    y = (a + b) % P if op == "add" else (a - b) % P
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = perm[: int(train_frac * len(y))], perm[int(train_frac * len(y)) :]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=1024),
    )


def trainer(max_steps: int, out: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        default_root_dir=out,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lightning_spectral"), help="output folder")
    parser.add_argument("--pretrain-steps", type=int, default=600, help="optimizer steps on a + b (no monitor)")
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning optimizer steps on a - b (monitored)")
    parser.add_argument("--every", type=int, default=25, help="measure every N optimizer steps")
    parser.add_argument("--early-stop", action="store_true", help="let fired alert rules stop fine-tuning")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest for a model this small)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 30 + 30 steps, measured every 10")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.steps, args.every = 30, 30, 10

    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    t0 = time.perf_counter()
    model = ModArith()
    add_train, add_val = data("add")
    sub_train, sub_val = data("sub")
    model.val_tasks = ["add"]
    pretrain = trainer(args.pretrain_steps, args.out, logger=False)
    pretrain.fit(model, add_train, add_val)
    print(f"pre-trained on a + b: val_acc/add {float(pretrain.callback_metrics['val_acc/add']):.3f}")

    monitor = SpectralMonitorCallback(every_n_steps=args.every, early_stop=args.early_stop)
    model.val_tasks = ["add", "sub"]
    fine_tune = trainer(
        args.steps,
        args.out,
        logger=TensorBoardLogger(args.out, name="tb", version=""),
        callbacks=[monitor],
        check_val_every_n_epoch=None,
        val_check_interval=min(args.every, args.steps),
        log_every_n_steps=5,
    )
    fine_tune.fit(model, sub_train, [add_val, sub_val])
    wall = time.perf_counter() - t0

    metrics, report = fine_tune.callback_metrics, monitor.last_decision.report
    print(f"\n{args.pretrain_steps} + {fine_tune.global_step} optimizer steps in {wall:.1f} s, "
          f"{monitor.run.monitor.measurements} measurements")  # fmt: skip
    for key in ("train_loss", "val_acc/add", "val_acc/sub"):
        print(f"  {key:<33} {float(metrics[key]):.3f}" if key in metrics else f"  {key:<33} -")
    for key in ("rho1_mean", "stable_rank_mean", "erank_mean", "update_rel_mean", "alpha_median", "intruders_max"):
        value = report.metrics.get(f"spectral/model/{key}") if report else None
        print(f"  spectral/model/{key:<18} {value:.4g}" if value is not None else f"  spectral/model/{key:<18} -")
    alerts = sorted({a.rule for r in [report] if r for a in r.alerts})
    print("  alerts at the last measurement:", ", ".join(alerts) or "none")
    if monitor.last_decision.stop:
        print("stopped early:", *monitor.last_decision.reasons, sep="\n  ")
    print(
        f"JSONL: {args.out / 'spectral_monitor' / 'metrics.jsonl'}\nTensorBoard: tensorboard --logdir {args.out / 'tb'}"
    )


if __name__ == "__main__":
    main()
