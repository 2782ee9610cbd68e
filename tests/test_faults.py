"""Fault injection into real training loops: the monitor must never hurt the run it watches.

Every case injects one fault into a real loop — plain PyTorch with :class:`MonitorRun`, or the
Hugging Face ``Trainer`` with ``SpectralMonitorCallback`` on the tiny GPT-2 — and checks that

* training goes on: the losses (or the step count) are those of the same loop without the monitor;
* one clear message on the ``spectral_monitor`` logger says what happened (never one per step);
* nothing already recorded is lost: the JSONL log is read back with ``read_jsonl``;
* the strict-mode variant raises where it should.

Oracles are independent of the code under test: the losses of an unmonitored run, update norms and
largest singular values computed here from the weights (``W_t - W_0`` in float64), the weights of
the checkpoint a run resumed from. ``docs/faults.md`` says, for users, what each case guarantees.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import spectral_monitor.engine.updates as updates_mod
from spectral_monitor import MonitorRun
from spectral_monitor.alerts import NonFiniteWeights, UpdateNormBlowup
from spectral_monitor.errors import BaseMismatchError, MissingDependencyError, NonFiniteError
from spectral_monitor.layers import select_layers
from spectral_monitor.sinks import JsonlSink, MemorySink, read_jsonl
from spectral_monitor.snapshot import DiskStore

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from spectral_monitor.integrations.hf import SpectralMonitorCallback  # noqa: E402
from tests.integrations.conftest import build_tiny_gpt2  # noqa: E402
from tests.integrations.test_hf import AdditionLM, Crash, hand_update_norms, jsonl, make_args  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGGER = "spectral_monitor"
ROOT = Path(__file__).resolve().parents[1]
NAN_LAYER = "transformer.h.0.mlp.c_fc"  # its same-shape twin, h.1.mlp.c_fc, shares its batch
TWIN = "transformer.h.1.mlp.c_fc"


def rules() -> list:
    """The default rules without ``knowledge_loss`` (its "no probe" note is not a fault)."""
    return [NonFiniteWeights(), UpdateNormBlowup()]


def warnings_of(records: list[logging.LogRecord]) -> list[str]:
    """The monitor's WARNING messages, without the cost note: a tiny model's step is far cheaper
    than a measurement, so every run here is over the overhead budget, which is not a fault."""
    return [
        r.getMessage()
        for r in records
        if r.name == LOGGER and r.levelno >= logging.WARNING and "of training time" not in r.getMessage()
    ]


# ------------------------------------------------------------------ plain PyTorch loop
@functools.cache
def addition_ids() -> torch.Tensor:
    """``(256, 10)`` token ids of the addition strings the HF tests train on."""
    return AdditionLM().ids


def lm_loss(model: nn.Module, step: int) -> torch.Tensor:
    ids = addition_ids()
    batch = ids[(step - 1) * 8 % len(ids) :][:8].to(next(model.parameters()).device)
    return model(input_ids=batch, labels=batch).loss


def train(
    model: nn.Module,
    steps: int,
    *,
    loss_fn: Callable[[nn.Module, int], torch.Tensor] = lm_loss,
    run: MonitorRun | None = None,
    fault: Callable[[int, nn.Module], None] | None = None,
    lr: float = 0.05,
) -> tuple[list[float], list]:
    """``steps`` plain SGD steps. After each optimizer step ``fault(step, model)`` injects the fault,
    then ``run.on_optimizer_step`` (stopping when it says so). Returns the losses and decisions."""
    losses, decisions = [], []
    for step in range(1, steps + 1):
        loss = loss_fn(model, step)
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
        losses.append(loss.item())
        if fault is not None:
            fault(step, model)
        if run is not None:
            decision = run.on_optimizer_step(step, final=step == steps)
            decisions.append(decision)
            if decision.stop:
                break
    return losses, decisions


def unmonitored_losses(make_model: Callable[[], nn.Module], steps: int, **kw) -> list[float]:
    return train(make_model(), steps, **kw)[0]


def exact_sigma1(W: torch.Tensor, W0: torch.Tensor) -> float:
    """‖W − W_0‖₂ in float64 (an exact SVD; the same for a transposed Conv1D weight)."""
    return float(torch.linalg.matrix_norm(W.detach().double() - W0.detach().double(), ord=2))


def put_nan(step: int, model: nn.Module, at: int = 3, value: float = float("nan")) -> None:
    """After step ``at``: one entry of ``NAN_LAYER``'s weight becomes ``value`` (NaN, or ±Inf)."""
    if step == at:
        with torch.no_grad():
            model.get_submodule(NAN_LAYER).weight[1, 2] = value


# ------------------------------------------------------------------ 1. NaN / Inf in a weight
@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A 6-step loop, measured every step; NaN put into one weight after step 3's optimizer step
    (it reaches every weight through the next step's gradients). Run once for the tests below."""
    path = tmp_path_factory.mktemp("nan") / "metrics.jsonl"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    try:
        model = build_tiny_gpt2()
        base = copy.deepcopy(model)
        at_fault: dict[str, torch.Tensor] = {}

        def fault(step: int, m: nn.Module) -> None:
            put_nan(step, m)
            if step == 3:
                at_fault.update({n: p.detach().clone() for n, p in m.named_parameters()})

        memory = MemorySink()
        run = MonitorRun(model, every_n_steps=1, sinks=[memory, JsonlSink(path)], rules=rules())
        run.start()
        losses, decisions = train(model, 6, run=run, fault=fault)
        run.finish()
        reference = unmonitored_losses(build_tiny_gpt2, 6, fault=put_nan)
    finally:
        logger.removeHandler(handler)
        torch.set_num_threads(threads)
    return {
        "losses": losses,
        "reference": reference,
        "reports": [d.report for d in decisions],
        "memory": memory,
        "path": path,
        "records": records,
        "base": {n: p.detach() for n, p in base.named_parameters()},
        "at_fault": at_fault,
    }


def test_nan_mid_run_fires_the_alert_and_the_other_layers_are_measured(nan_run):
    np.testing.assert_array_equal(nan_run["losses"], nan_run["reference"])  # NaN from step 4 on, in both
    assert len(nan_run["losses"]) == 6
    r3 = nan_run["reports"][2]
    assert r3.step == 3
    assert r3.layers[NAN_LAYER] == {"nonfinite": 1.0} and "non-finite" in r3.skipped[NAN_LAYER]
    [alert] = [a for a in r3.alerts if a.rule == "nonfinite_weights"]
    assert alert.layers == (NAN_LAYER,) and not alert.stop
    measured = r3.layer_values("update_norm")
    assert len(measured) == 7 and NAN_LAYER not in measured  # the 7 other layers, its batch twin included
    W, W0 = nan_run["at_fault"][f"{TWIN}.weight"], nan_run["base"][f"{TWIN}.weight"]
    assert measured[TWIN] == pytest.approx(float((W.double() - W0.double()).norm()), rel=1e-5)
    assert r3.layer_values("sigma1")[TWIN] == pytest.approx(exact_sigma1(W, W0), rel=1e-4)
    # every report reached the log, the fault included
    logged = read_jsonl(nan_run["path"])
    assert [r.step for r in logged] == [1, 2, 3, 4, 5, 6]
    assert {k for k, v in logged[2].layer_values("nonfinite").items() if v} == {NAN_LAYER}
    assert logged[2].layer_values("update_norm")[TWIN] == pytest.approx(measured[TWIN])
    assert [a.rule for a in logged[2].alerts] == ["nonfinite_weights"]
    # said when it happened, naming the layer; the alert warned once though it fired at every later step
    messages = warnings_of(nan_run["records"])
    assert any(NAN_LAYER in m and "step 3" in m for m in messages)
    assert len([m for m in messages if "nonfinite_weights" in m]) == 1
    assert all("nonfinite_weights" in [a.rule for a in r.alerts] for r in nan_run["reports"][2:])


def test_nan_spreading_to_every_layer_is_said_once_per_measurement(nan_run):
    """At step 4 the NaN has reached every weight: one message for that measurement, not one per batch."""
    per_step = Counter(
        m.split(" at step ")[1].split(";")[0]
        for m in warnings_of(nan_run["records"])
        if m.startswith("spectral_monitor: NaN/Inf")
    )
    assert per_step and max(per_step.values()) == 1, per_step


def test_nan_layers_stay_listed_as_skipped_when_every_layer_is_nan(nan_run):
    """Step 3 lists the NaN layer in ``skipped``; from step 4 every layer is NaN and must be listed too."""
    for report in nan_run["reports"][3:]:
        nan_layers = {k for k, v in report.layer_values("nonfinite").items() if v}
        assert nan_layers == {s.name for s in select_layers(build_tiny_gpt2())}
        assert set(report.skipped) == nan_layers, (report.step, report.skipped)


def test_coverage_counts_a_non_finite_layer_once(nan_run):
    """``spectral/model/coverage`` is the share of layers measured: never above 1."""
    coverage = [r.model["coverage"] for r in nan_run["reports"]]
    assert all(c <= 1.0 for c in coverage), coverage


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_in_strict_mode_raises_out_of_the_training_loop(value):
    model = build_tiny_gpt2()
    run = MonitorRun(model, every_n_steps=1, rules=rules(), strict=True)
    run.start()
    steps = []

    def fault(step: int, m: nn.Module) -> None:
        steps.append(step)
        put_nan(step, m, value=value)

    with pytest.raises(NonFiniteError, match=rf"\['{NAN_LAYER}'\] at step 3"):
        train(model, 4, run=run, fault=fault)
    assert steps == [1, 2, 3]


class PlantNaN(transformers.TrainerCallback):
    """Puts a NaN into one monitored weight at the end of step ``at`` (before the monitor measures)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        put_nan(state.global_step, model, at=self.at)


def test_nan_with_early_stop_stops_the_hf_trainer_with_the_reason(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    cb = SpectralMonitorCallback(every_n_steps=2, early_stop=True, rules=rules())
    args = make_args(tmp_path, max_steps=8, save_strategy="steps", save_steps=100)
    trainer = transformers.Trainer(
        model=build_tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=[PlantNaN(at=4), cb]
    )
    trainer.train()
    assert trainer.state.global_step == 4
    assert cb.last_decision.stop and cb.last_decision.report.step == 4
    assert [r.step for r in jsonl(tmp_path)] == [1, 2, 4]
    assert {k for k, v in jsonl(tmp_path)[-1].layer_values("nonfinite").items() if v} == {NAN_LAYER}
    assert (tmp_path / "checkpoint-4").is_dir()  # save_on_stop keeps the step it stopped at
    [stop] = [m for m in warnings_of(caplog.records) if "stopping training" in m]
    assert "step 4" in stop and "nonfinite_weights" in stop and NAN_LAYER in stop


# ------------------------------------------------------------------ 2. sinks that raise
class Broken:
    """A sink that raises in ``fails_in`` and counts its calls."""

    fails_in = ""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def _call(self, method: str) -> None:
        self.calls[method] += 1
        if method == self.fails_in:
            raise OSError(f"backend unreachable in {method}")

    def start(self, run_config) -> None:
        self._call("start")

    def write(self, report) -> None:
        self._call("write")

    def finish(self) -> None:
        self._call("finish")


class BrokenAtStart(Broken):
    fails_in = "start"


class BrokenAtWrite(Broken):
    fails_in = "write"


class BrokenAtFinish(Broken):
    fails_in = "finish"


def test_sinks_raising_in_start_write_finish_are_disabled_once_and_the_others_keep_every_report(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    broken = [BrokenAtStart(), BrokenAtWrite(), BrokenAtFinish()]
    memory, path = MemorySink(), tmp_path / "metrics.jsonl"
    model = build_tiny_gpt2()
    base = copy.deepcopy(model)
    run = MonitorRun(model, every_n_steps=2, sinks=[*broken, memory, JsonlSink(path)], rules=rules())
    run.start()
    losses, _ = train(model, 6, run=run)
    run.finish()
    assert losses == unmonitored_losses(build_tiny_gpt2, 6)
    assert [r.step for r in memory.reports] == [1, 2, 4, 6] and memory.finished
    logged = read_jsonl(path)
    assert [r.step for r in logged] == [1, 2, 4, 6]
    for got, want in zip(logged, memory.reports):
        assert got.layer_values("update_norm") == pytest.approx(want.layer_values("update_norm"))
    assert logged[-1].layer_values("update_norm") == pytest.approx(hand_update_norms(model, base), rel=1e-5)
    # each broken sink: one warning naming it and the method; not called again after failing
    messages = warnings_of(caplog.records)
    assert len(messages) == 3, messages
    for sink in broken:
        [msg] = [m for m in messages if type(sink).__name__ in m]
        assert f"failed in {sink.fails_in}()" in msg and "backend unreachable" in msg
    assert broken[0].calls == {"start": 1, "finish": 1}  # finish() releases what start() may hold
    assert broken[1].calls == {"start": 1, "write": 1, "finish": 1}
    assert broken[2].calls == {"start": 1, "write": 4, "finish": 1}


def hf_losses(out: Path, callbacks: list, **kw) -> tuple[list[float], transformers.Trainer]:
    args = make_args(out, logging_steps=1, **kw)
    trainer = transformers.Trainer(model=build_tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=callbacks)
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer


def test_a_sink_raising_in_write_under_the_hf_trainer_leaves_training_and_the_jsonl_whole(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    broken = BrokenAtWrite()
    cb = SpectralMonitorCallback(every_n_steps=2, sinks=[broken], rules=rules())
    losses, trainer = hf_losses(tmp_path / "on", [cb])
    assert losses == hf_losses(tmp_path / "off", [])[0] and trainer.state.global_step == 6
    assert [r.step for r in jsonl(tmp_path / "on")] == [1, 2, 4, 6]
    [msg] = warnings_of(caplog.records)
    assert "BrokenAtWrite failed in write()" in msg
    assert broken.calls["write"] == 1


def test_a_raising_sink_in_strict_mode_raises_out_of_trainer_train(tmp_path):
    cb = SpectralMonitorCallback(every_n_steps=2, sinks=[BrokenAtWrite()], rules=rules(), strict=True)
    args = make_args(tmp_path, max_steps=3)
    trainer = transformers.Trainer(model=build_tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=[cb])
    with pytest.raises(OSError, match="backend unreachable in write"):
        trainer.train()
    assert trainer.state.global_step == 1


# ------------------------------------------------------------------ 3. unwritable folder, full disk
def run_with_log(tmp_path: Path, log: Path | str, steps: int = 6, fault=None) -> tuple[list[float], MemorySink]:
    memory = MemorySink()
    model = build_tiny_gpt2()
    run = MonitorRun(model, every_n_steps=1, sinks=[JsonlSink(log), memory], rules=rules())
    run.start()
    losses, _ = train(model, steps, run=run, fault=fault)
    run.finish()
    return losses, memory


def test_a_log_path_under_a_file_disables_only_the_jsonl_sink(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    (tmp_path / "a_file").write_text("not a folder")
    losses, memory = run_with_log(tmp_path, tmp_path / "a_file" / "metrics.jsonl")
    assert losses == unmonitored_losses(build_tiny_gpt2, 6)
    assert [r.step for r in memory.reports] == [1, 2, 3, 4, 5, 6]
    [msg] = warnings_of(caplog.records)
    assert "JsonlSink failed in start()" in msg and "a_file" in msg


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through chmod")
def test_a_read_only_log_folder_disables_only_the_jsonl_sink(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        losses, memory = run_with_log(tmp_path, folder / "metrics.jsonl")
    finally:
        folder.chmod(0o700)
    assert losses == unmonitored_losses(build_tiny_gpt2, 6)
    assert len(memory.reports) == 6
    [msg] = warnings_of(caplog.records)
    assert "JsonlSink failed in start()" in msg and "Permission denied" in msg


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_disables_only_the_jsonl_sink(tmp_path, caplog):
    """Every write to /dev/full fails with ENOSPC: the start line already does."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    losses, memory = run_with_log(tmp_path, "/dev/full")
    assert losses == unmonitored_losses(build_tiny_gpt2, 6)
    assert len(memory.reports) == 6
    [msg] = warnings_of(caplog.records)
    assert "JsonlSink" in msg and "No space left on device" in msg


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE (POSIX)")
def test_the_log_running_out_of_room_mid_write_keeps_every_earlier_record(tmp_path, caplog):
    """A file-size limit just past the log's size at step 4: that record is written in part (a torn
    line, as on a full disk), the sink is disabled, the earlier records stay readable."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = tmp_path / "metrics.jsonl"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
    limited = False

    def fill_disk(step: int, model: nn.Module) -> None:
        nonlocal limited
        if step == 4:
            resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, hard))
            limited = True
        elif limited:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            limited = False

    try:
        losses, memory = run_with_log(tmp_path, path, fault=fill_disk)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert losses == unmonitored_losses(build_tiny_gpt2, 6)
    assert [r.step for r in memory.reports] == [1, 2, 3, 4, 5, 6]
    text = path.read_text()
    assert not text.endswith("\n")  # the torn step-4 line
    assert [r.step for r in read_jsonl(path)] == [1, 2, 3]
    kept = read_jsonl(path)[-1].layer_values("update_norm")
    assert kept == pytest.approx(memory.reports[2].layer_values("update_norm"))
    [msg] = warnings_of(caplog.records)
    assert "JsonlSink failed in write()" in msg and "File too large" in msg


def test_a_monitor_folder_that_cannot_be_created_warns_once_per_consequence(tmp_path, caplog):
    """HF: ``output_dir/spectral_monitor`` is a file. The JSONL sink is off (one warning) and the base
    cannot be saved for a resume (one warning, not one per checkpoint); training and the overview
    through ``Trainer.log`` go on."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "spectral_monitor").write_text("in the way")
    cb = SpectralMonitorCallback(every_n_steps=2, rules=rules())
    args = make_args(tmp_path, save_strategy="steps", save_steps=2)
    trainer = transformers.Trainer(model=build_tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 6
    assert [e["step"] for e in trainer.state.log_history if "spectral/model/rho1_mean" in e] == [1, 2, 4, 6]
    messages = warnings_of(caplog.records)
    assert len([m for m in messages if "JsonlSink failed in start()" in m]) == 1
    assert len([m for m in messages if "could not write the base" in m]) == 1, messages
    assert len(messages) == 2, messages


def test_a_disk_base_folder_that_cannot_be_created_does_not_stop_training(tmp_path, caplog):
    """HF, ``base_store="disk"`` with ``base_dir`` under a file: the base cannot be taken. Training must
    still run all its steps, with one warning naming the folder."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    (tmp_path / "a_file").write_text("in the way")
    cb = SpectralMonitorCallback(
        every_n_steps=2, rules=rules(), base_store="disk", base_dir=str(tmp_path / "a_file" / "base")
    )
    args = make_args(tmp_path / "out", max_steps=4)
    trainer = transformers.Trainer(model=build_tiny_gpt2(), args=args, train_dataset=AdditionLM(), callbacks=[cb])
    trainer.train()  # today: NotADirectoryError out of on_train_begin, before the first step
    assert trainer.state.global_step == 4
    [msg] = warnings_of(caplog.records)
    assert "a_file" in msg


# ------------------------------------------------------------------ 4. out of memory in the decomposition
def batched_oom(real):
    def tight(A, rank, **kw):
        if A.dim() == 3 and A.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(A, rank, **kw)

    return tight


def always_oom(A, rank, **kw):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_on_a_batch_is_retried_layer_by_layer_with_the_same_numbers(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(updates_mod, "randomized_svd", batched_oom(updates_mod.randomized_svd))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = build_tiny_gpt2()
    base = copy.deepcopy(model)
    memory = MemorySink()
    run = MonitorRun(model, every_n_steps=2, sinks=[memory, JsonlSink(tmp_path / "m.jsonl")], rules=rules())
    run.start()
    losses, decisions = train(model, 6, run=run)
    run.finish()
    assert losses == unmonitored_losses(build_tiny_gpt2, 6)
    assert [r.step for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2, 4, 6]
    last = decisions[-1].report
    assert not last.skipped and len(last.layers) == 8
    assert last.layer_values("update_norm") == pytest.approx(hand_update_norms(model, base), rel=1e-5)
    params = dict(base.named_parameters())
    for spec in select_layers(model):
        want = exact_sigma1(spec.parameter(), params[spec.param_name])
        assert last.layer_values("sigma1")[spec.name] == pytest.approx(want, rel=1e-3), spec.name
    [msg] = warnings_of(caplog.records)  # once, though every batch of every measurement was split
    assert "out of memory on 2 layers at once" in msg


def test_out_of_memory_on_every_layer_skips_them_said_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(updates_mod, "randomized_svd", always_oom)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = build_tiny_gpt2()
    names = {s.name for s in select_layers(model)}
    run = MonitorRun(model, every_n_steps=2, sinks=[JsonlSink(tmp_path / "m.jsonl")], rules=rules())
    run.start()
    losses, decisions = train(model, 6, run=run)
    run.finish()
    assert losses == unmonitored_losses(build_tiny_gpt2, 6)
    reports = [d.report for d in decisions if d.measured]
    assert [r.step for r in reports] == [1, 2, 4, 6]
    for report in reports:
        assert not report.layers and set(report.skipped) == names
        assert all(reason.startswith("OutOfMemoryError") for reason in report.skipped.values())
    logged = read_jsonl(tmp_path / "m.jsonl")
    assert [(r.step, set(r.skipped)) for r in logged] == [(s, names) for s in (1, 2, 4, 6)]
    messages = warnings_of(caplog.records)  # the split, then the skip: each once for the whole run
    assert len(messages) == 2, messages
    assert "smaller batches" in messages[0] and "OutOfMemoryError" in messages[1]


def test_out_of_memory_in_strict_mode_raises_after_the_retries(monkeypatch):
    model = build_tiny_gpt2()
    run = MonitorRun(model, every_n_steps=1, rules=rules(), strict=True)
    run.start()
    monkeypatch.setattr(updates_mod, "randomized_svd", batched_oom(updates_mod.randomized_svd))
    seen = []

    def no_memory_left_at_step_3(step: int, m: nn.Module) -> None:
        seen.append(step)  # steps 1, 2: the batch split succeeds, nothing to raise
        if step == 3:
            monkeypatch.setattr(updates_mod, "randomized_svd", always_oom)

    with pytest.raises(torch.OutOfMemoryError):
        train(model, 4, run=run, fault=no_memory_left_at_step_3)
    assert seen == [1, 2, 3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_out_of_memory_falls_back_to_the_cpu_layer_by_layer(monkeypatch, caplog):
    real = updates_mod.randomized_svd

    def no_room_on_the_gpu(A, rank, **kw):
        if A.is_cuda:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(A, rank, **kw)

    monkeypatch.setattr(updates_mod, "randomized_svd", no_room_on_the_gpu)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = build_tiny_gpt2().cuda()
    base = copy.deepcopy(model)
    run = MonitorRun(model, every_n_steps=1, rules=rules())
    run.start()
    _, decisions = train(model, 3, run=run)
    last = decisions[-1].report
    assert not last.skipped and len(last.layers) == 8
    assert last.layer_values("update_norm") == pytest.approx(hand_update_norms(model, base), rel=1e-5)
    messages = warnings_of(caplog.records)
    assert len([m for m in messages if "smaller batches" in m]) == 1
    assert len([m for m in messages if "on the CPU" in m]) == 1


# ------------------------------------------------------------------ 5, 6. resume with a bad base
RESUME = {"max_steps": 8, "save_strategy": "steps", "save_steps": 4, "logging_steps": 4}


@pytest.fixture(scope="module")
def crashed_template(tmp_path_factory):
    """A HF run measured every 2 steps, checkpointed at step 4 and killed after step 6, moved to
    another folder (the path recorded in its checkpoint is gone: a resume finds the base in the
    run's own ``spectral_monitor/`` folder). Tests copy it and break one thing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = tmp_path_factory.mktemp("crash") / "run"
        cb = SpectralMonitorCallback(every_n_steps=2, rules=rules())
        trainer = transformers.Trainer(
            model=build_tiny_gpt2(), args=make_args(src, **RESUME), train_dataset=AdditionLM(), callbacks=[cb, Crash(6)]
        )
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    template = src.parent / "template"
    src.rename(template)
    return template


def copy_of(template: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the crashed run, and its base file."""
    out = tmp_path / "run"
    shutil.copytree(template, out)
    [base] = (out / "spectral_monitor").glob("base-*.safetensors")
    return out, base


def resume(out: Path, **cb_kw) -> tuple[transformers.Trainer, SpectralMonitorCallback]:
    cb = SpectralMonitorCallback(every_n_steps=2, rules=rules(), **cb_kw)
    trainer = transformers.Trainer(
        model=build_tiny_gpt2(seed=99), args=make_args(out, **RESUME), train_dataset=AdditionLM(), callbacks=[cb]
    )
    trainer.train(resume_from_checkpoint=True)
    return trainer, cb


def norms_since(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖W_t − W‖_F of every monitored layer against the tensors ``weights`` (by parameter name)."""
    return {
        s.name: float((s.parameter().detach().double() - weights[s.param_name].double()).norm())
        for s in select_layers(model)
    }


def check_resumed_from_a_retaken_base(out: Path, trainer: transformers.Trainer) -> None:
    """Training reached step 8; the steps logged before the crash are all still there; the update is
    measured against the weights at the resume point (checkpoint-4), as documented."""
    assert trainer.state.global_step == 8
    raw = read_jsonl(out / "spectral_monitor" / "metrics.jsonl", dedupe=False)
    assert [r.step for r in raw][:4] == [1, 2, 4, 6]  # nothing recorded before the crash is lost
    last = jsonl(out)[-1]
    assert last.step == 8
    at_resume = load_file(out / "checkpoint-4" / "model.safetensors")
    assert last.layer_values("update_norm") == pytest.approx(norms_since(trainer.model, at_resume), rel=1e-4)


def test_a_truncated_base_on_resume_is_named_once_and_the_base_is_retaken(crashed_template, tmp_path, caplog):
    out, base = copy_of(crashed_template, tmp_path)
    base.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    trainer, _ = resume(out)
    check_resumed_from_a_retaken_base(out, trainer)
    messages = warnings_of(caplog.records)
    assert any(base.name in m and "the base is taken NOW" in m for m in messages), messages
    assert len(messages) == 1, messages  # today also: "...call start() before the first optimizer step"


def test_a_base_whose_data_was_corrupted_is_not_used_on_resume(crashed_template, tmp_path, caplog):
    """The file's structure is intact but one tensor's bytes were overwritten (zeros): its manifest's
    fingerprint no longer matches. Using it would report ‖W_t‖ as that layer's update."""
    out, base = copy_of(crashed_template, tmp_path)
    data = bytearray(base.read_bytes())
    size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + size])["transformer.h.0.attn.c_attn.weight"]["data_offsets"]
    data[8 + size + start : 8 + size + end] = bytes(end - start)
    base.write_bytes(bytes(data))
    caplog.set_level(logging.WARNING, logger=LOGGER)
    trainer, _ = resume(out)
    messages = warnings_of(caplog.records)
    assert any(base.name in m for m in messages), messages  # today: silently used
    check_resumed_from_a_retaken_base(out, trainer)


def test_a_recorded_base_from_another_model_names_the_parameter_and_both_shapes(crashed_template, tmp_path, caplog):
    out, base = copy_of(crashed_template, tmp_path)
    DiskStore.snapshot(select_layers(build_tiny_gpt2(n_embd=32)), base)  # same names, other shapes
    caplog.set_level(logging.WARNING, logger=LOGGER)
    trainer, _ = resume(out)
    check_resumed_from_a_retaken_base(out, trainer)
    messages = warnings_of(caplog.records)
    [msg] = [m for m in messages if "BaseMismatchError" in m]
    assert base.name in msg and "'transformer.h.0.attn.c_attn.weight'" in msg
    assert "(32, 96)" in msg and "(64, 192)" in msg and "the base is taken NOW" in msg
    assert len(messages) == 1, messages


def test_a_recorded_base_from_another_model_raises_in_strict_mode(crashed_template, tmp_path):
    out, base = copy_of(crashed_template, tmp_path)
    DiskStore.snapshot(select_layers(build_tiny_gpt2(n_embd=32)), base)
    with pytest.raises(BaseMismatchError, match=r"c_attn\.weight' has shape \(32, 96\) but the model's is \(64, 192\)"):
        resume(out, strict=True)


def test_a_truncated_base_in_strict_mode_raises_naming_the_file(crashed_template, tmp_path):
    out, base = copy_of(crashed_template, tmp_path)
    base.write_bytes(base.read_bytes()[:100])
    with pytest.raises(Exception) as info:
        resume(out, strict=True)
    assert base.name in str(info.value), repr(info.value)  # today: safetensors' message, no path


def test_a_corrupted_monitor_state_in_the_checkpoint_does_not_stop_the_resume(crashed_template, tmp_path, caplog):
    """``checkpoint-4/spectral_monitor.pt`` cut in half: the monitor cannot restore itself, but the
    trainer's checkpoint is fine, so training must resume, with one warning naming the file."""
    out, _ = copy_of(crashed_template, tmp_path)
    state = out / "checkpoint-4" / "spectral_monitor.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    caplog.set_level(logging.WARNING, logger=LOGGER)
    trainer, _ = resume(out)  # today: RuntimeError from torch.load in on_train_begin
    assert trainer.state.global_step == 8
    messages = warnings_of(caplog.records)
    assert len(messages) == 1 and "spectral_monitor.pt" in messages[0], messages


def test_a_torn_last_line_from_a_crash_is_not_buried_by_the_resumed_run(crashed_template, tmp_path):
    """A crash mid-write leaves a torn last line (``read_jsonl`` skips it). The resumed run appends after
    it: the log must stay readable, every complete record in it."""
    out, _ = copy_of(crashed_template, tmp_path)
    path = out / "spectral_monitor" / "metrics.jsonl"
    with path.open("a") as fh:
        fh.write('{"step": 7, "metrics": {"spectral/rho1/transformer.h.0')
    assert [r.step for r in read_jsonl(path)] == [1, 2, 4, 6]
    resume(out)
    assert [r.step for r in read_jsonl(path)] == [1, 2, 4, 6, 8]  # today: JSONDecodeError on the torn line


def test_set_base_from_another_model_is_refused_naming_the_parameter_and_both_shapes(tmp_path):
    other = DiskStore.snapshot(select_layers(build_tiny_gpt2(n_embd=32)), tmp_path / "other.safetensors")
    model = build_tiny_gpt2()
    run = MonitorRun(model, every_n_steps=1, rules=rules())
    with pytest.raises(BaseMismatchError) as info:
        run.monitor.set_base(DiskStore(other.path))
    msg = str(info.value)
    assert "'transformer.h.0.attn.c_attn.weight'" in msg and "(32, 96)" in msg and "(64, 192)" in msg
    assert str(other.path) in msg
    assert not run.monitor.has_base  # nothing half-set: the run can still take its own base
    run.start()
    losses, decisions = train(model, 2, run=run)
    assert losses == unmonitored_losses(build_tiny_gpt2, 2) and not decisions[-1].report.skipped


def test_a_disk_base_replaced_by_a_later_run_is_not_used_on_resume(tmp_path, caplog):
    """``base_store="disk"`` keeps the base in ``base_dir/base.safetensors``, and the checkpoint records
    that path. A later run sharing ``base_dir`` (a sweep, a rerun) replaces the file with its own base
    (same architecture: the shape check passes). The first run, resumed, must still measure against
    its ORIGINAL base (or say it cannot), not silently against the other run's."""
    disk = {"base_store": "disk", "base_dir": str(tmp_path / "bases")}
    first = tmp_path / "first"
    cb = SpectralMonitorCallback(every_n_steps=2, rules=rules(), **disk)
    trainer = transformers.Trainer(
        model=build_tiny_gpt2(), args=make_args(first, **RESUME), train_dataset=AdditionLM(), callbacks=[cb, Crash(6)]
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    other = SpectralMonitorCallback(every_n_steps=2, rules=rules(), **disk)
    transformers.Trainer(
        model=build_tiny_gpt2(seed=1),
        args=make_args(tmp_path / "other", max_steps=1),
        train_dataset=AdditionLM(),
        callbacks=[other],
    ).train()
    caplog.set_level(logging.WARNING, logger=LOGGER)
    trainer, _ = resume(first, **disk)
    assert trainer.state.global_step == 8
    messages = warnings_of(caplog.records)
    if messages:  # it may refuse the file: then one warning naming it, and the base is retaken
        assert len(messages) == 1 and "base" in messages[0] and "safetensors" in messages[0], messages
        check_resumed_from_a_retaken_base(first, trainer)
    else:  # today: silently measured against the other run's base
        original = {n: p.detach() for n, p in build_tiny_gpt2().named_parameters()}
        got = jsonl(first)[-1].layer_values("update_norm")
        assert got == pytest.approx(norms_since(trainer.model, original), rel=1e-4)


TRUNCATE_DISK_BASE = """
import glob, logging, os, sys
import torch
from torch import nn
from spectral_monitor import MonitorRun
from spectral_monitor.sinks import JsonlSink

logging.basicConfig(level=logging.WARNING, format="%(name)s|%(message)s")
torch.set_num_threads(1)
folder = sys.argv[1]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 8))
run = MonitorRun(model, layers="re:.", every_n_steps=1, rank=8, base_store="disk", base_dir=folder,
                 sinks=[JsonlSink(os.path.join(folder, "metrics.jsonl"))], rules=[])
run.start()
x, y = torch.randn(32, 64), torch.randn(32, 8)
for step in range(1, 7):
    loss = ((model(x) - y) ** 2).mean()
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    if step == 3:  # the memory-mapped base file is cut in half under the running monitor
        [base] = glob.glob(os.path.join(folder, "base*.safetensors"))
        os.truncate(base, os.path.getsize(base) // 2)
    run.on_optimizer_step(step)
    print("step", step, round(loss.item(), 6), flush=True)
run.finish()
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_disk_base_truncated_mid_run_does_not_kill_training(tmp_path):
    """``base_store="disk"`` memory-maps the base; the file is truncated at step 3. The process must
    finish its 6 steps (today it dies of SIGBUS reading the mapped pages past the new end)."""
    proc = subprocess.run(
        [sys.executable, "-c", TRUNCATE_DISK_BASE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"rc={proc.returncode} ({'SIGBUS' if proc.returncode == -signal.SIGBUS else ''})"
    assert proc.stdout.splitlines()[-1] == "done"
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r.step for r in logged] == [1, 2, 3, 4, 5, 6]
    assert len(logged[1].layers) == 3  # before the fault: all measured
    messages = [
        line
        for line in proc.stderr.splitlines()
        if line.startswith("spectral_monitor|") and "of training time" not in line
    ]
    assert len(messages) == 1 and str(tmp_path) in messages[0] and ".safetensors" in messages[0], messages


# ------------------------------------------------------------------ 7. a layer changes shape
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l0, self.l1, self.l2, self.l3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))))


def mlp_loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)
    return ((model(x) - y) ** 2).mean()


def widen_l2(step: int, model: MLP) -> None:
    """After step 3: l2 grows from 32 to 48 outputs (l3 gets 16 more inputs, zero-initialised)."""
    if step != 3:
        return
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        model.l2.weight = nn.Parameter(torch.cat([model.l2.weight, 0.1 * torch.randn(16, 32, generator=gen)]))
        model.l2.bias = nn.Parameter(torch.cat([model.l2.bias, torch.zeros(16)]))
        model.l3.weight = nn.Parameter(torch.cat([model.l3.weight, torch.zeros(4, 16)], dim=1))
    model.l2.out_features = model.l3.in_features = 48


def test_a_layer_that_changes_shape_is_skipped_with_a_reason_and_the_others_measured(tmp_path, caplog):
    """l2 (batched with its same-shape twin l1) and l3 change shape after step 3: they are skipped
    with a reason naming their shapes; l0 and l1 are measured at every step, exactly."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = MLP()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    path = tmp_path / "m.jsonl"
    run = MonitorRun(model, layers="re:^l", every_n_steps=1, rank=4, sinks=[JsonlSink(path)], rules=rules())
    run.start()
    losses, decisions = train(model, 6, loss_fn=mlp_loss, run=run, fault=widen_l2)
    run.finish()
    assert losses == unmonitored_losses(MLP, 6, loss_fn=mlp_loss, fault=widen_l2)
    for d in decisions[2:]:
        r = d.report
        assert set(r.skipped) == {"l2", "l3"}, (r.step, r.skipped)
        assert "(48, 32)" in r.skipped["l2"] and "(32, 32)" in r.skipped["l2"]
        assert "(4, 48)" in r.skipped["l3"] and "(4, 32)" in r.skipped["l3"]
        assert set(r.layer_values("update_norm")) == {"l0", "l1"}
    last = decisions[-1].report
    for name in ("l0", "l1"):
        want = float((model.get_submodule(name).weight.detach().double() - base[f"{name}.weight"].double()).norm())
        assert last.layer_values("update_norm")[name] == pytest.approx(want, rel=1e-5)
    assert [r.step for r in read_jsonl(path)] == [1, 2, 3, 4, 5, 6]
    messages = warnings_of(caplog.records)  # one per changed layer, for the whole run
    assert len(messages) == 2, messages
    assert sorted("'l2'" in m for m in messages) == [False, True] and all("l1" not in m for m in messages)


def test_a_layer_that_changes_shape_raises_in_strict_mode():
    model = MLP()
    run = MonitorRun(model, layers="re:^l", every_n_steps=1, rank=4, rules=rules(), strict=True)
    run.start()
    with pytest.raises(BaseMismatchError, match=r"'l2'.*\(48, 32\) vs base \(32, 32\)"):
        train(model, 4, loss_fn=mlp_loss, run=run, fault=widen_l2)


# ------------------------------------------------------------------ 8. kill -9
KILLED_RUN = """
import sys, time
from pathlib import Path
import torch
import transformers
from spectral_monitor.alerts import NonFiniteWeights, UpdateNormBlowup
from spectral_monitor.integrations.hf import SpectralMonitorCallback
from tests.integrations.conftest import build_tiny_gpt2
from tests.integrations.test_hf import AdditionLM, make_args

torch.set_num_threads(1)
out = Path(sys.argv[1])
RESUME = {resume}


class Hang(transformers.TrainerCallback):
    # after the monitor measured step 6 (the last checkpoint is step 4): wait to be killed
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            (out / "hanging").write_text("6")
            time.sleep(300)


cb = SpectralMonitorCallback(every_n_steps=2, rules=[NonFiniteWeights(), UpdateNormBlowup()])
trainer = transformers.Trainer(
    model=build_tiny_gpt2(), args=make_args(out, **RESUME), train_dataset=AdditionLM(), callbacks=[cb, Hang()]
)
trainer.train()
"""


@pytest.mark.slow
def test_kill_9_keeps_every_measurement_and_the_resume_uses_the_original_base(tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN.format(resume=RESUME), str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "child.log").open("w"),
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "hanging").exists():
            assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the child never reached step 6"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    path = out / "spectral_monitor" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line complete and parseable
    assert [r.step for r in read_jsonl(path)] == [1, 2, 4, 6]
    assert (out / "checkpoint-4" / "spectral_monitor.pt").is_file() and not (out / "checkpoint-8").exists()

    caplog.set_level(logging.WARNING, logger=LOGGER)
    trainer, cb = resume(out)
    assert trainer.state.global_step == 8
    assert warnings_of(caplog.records) == []  # a clean resume says nothing
    assert [r.step for r in read_jsonl(path, dedupe=False)] == [1, 2, 4, 6, 6, 8]  # 6 re-measured
    last = read_jsonl(path)[-1]
    original = {n: p.detach() for n, p in build_tiny_gpt2().named_parameters()}  # the child's W_0: seed 0
    assert last.layer_values("update_norm") == pytest.approx(norms_since(trainer.model, original), rel=1e-4)
    # and what an uninterrupted run measures at step 8
    ref_cb = SpectralMonitorCallback(every_n_steps=2, rules=rules())
    transformers.Trainer(
        model=build_tiny_gpt2(),
        args=make_args(tmp_path / "ref", **RESUME),
        train_dataset=AdditionLM(),
        callbacks=[ref_cb],
    ).train()
    ref = jsonl(tmp_path / "ref")[-1]
    assert ref.step == 8
    assert last.layer_values("update_norm") == pytest.approx(ref.layer_values("update_norm"), rel=1e-3)
    assert cb.run.monitor.measurements == 5 and cb.run.monitor.last_step == 8  # 1, 2, 4 restored; 6, 8


# ------------------------------------------------------------------ 9. a missing optional dependency
def test_a_missing_wandb_is_a_clear_error_at_construction_before_training(monkeypatch, tmp_path):
    from spectral_monitor.sinks import WandbSink

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails
    with pytest.raises(MissingDependencyError) as info:
        SpectralMonitorCallback(sinks=[WandbSink(project="p")])
    msg = str(info.value)
    assert "WandbSink" in msg and "'wandb'" in msg and "pip install 'spectral-monitor[wandb]'" in msg
    assert isinstance(info.value, ImportError)  # a plain `except ImportError` catches it too


def test_a_missing_matplotlib_drops_the_heatmaps_with_one_note_and_keeps_the_scalars(monkeypatch, tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from spectral_monitor.sinks import TensorBoardSink
    from tests.readers import read_tensorboard_images, read_tensorboard_scalars

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    model = build_tiny_gpt2()
    run = MonitorRun(model, every_n_steps=1, sinks=[TensorBoardSink(str(tmp_path / "tb"))], rules=rules())
    run.start()
    losses, _ = train(model, 3, run=run)
    run.finish()
    monkeypatch.undo()  # the readers may use matplotlib-free tensorboard only, but be safe
    assert losses == unmonitored_losses(build_tiny_gpt2, 3)
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["spectral/model/rho1_mean"]] == [1, 2, 3]
    assert not read_tensorboard_images(tmp_path / "tb")
    messages = warnings_of(caplog.records)  # the user asked for heatmaps (heatmap_every=1): say why none came
    assert len(messages) == 1 and "matplotlib" in messages[0], messages
