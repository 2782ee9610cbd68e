"""``SpectralMonitorCallback`` in a real ``lightning.pytorch.Trainer`` (CPU, a tiny MLP on generated data)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

L = pytest.importorskip("lightning.pytorch")
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from spectral_monitor.alerts import UpdateNormBlowup, default_rules  # noqa: E402
from spectral_monitor.integrations.lightning import SpectralMonitorCallback  # noqa: E402
from spectral_monitor.sinks.jsonl import read_jsonl  # noqa: E402
from spectral_monitor.sinks.memory import MemorySink  # noqa: E402
from tests.integrations.conftest import run_recipe  # noqa: E402
from tests.readers import read_tensorboard_scalars, read_wandb_history  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["net.0", "net.2"]  # the monitored hidden layers; the 1-output head is excluded
EXCLUDE = [r"^head$"]


class MLP(L.LightningModule):
    """2 hidden layers + head on a fixed regression task; records every training loss.

    ``plant_at``: the optimizer step whose weights get a large rank-1 matrix added to ``net.2``
    (added in the training step just before that optimizer step), a planted divergence.
    ``trained_base``: hidden weights with a decaying spectrum, like trained ones (a random
    initialisation is no base for relative rules).
    """

    def __init__(
        self,
        seed: int = 0,
        lr: float = 1e-3,
        dropout: float = 0.0,
        plant_at: int | None = None,
        trained_base: bool = False,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(32, 1)
        if trained_base:
            with torch.no_grad():
                for layer in (self.net[0], self.net[2]):
                    U, S, Vh = torch.linalg.svd(layer.weight, full_matrices=False)
                    decay = 1.0 / torch.arange(1, len(S) + 1) ** 1.5
                    layer.weight.copy_((U * (decay * S.norm() / decay.norm())) @ Vh)
        self.lr, self.plant_at = lr, plant_at
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        if self.plant_at is not None and self.global_step == self.plant_at - 1:
            with torch.no_grad():
                u, v = torch.ones(32) / math.sqrt(32), torch.linspace(-1, 1, 32)
                self.net[2].weight.add_(10.0 * torch.outer(u, v / v.norm()))
            self.plant_at = None
        x, y = batch
        loss = nn.functional.mse_loss(self.head(self.net(x)), y)
        self.log("train_loss", loss)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(batches: int = 8, batch_size: int = 8, shuffle: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(batches * batch_size, 16, generator=gen)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def trainer(root: Path, *, callbacks=(), logger=False, **kw) -> L.Trainer:
    kw = {"enable_checkpointing": False, **kw}
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def weights(model: MLP) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone() for name in LAYERS}


def jsonl(root: Path):
    return read_jsonl(root / "spectral_monitor" / "metrics.jsonl")


# ----------------------------------------------------------------------------- 1. loggers
def test_metrics_reach_tensorboard_wandb_and_jsonl_at_measurement_steps(tmp_path, wandb_dir):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    tb = TensorBoardLogger(tmp_path / "tb", name="run")
    wb = WandbLogger(project="sm-test", save_dir=str(wandb_dir), offline=True)
    cb = SpectralMonitorCallback(every_n_steps=4, rank=4, exclude=EXCLUDE, rules=[], log_layers=True)
    # log_every_n_steps=50 > max_steps: Lightning's throttle must not hold the spectra back
    t = trainer(tmp_path, callbacks=[cb], logger=[tb, wb], max_steps=11, log_every_n_steps=50)
    t.fit(MLP(), loader())
    wb.experiment.finish()
    expected = [1, 4, 8, 11]  # multiples of every_n_steps, plus the first and the last optimizer step

    reports = jsonl(tmp_path)
    assert [r.step for r in reports] == expected
    assert sorted(reports[-1].layers) == LAYERS

    scalars = read_tensorboard_scalars(tb.log_dir)
    for tag in [
        "spectral/model/rho1_mean",
        "spectral/model/update_norm_total",
        *(f"spectral/rho1/{n}" for n in LAYERS),
    ]:
        assert [s for s, _ in scalars[tag]] == expected, tag
    for (step, value), rep in zip(scalars["spectral/model/rho1_mean"], reports):
        assert value == pytest.approx(rep.metrics["spectral/model/rho1_mean"], rel=1e-6), step
    # aggregates reach TensorBoard once (through the logger), per-layer series once (through the sink)
    assert not any(t.startswith("spectral/context/") for t in scalars)

    rows = read_wandb_history(wandb_dir)
    for key in ["spectral/model/rho1_mean", *(f"spectral/rho1/{n}" for n in LAYERS)]:
        steps = [r["trainer/global_step"] for r in rows if key in r]
        assert steps == expected, key
    by_step = {r["trainer/global_step"]: r for r in rows if "spectral/rho1/net.0" in r}
    for rep in reports:
        assert by_step[rep.step]["spectral/rho1/net.0"] == pytest.approx(rep.metrics["spectral/rho1/net.0"], rel=1e-6)
    # the trainer's loss is recorded beside the spectra in the JSONL log
    assert "spectral/context/train_loss" in reports[-1].metrics


# ------------------------------------------------------------------ 2. accumulation
def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path):
    class Counting(MLP):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.micro = getattr(self, "micro", 0) + 1

    mem = MemorySink()
    cb = SpectralMonitorCallback(every_n_steps=1, rank=4, exclude=EXCLUDE, rules=[], sinks=[mem])
    model = Counting()
    w0 = weights(model)
    # 7 micro-batches per epoch, 2 per step: steps after micro-batches 2, 4, 6 and the epoch-tail flush at 7
    t = trainer(tmp_path, callbacks=[cb], accumulate_grad_batches=2, max_epochs=2)
    t.fit(model, loader(batches=7))
    assert model.micro == 14 and t.global_step == 8
    assert [r.step for r in mem.reports] == list(range(1, 9))
    final = mem.reports[-1]
    for name, w in weights(model).items():  # measured after the optimizer step, against the base
        assert final.metrics[f"spectral/update_norm/{name}"] == pytest.approx(float((w - w0[name]).norm()), rel=1e-4)


# -------------------------------------------------------------------- 3. early stop
def test_planted_divergence_stops_training_with_reason(tmp_path, caplog):
    mem = MemorySink()
    cb = SpectralMonitorCallback(every_n_steps=2, rank=4, exclude=EXCLUDE, sinks=[mem], early_stop=True)
    t = trainer(tmp_path, callbacks=[cb], max_steps=40)
    with caplog.at_level(logging.WARNING, logger="spectral_monitor"):
        t.fit(MLP(plant_at=6, trained_base=True), loader())
    assert t.global_step == 6 and t.should_stop
    assert [r.step for r in mem.reports] == [1, 2, 4, 6]
    assert not any(r.alerts for r in mem.reports[:-1])  # the default rules stay quiet before the plant
    decision = cb.last_decision
    assert decision.stop and decision.report.step == 6
    assert any("update_norm_blowup" in reason for reason in decision.reasons)
    stops = [r.getMessage() for r in caplog.records if "stopping training" in r.getMessage()]
    assert stops and all("step 6" in m for m in stops) and any("update_norm_blowup" in m for m in stops)
    assert t.callback_metrics["spectral/alert/update_norm_blowup"] == 1.0

    # without early_stop the same alert is reported and training runs on
    mem2 = MemorySink()
    cb2 = SpectralMonitorCallback(every_n_steps=2, rank=4, exclude=EXCLUDE, sinks=[mem2], rules=[UpdateNormBlowup()])
    t2 = trainer(tmp_path / "no_stop", callbacks=[cb2], max_steps=10)
    t2.fit(MLP(plant_at=6, trained_base=True), loader())
    assert t2.global_step == 10 and mem2.reports[-1].step == 10
    assert [a.rule for a in mem2.alerts][:1] == ["update_norm_blowup"] and mem2.alerts[0].step == 6


# ---------------------------------------------------------------------- 4. resume
def test_resume_from_checkpoint_keeps_the_original_base(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(root, model, ckpt_path=None):
        cb = SpectralMonitorCallback(every_n_steps=4, rank=4, exclude=EXCLUDE, rules=default_rules())
        # saved in on_train_batch_end, after this callback measured (Lightning runs checkpoint callbacks last).
        # (Resuming from an on_train_epoch_end checkpoint replays the epoch's first batch in lightning 2.6.6,
        # so that run would not match the uninterrupted one.)
        ckpt = ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, every_n_train_steps=8, filename="{step}")
        t = trainer(root, callbacks=[cb, ckpt], enable_checkpointing=True, max_steps=16)
        t.fit(model, loader(), ckpt_path=ckpt_path)
        return cb, t

    model_a = MLP(seed=0)
    w_initial = weights(model_a)
    run(tmp_path / "a", model_a)  # uninterrupted: 16 steps, checkpoints at steps 8 and 16
    uninterrupted = {r.step: r for r in jsonl(tmp_path / "a")}
    assert sorted(uninterrupted) == [1, 4, 8, 12, 16]

    ckpt_path = tmp_path / "a" / "ckpt" / "step=8.ckpt"
    state = torch.load(ckpt_path, weights_only=True)["callbacks"]["SpectralMonitorCallback"]  # plain data
    assert state["run"]["monitor"]["last_step"] == 8 and state["run"]["monitor"]["measurements"] == 3
    assert Path(state["base_path"]).is_file()
    w_resume_point = torch.load(ckpt_path, weights_only=True)["state_dict"]

    # resume in another root dir, into a model initialised differently
    model_b = MLP(seed=99)
    cb_b, t_b = run(tmp_path / "b", model_b, ckpt_path=ckpt_path)
    assert t_b.global_step == 16
    resumed = jsonl(tmp_path / "b")
    assert [r.step for r in resumed] == [12, 16]  # metrics continue on the schedule
    assert cb_b.run.monitor.measurements == 5
    assert "spectral/align_prev/net.0" in resumed[0].metrics  # previous singular vectors came back too
    final = resumed[-1]
    for name, w in weights(model_b).items():
        by_hand = float((w - w_initial[name]).norm())
        assert final.metrics[f"spectral/update_norm/{name}"] == pytest.approx(by_hand, rel=1e-4), name
        from_resume_point = float((w - w_resume_point[f"{name}.weight"]).norm())
        assert abs(by_hand - from_resume_point) > 0.05 * by_hand  # the test can tell the two bases apart
    for rep in resumed:  # same numbers as the uninterrupted run
        for key in ("spectral/model/rho1_mean", "spectral/update_norm/net.0", "spectral/sigma1/net.2"):
            assert rep.metrics[key] == pytest.approx(uninterrupted[rep.step].metrics[key], rel=1e-5), (rep.step, key)
    # resuming again writes no second base: the checkpoint of the resumed run points at the original file
    state_b = torch.load(tmp_path / "b" / "ckpt" / "step=16.ckpt", weights_only=True)["callbacks"]
    assert state_b["SpectralMonitorCallback"]["base_path"] == state["base_path"]


def test_each_fresh_run_persists_its_own_base(tmp_path):
    from safetensors.torch import load_file

    saved = []
    for seed in (0, 1):  # two runs in the same default_root_dir
        model = MLP(seed=seed)
        w0 = weights(model)
        t = trainer(tmp_path, callbacks=[SpectralMonitorCallback(rank=4, exclude=EXCLUDE, rules=[])], max_steps=2)
        t.fit(model, loader())
        t.save_checkpoint(tmp_path / f"run{seed}.ckpt")
        state = torch.load(tmp_path / f"run{seed}.ckpt", weights_only=True)["callbacks"]["SpectralMonitorCallback"]
        saved.append((state["base_path"], w0))
    assert saved[0][0] != saved[1][0]  # the second run did not overwrite the first run's base
    for path, w0 in saved:
        base = load_file(path)
        for name in LAYERS:
            assert torch.equal(base[f"{name}.weight"], w0[name])


# -------------------------------------------------------------- 5. no interference
def test_training_is_identical_with_and_without_the_monitor(tmp_path):
    def run(callbacks):
        torch.manual_seed(7)  # data shuffling and dropout draw from the global RNG
        model = MLP(seed=3, dropout=0.2)
        trainer(tmp_path, callbacks=callbacks, max_epochs=2).fit(model, loader(shuffle=True))
        return model

    plain = run([])
    monitored = run([SpectralMonitorCallback(every_n_steps=1, rank=4, exclude=EXCLUDE, rules=[])])
    assert len(plain.losses) == 16
    assert monitored.losses == plain.losses
    for name, w in weights(plain).items():
        assert torch.equal(weights(monitored)[name], w)


# ------------------------------------------------------------ 6. callback_metrics
def test_aggregates_feed_lightning_early_stopping(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    cb = SpectralMonitorCallback(every_n_steps=3, rank=4, exclude=EXCLUDE, rules=[])
    # strict=True: EarlyStopping raises when the key is missing from trainer.callback_metrics
    es = EarlyStopping(monitor="spectral/model/rho1_max", mode="max", stopping_threshold=0.0, strict=True)
    t = trainer(tmp_path, callbacks=[cb, es], max_epochs=5)
    t.fit(MLP(), loader())
    assert es.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD
    assert t.global_step == 8  # stopped at the end of the first epoch (8 batches)
    # step 8 is off the schedule: on_train_end measured it as the last step
    assert [r.step for r in jsonl(tmp_path)] == [1, 3, 6, 8] and cb.last_decision.report.step == 8
    value = t.callback_metrics["spectral/model/rho1_max"]
    assert isinstance(value, torch.Tensor)
    assert float(value) == pytest.approx(cb.last_decision.report.metrics["spectral/model/rho1_max"])


def test_state_loaded_outside_fit_does_not_leak_into_a_fresh_fit(tmp_path):
    cb = SpectralMonitorCallback(every_n_steps=4, rank=4, exclude=EXCLUDE, rules=[])
    trainer(tmp_path / "a", callbacks=[cb], max_steps=4).fit(MLP(), loader())
    state = cb.state_dict()
    cb.load_state_dict(state)
    cb.teardown(None, None, "validate")  # what Lightning does after validate(ckpt_path=...)
    mem = MemorySink()
    cb.session.extra_sinks = [mem]
    trainer(tmp_path / "b", callbacks=[cb], max_steps=4).fit(MLP(), loader())
    assert [r.step for r in mem.reports] == [1, 4] and cb.run.monitor.measurements == 2


# ------------------------------------------------------------------------ 7. recipe
@pytest.mark.slow
def test_recipe_runs(tmp_path):
    run_recipe("lightning", tmp_path)
    reports = jsonl(tmp_path)
    assert reports and reports[-1].layers
    assert read_tensorboard_scalars(tmp_path)["spectral/model/rho1_mean"]


# -------------------------------------------------------------------- 8. knowledge loss
class CausalLM(L.LightningModule):
    """A GPT-2 in Lightning: ``forward(**batch)`` returns logits (what the probe calls)."""

    def __init__(self, lm: nn.Module, lr: float) -> None:
        super().__init__()
        self.lm, self.lr = lm, lr

    def forward(self, input_ids, attention_mask=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.lm(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


@pytest.mark.slow
def test_knowledge_loss_stops_a_forgetting_finetune_and_not_a_healthy_one(tmp_path, addition_base):
    from spectral_monitor.probes import text_batches
    from tests.integrations.conftest import addition_texts, build_char_tokenizer, probe_pairs

    tok = build_char_tokenizer()
    batches = text_batches(tok, probe_pairs())  # dicts of tensors, as the module's forward takes them
    outcomes = {}
    for task, lr in (("conflict", 1e-3), ("continue", 3e-4)):
        ids = torch.tensor([tok(t)["input_ids"] + [1] for t in addition_texts(task, 512, 1)])
        data = DataLoader(TensorDataset(ids), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
        cb = SpectralMonitorCallback(every_n_steps=5, probe=batches, early_stop=True)
        t = trainer(tmp_path / task, callbacks=[cb], max_steps=40)
        t.fit(CausalLM(addition_base(), lr), data)
        outcomes[task] = (t.global_step, jsonl(tmp_path / task), t)
    steps, reports, t = outcomes["conflict"]
    assert steps < 40 and t.should_stop and any(a.rule == "knowledge_loss" for a in reports[-1].alerts)
    assert t.callback_metrics["spectral/alert/knowledge_loss"] == 1.0
    assert float(t.callback_metrics["spectral/probe/kl"]) > 0.2
    steps, reports, _ = outcomes["continue"]
    assert steps == 40 and not any(a.rule == "knowledge_loss" for r in reports for a in r.alerts)
