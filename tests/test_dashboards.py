"""The W&B workspace (``spectral_monitor.dashboards``): its sections and panels, checked against the
keys the library really logs (``StepReport.overview``, offline W&B runs written by the sink, the HF
Trainer and Lightning), the CLI's ``--dry-run`` and the offline save error. No network."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb_workspaces")

from spectral_monitor._imports import is_available
from spectral_monitor.dashboards import (
    DashboardError,
    builtin_alert_rules,
    describe,
    layer_regex,
    main,
    save_workspace,
    wandb_workspace,
)
from spectral_monitor.errors import ConfigError, MissingDependencyError
from spectral_monitor.records import Alert, StepReport
from spectral_monitor.sinks.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
# the per-layer metrics that get model-level aggregates (docs/metrics.md), written out by hand
AGGREGATED = [
    "rho1",
    "topk_energy",
    "stable_rank",
    "erank",
    "gap",
    "alpha",
    "update_norm",
    "update_rel",
    "align_prev",
    "overlap_prev",
    "align_base",
    "intruders",
    "sparsity",
]
# the per-layer metrics a WandbSink(log_layers=True) logs, in the order of records.LAYER_SCALARS
METRICS = [
    "rho1",
    "erank",
    "stable_rank",
    "alpha",
    "update_rel",
    "align_prev",
    "align_base",
    "intruders",
    "sparsity",
    "gap",
]
RULES = [
    "nonfinite_weights",
    "update_norm_blowup",
    "knowledge_loss",
    "rank1_collapse",
    "alpha_out_of_band",
    "intruder_dimensions",
    "erank_drop",
]
GPT2_LAYERS = [f"transformer.h.{i}.{m}" for i in range(12) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]


def sections(workspace) -> dict:
    return {s.name: s for s in workspace.sections}


def line_plots(workspace, section: str) -> dict:
    """``{title: LinePlot}`` of one section."""
    return {p.title: p for p in sections(workspace)[section].panels if type(p).__name__ == "LinePlot"}


def wire_spec(workspace) -> dict:
    """The JSON spec ``Workspace.save`` would send (``_to_model`` is what ``save`` serialises)."""
    return json.loads(workspace._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))


def overview_keys(workspace, prefix: str) -> set[str]:
    """Every y key of the Overview section, without the prefix (keys that lack it are kept as they are)."""
    return {
        key.removeprefix(prefix)
        for panel in sections(workspace)["Overview"].panels
        for key in panel.y
        if isinstance(key, str)
    }


def full_report(step: int = 10) -> StepReport:
    """A report with every aggregated metric and statistic, the bookkeeping values, every probe result
    and one alert per built-in rule: all the keys ``overview()`` can produce."""
    values = {f"spectral/model/{m}_{s}": 0.5 for m in AGGREGATED for s in ("mean", "median", "min", "max")}
    bookkeeping = ("update_norm_total", "alpha_reliable_frac", "measure_s", "overhead", "coverage", "layers", "skipped")
    values |= {f"spectral/model/{n}": 1.0 for n in bookkeeping}
    values |= {f"spectral/probe/{n}": 0.1 for n in ("kl", "loss", "loss_rel", "top1_agree", "seconds", "tokens")}
    values |= {f"spectral/{m}/{layer}": 0.25 for m in AGGREGATED for layer in GPT2_LAYERS[:3]}
    alerts = [Alert(rule=r, step=step, reason="r", message="m") for r in RULES]
    return StepReport.from_flat(step, values, alerts=alerts)


# ----------------------------------------------------------------------------- structure
@pytest.mark.parametrize(
    ("prefix", "step_key", "wire_x"),
    [("train/", "train/global_step", "train/global_step"), ("", "Step", "_step")],
)
def test_sections_panels_and_x_axis(prefix, step_key, wire_x):
    workspace = wandb_workspace("me", "proj", prefix=prefix)
    assert (workspace.entity, workspace.project, workspace.name) == ("me", "proj", "spectral_monitor")
    assert [(s.name, s.is_open) for s in workspace.sections] == [
        ("Overview", True),
        ("Heatmaps", True),
        ("Per-layer", False),
    ]
    assert workspace.settings.x_axis == step_key
    assert workspace.auto_generate_panels is False  # curated: no auto panel per logged key

    over = line_plots(workspace, "Overview")
    assert over["ρ₁: rank-1 energy share of ΔW"].y == [
        f"{prefix}spectral/model/rho1_mean",
        f"{prefix}spectral/model/rho1_max",
    ]
    assert over["heavy-tail exponent α"].y == [
        f"{prefix}spectral/model/{k}" for k in ("alpha_mean", "alpha_min", "alpha_max")
    ]
    assert over["effective and stable rank"].y == [
        f"{prefix}spectral/model/erank_mean",
        f"{prefix}spectral/model/stable_rank_mean",
    ]
    assert f"{prefix}spectral/model/update_norm_total" in over["update norm ‖ΔW‖_F"].y
    assert over["probe: KL(base ‖ current), nats/token"].y == [f"{prefix}spectral/probe/kl"]
    assert over["probe: held-out loss relative to the base"].y == [f"{prefix}spectral/probe/loss_rel"]
    assert over["trainer: loss"].y == [f"{prefix}loss"]
    assert over["trainer: reward"].y == [f"{prefix}reward"]
    assert over["monitor: share of wall time, share of layers measured"].y == [
        f"{prefix}spectral/model/overhead",
        f"{prefix}spectral/model/coverage",
    ]
    assert list(over)[:9] == [  # the first page of the section (3 x 3)
        "ρ₁: rank-1 energy share of ΔW",
        "effective and stable rank",
        "heavy-tail exponent α",
        "update norm ‖ΔW‖_F",
        "probe: KL(base ‖ current), nats/token",
        "probe: held-out loss relative to the base",
        "alerts fired (1 = fired at this step)",
        "trainer: loss",
        "trainer: reward",
    ]
    assert over["alerts fired (1 = fired at this step)"].y == [f"{prefix}spectral/alert/{r}" for r in RULES]

    heat = sections(workspace)["Heatmaps"].panels
    assert [p.media_keys for p in heat if type(p).__name__ == "MediaBrowser"] == [
        ["spectral/heatmap/rho1"],
        ["spectral/heatmap/alpha"],
        ["spectral/heatmap/erank"],
    ]
    assert [p.table_name for p in heat if type(p).__name__ == "WeavePanelSummaryTable"] == [
        "spectral/layers",
        "spectral/alerts",
    ]

    per_layer = sections(workspace)["Per-layer"].panels
    assert [p.title for p in per_layer] == [f"{m} by layer" for m in METRICS]  # one chart per metric
    assert [p.metric_regex for p in per_layer] == [f"^spectral/{m}/[^/]+$" for m in METRICS]
    assert all(p.y == [] for p in per_layer)

    # what save() would send: every line plot drawn against the step metric, regex mode on
    spec = wire_spec(workspace)
    assert spec["section"]["settings"]["xAxis"] == wire_x
    assert spec["section"]["settings"]["shouldAutoGeneratePanels"] is False
    wire_sections = spec["section"]["panelBankConfig"]["sections"]
    assert [(s["name"], s["isOpen"]) for s in wire_sections] == [
        ("Overview", True),
        ("Heatmaps", True),
        ("Per-layer", False),
    ]
    lines = [p for s in wire_sections for p in s["panels"] if p["viewType"] == "Run History Line Plot"]
    assert len(lines) == len(over) + len(METRICS)
    assert {p["config"]["xAxis"] for p in lines} == {wire_x}
    assert {s["localPanelSettings"]["xAxis"] for s in wire_sections} == {wire_x}
    regex_panels = [p["config"] for p in wire_sections[2]["panels"]]
    assert [(c["metricRegex"], c["useMetricRegex"], c["metrics"]) for c in regex_panels] == [
        (f"^spectral/{m}/[^/]+$", True, []) for m in METRICS
    ]


def test_overview_plots_every_key_the_trainer_logs():
    """The Overview panels against ``StepReport.overview()``, the keys the HF/Lightning adapters log:
    each of those keys is plotted (the probe's token count excepted) and no panel waits for a key
    that is never logged (the trainer's own keys aside)."""
    logged = set(full_report().overview())
    assert len(logged) > 25  # the report really has every kind of key
    for prefix in ("train/", ""):
        plotted = overview_keys(wandb_workspace("me", "proj", prefix=prefix), prefix)
        assert logged - plotted == {"spectral/probe/tokens"}
        assert plotted - logged == {"loss", "reward", "kl"}


def test_heatmaps_default_to_the_sinks_heatmaps():
    import inspect

    from spectral_monitor.sinks.wandb import WandbSink

    default = inspect.signature(WandbSink).parameters["heatmap_metrics"].default
    media = [p for p in sections(wandb_workspace("me", "proj")).get("Heatmaps").panels if hasattr(p, "media_keys")]
    assert [p.media_keys for p in media] == [[f"spectral/heatmap/{m}"] for m in default]


def test_builtin_alert_rules_are_the_library_rules():
    assert sorted(builtin_alert_rules()) == sorted(RULES)


def test_layer_regex_matches_exactly_one_metrics_layer_keys():
    regexes = {m: re.compile(layer_regex(m)) for m in METRICS}
    assert all(r.groups == 0 for r in regexes.values())  # W&B makes one panel per captured value
    for m in METRICS:
        for layer in ["transformer.h.10.mlp.c_fc", "model.layers.0.self_attn.q_proj", "net.2", "0"]:
            key = f"spectral/{m}/{layer}"
            assert [n for n, r in regexes.items() if r.search(key)] == [m], key
    others = [
        "spectral/model/rho1_mean",
        "spectral/model/rho1_mean/q",
        "train/spectral/rho1/transformer.h.0.attn.c_attn",  # the per-layer keys never carry a prefix
        "spectral/alpha_ks/transformer.h.0.attn.c_attn",  # a metric sharing alpha's prefix
        "spectral/rho1/a/b",
        "spectral/rho1/",
        "spectral/heatmap/rho1",
        "spectral/layers",
        "spectral/alert/rank1_collapse",
        "xspectral/rho1/h.0",
    ]
    for key in others:
        assert not any(r.search(key) for r in regexes.values()), key
    with pytest.raises(ConfigError, match=r"rho\.1"):
        layer_regex("rho.1")


def test_explicit_layers_replace_the_regex():
    workspace = wandb_workspace("me", "proj", layers=["h.0.attn", "h.1.attn"], layer_metrics=["rho1", "alpha"])
    per_layer = sections(workspace)["Per-layer"].panels
    assert [(p.y, p.metric_regex) for p in per_layer] == [
        (["spectral/rho1/h.0.attn", "spectral/rho1/h.1.attn"], None),
        (["spectral/alpha/h.0.attn", "spectral/alpha/h.1.attn"], None),
    ]
    assert (
        "useMetricRegex" not in wire_spec(workspace)["section"]["panelBankConfig"]["sections"][2]["panels"][0]["config"]
    )


def test_options_and_bad_arguments():
    workspace = wandb_workspace(
        "me",
        "proj",
        name="mine",
        prefix="",
        step_key="trainer/global_step",
        trainer_keys=["train_loss"],
        alert_rules=["mine"],
    )
    assert workspace.name == "mine"
    over = line_plots(workspace, "Overview")
    assert {p.x for p in over.values()} == {"trainer/global_step"}
    assert over["trainer: train_loss"].y == ["train_loss"]
    assert over["alerts fired (1 = fired at this step)"].y == ["spectral/alert/mine"]
    with pytest.raises(ConfigError, match="'train'"):
        wandb_workspace("me", "proj", prefix="train")
    with pytest.raises(ConfigError, match="entity"):
        wandb_workspace("", "proj")


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb_workspaces.workspaces", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match=r"spectral-monitor\[dashboards\]"):
        wandb_workspace("me", "proj")


# ----------------------------------------------------------------------------- against real W&B runs


def logged_keys(rows: list[dict]) -> set[str]:
    return {k for row in rows for k in row if not k.startswith("_")} | ({"_step"} if rows else set())


def check_panels_against_run(workspace, rows: list[dict], reports: list[StepReport], prefix: str) -> None:
    """The workspace against a real run's W&B history and the monitor's own JSONL log: every
    overview key the run logged is plotted, every per-layer chart selects exactly the logged series
    of its metric (one per measured layer), and the media and tables the panels show were logged."""
    keys = logged_keys(rows)
    plotted = {k for p in sections(workspace)["Overview"].panels for k in p.y}
    overview = {k for k in keys if k.startswith(tuple(f"{prefix}spectral/{s}/" for s in ("model", "alert", "probe")))}
    assert len(overview) > 15
    assert overview <= plotted
    for panel in sections(workspace)["Per-layer"].panels:
        metric = panel.title.removesuffix(" by layer")
        expected = {f"spectral/{metric}/{layer}" for r in reports for layer, v in r.layers.items() if metric in v}
        assert {k for k in keys if re.search(panel.metric_regex, k)} == expected, metric
    assert {k for k in keys if re.search(layer_regex("rho1"), k)}  # not vacuous: series were logged
    heat = sections(workspace)["Heatmaps"].panels
    assert {p.table_name for p in heat if type(p).__name__ == "WeavePanelSummaryTable"} - keys == {
        "spectral/alerts"  # logged only when an alert fires
    }
    if is_available("matplotlib"):
        assert {k for p in heat if type(p).__name__ == "MediaBrowser" for k in p.media_keys} <= keys


def test_panels_match_the_keys_a_wandb_sink_logs(wandb_dir):
    from spectral_monitor.sinks.wandb import WandbSink
    from tests.readers import read_wandb_history

    layers = GPT2_LAYERS
    sink = WandbSink(project="dash-test", log_layers=True)
    sink.start({})
    for i, step in enumerate([5, 10]):
        # every aggregated metric (and a bookkeeping one) per layer: the sink logs the LAYER_SCALARS ones
        values = {f"spectral/{m}/{layer}": 0.1 * i + j / 100 for m in AGGREGATED for j, layer in enumerate(layers)}
        values |= {"spectral/alpha_ks/transformer.h.0.attn.c_attn": 0.2, "spectral/model/rho1_mean": 0.5}
        sink.write(
            StepReport.from_flat(
                step, values, alerts=[Alert(rule="rank1_collapse", step=step, reason="r", message="m")]
            )
        )
    sink.finish()
    keys = logged_keys(read_wandb_history(wandb_dir))

    workspace = wandb_workspace("me", "proj", prefix="")
    assert {p.x for p in line_plots(workspace, "Overview").values()} == {"Step"}
    assert "_step" in keys  # "Step" is W&B's own _step, the sink's step= (wire name checked above)
    charted = set()
    for panel in sections(workspace)["Per-layer"].panels:
        metric = panel.title.removesuffix(" by layer")
        matched = {k for k in keys if re.search(panel.metric_regex, k)}
        assert matched == {f"spectral/{metric}/{layer}" for layer in layers}, metric
        charted |= matched
    # every per-layer series the sink logged has its chart (it logs fewer metrics than the report has)
    assert charted == {k for k in keys if k.count("/") == 2 and k.split("/")[2] in layers}
    heat = sections(workspace)["Heatmaps"].panels
    tables = {p.table_name for p in heat if type(p).__name__ == "WeavePanelSummaryTable"}
    assert tables <= keys
    if is_available("matplotlib"):
        assert {k for p in heat if type(p).__name__ == "MediaBrowser" for k in p.media_keys} <= keys
    assert {"spectral/model/rho1_mean", "spectral/alert/rank1_collapse"} <= overview_keys(workspace, "") & keys


@pytest.mark.slow
def test_panels_match_the_keys_of_a_hugging_face_run(tmp_path, wandb_dir, monkeypatch):
    """A real ``transformers.Trainer`` run reporting to W&B (``log_layers=True``): the overview arrives as
    ``train/spectral/...`` against ``train/global_step``, the per-layer series unprefixed."""
    transformers = pytest.importorskip("transformers")
    import torch

    from spectral_monitor.integrations.hf import SpectralMonitorCallback
    from tests.integrations.conftest import build_tiny_gpt2
    from tests.readers import read_wandb_history

    monkeypatch.setenv("WANDB_PROJECT", "dash-test")

    class Tokens(torch.utils.data.Dataset):
        ids = torch.randint(0, 14, (32, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        logging_steps=2,
        save_strategy="no",
        report_to=["wandb"],
        use_cpu=True,
        disable_tqdm=True,
    )
    cb = SpectralMonitorCallback(every_n_steps=2, log_layers=True)
    trainer = transformers.Trainer(model=build_tiny_gpt2(), args=args, train_dataset=Tokens(), callbacks=[cb])
    try:
        trainer.train()
    finally:
        import wandb

        wandb.finish()
    rows = read_wandb_history(wandb_dir)
    assert [r["train/global_step"] for r in rows if "train/spectral/model/rho1_mean" in r] == [1, 2, 4]
    assert [r["train/global_step"] for r in rows if "train/loss" in r] == [2, 4]

    workspace = wandb_workspace("me", "proj")  # the defaults are the HF ones
    assert {p.x for p in line_plots(workspace, "Overview").values()} == {"train/global_step"}
    assert "train/loss" in line_plots(workspace, "Overview")["trainer: loss"].y
    reports = read_jsonl(tmp_path / "out" / "spectral_monitor" / "metrics.jsonl")
    check_panels_against_run(workspace, rows, reports, "train/")


@pytest.mark.slow
def test_panels_match_the_keys_of_a_lightning_run(tmp_path, wandb_dir):
    """A real Lightning run with ``WandbLogger`` (``log_layers=True``): overview and per-layer series
    arrive unprefixed against ``trainer/global_step``."""
    L = pytest.importorskip("lightning.pytorch")
    import torch
    from lightning.pytorch.loggers import WandbLogger
    from torch import nn

    from spectral_monitor.integrations.lightning import SpectralMonitorCallback
    from tests.readers import read_wandb_history

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(48, 8, generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1].sin()), batch_size=8)
    logger = WandbLogger(project="dash-test", save_dir=str(wandb_dir), offline=True)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=6,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[SpectralMonitorCallback(every_n_steps=3, rank=4, log_layers=True)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(MLP(), data)
    logger.experiment.finish()
    rows = read_wandb_history(wandb_dir)
    assert [r["trainer/global_step"] for r in rows if "spectral/model/rho1_mean" in r] == [1, 3, 6]
    assert "train_loss" in logged_keys(rows)

    workspace = wandb_workspace("me", "proj", prefix="", step_key="trainer/global_step", trainer_keys=["train_loss"])
    assert line_plots(workspace, "Overview")["trainer: train_loss"].y == ["train_loss"]
    check_panels_against_run(workspace, rows, read_jsonl(tmp_path / "spectral_monitor" / "metrics.jsonl"), "")


# ----------------------------------------------------------------------------- CLI and saving
def test_dry_run_prints_sections_and_panels(capsys):
    assert main(["--entity", "me", "--project", "proj", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("W&B workspace 'spectral_monitor' in me/proj, x-axis train/global_step\n")
    assert "[Overview] (open, 22 panels)" in out
    assert "[Heatmaps] (open, 5 panels)" in out
    assert "[Per-layer] (collapsed, 10 panels)" in out
    assert "  line   rho1 by layer: /^spectral/rho1/[^/]+$/  (x: train/global_step)" in out
    assert "train/spectral/model/rho1_mean, train/spectral/model/rho1_max" in out
    assert "  media  rho1: layer × step: spectral/heatmap/rho1" in out
    assert "  table  spectral/layers" in out
    assert out == describe(wandb_workspace("me", "proj")) + "\n"

    assert main(["--entity", "me", "--project", "proj", "--prefix", "", "--name", "n", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "'n' in me/proj, x-axis Step" in out
    assert "spectral/model/rho1_mean, spectral/model/rho1_max" in out
    assert "train/" not in out

    assert (
        main(["--entity", "me", "--project", "proj", "--prefix", "", "--step-key", "trainer/global_step", "--dry-run"])
        == 0
    )
    assert "x-axis trainer/global_step" in capsys.readouterr().out


def test_cli_errors(capsys):
    assert main(["--entity", "me", "--project", "proj", "--prefix", "train", "--dry-run"]) == 1
    assert "prefix must be '' or end with '/'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--project", "proj"])
    assert exc.value.code == 2
    assert "--entity" in capsys.readouterr().err


def offline_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment with no W&B login (empty home and config dir) and a W&B server address nothing
    listens on (port 9), so nothing can leave the machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {
        "HOME": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(ROOT),
        **extra,
    }
    return env


def run_cli(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The CLI in a fresh process. Output goes to files, not pipes: W&B's service process may
    outlive the CLI for a while, holding inherited pipes open."""
    code = "import sys; from spectral_monitor.dashboards import main; sys.exit(main(sys.argv[1:]))"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.run(
            [sys.executable, "-c", code, "--entity", "me", "--project", "proj"],
            env=env,
            stdout=stdout,
            stderr=stderr,
            timeout=120,
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), err.read_text())


def test_save_without_login_says_what_is_needed(tmp_path):
    proc = run_cli(tmp_path, offline_env(tmp_path))
    assert proc.returncode == 1, proc.stderr
    assert "could not save the workspace 'spectral_monitor' to me/proj" in proc.stderr
    assert "No API key configured" in proc.stderr  # W&B's own reason
    assert "wandb login" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "saved:" not in proc.stdout


@pytest.mark.slow
def test_save_with_an_unreachable_server_says_so(tmp_path):
    """A login but no server (what a machine without network sees): W&B's verification fails."""
    proc = run_cli(tmp_path, offline_env(tmp_path, WANDB_API_KEY="0" * 40, WANDB_HTTP_TIMEOUT="2"))
    assert proc.returncode == 1, proc.stderr
    assert "could not save the workspace" in proc.stderr, proc.stderr
    assert "http://127.0.0.1:9" in proc.stderr, proc.stderr  # the server it tried
    assert "network connection" in proc.stderr, proc.stderr


def test_save_workspace_raises_dashboard_error(tmp_path, monkeypatch):
    """The Python API raises :class:`DashboardError` (run in-process: the environment has no login)."""
    wandb = pytest.importorskip("wandb")
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    for key, value in offline_env(tmp_path).items():
        if key.startswith("WANDB_") or key == "HOME":
            monkeypatch.setenv(key, value)
    wandb.teardown()  # W&B reads its settings once per process
    try:
        with pytest.raises(DashboardError, match="wandb login") as exc:
            save_workspace(wandb_workspace("me", "proj"))
        assert isinstance(exc.value.__cause__, wandb.errors.Error)
    finally:
        wandb.teardown()
