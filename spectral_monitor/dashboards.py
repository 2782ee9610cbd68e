"""A ready W&B workspace for spectral_monitor runs, defined in code with ``wandb-workspaces``.

``spectral-monitor wandb-workspace --entity E --project P`` creates it (``--dry-run`` prints it);
in Python::

    from spectral_monitor.dashboards import save_workspace, wandb_workspace
    url = save_workspace(wandb_workspace("my-team", "my-project"))

Three sections:

* **Overview** (open): one line plot per group of model-level values (the keys of
  :meth:`~spectral_monitor.records.StepReport.overview`: ρ₁ mean/max, effective and stable rank, α
  mean/min/max, update norm, alignment, intruders, sparsity), the probe's KL, loss and top-1
  agreement, the trainer's loss/reward/KL and the alert flags.
* **Heatmaps** (open): the layer × step heatmap images ``spectral/heatmap/<metric>``, the per-layer
  table ``spectral/layers`` and the alert table ``spectral/alerts`` (latest logged version of each).
* **Per-layer** (collapsed): one line plot per metric with every layer's series
  ``spectral/<metric>/<layer>`` as a line (logged with ``log_layers=True``). The lines are selected
  by a regular expression (``^spectral/rho1/[^/]+$``), so layers need not be known in advance;
  W&B documents these multi-metric plots as a preview feature. Pass ``layers=[...]`` to list the
  keys explicitly instead.

Key prefixes and x-axes (``prefix`` / ``step_key``): the overview reaches W&B through the
trainer's own logging, so it carries the trainer's prefix, and every panel is drawn against the
trainer's step metric.

===============================  ==========  ===========================
logged by                        ``prefix``  ``step_key`` (x-axis)
===============================  ==========  ===========================
HF ``Trainer`` / TRL             ``train/``  ``train/global_step``
Lightning (``WandbLogger``)      ``""``      ``trainer/global_step``
a plain :class:`WandbSink`       ``""``      ``Step`` (W&B's ``_step``)
===============================  ==========  ===========================

Per-layer series, heatmaps and tables are logged by the W&B sink itself and never carry a prefix.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Sequence
from typing import Any

from spectral_monitor import alerts
from spectral_monitor._imports import require
from spectral_monitor.errors import ConfigError, SpectralMonitorError
from spectral_monitor.records import LAYER_SCALARS, PREFIX

__all__ = [
    "DashboardError",
    "builtin_alert_rules",
    "describe",
    "layer_regex",
    "main",
    "save_workspace",
    "wandb_workspace",
]

#: the step metric each trainer's W&B integration logs, by key prefix (see the module docstring)
_STEP_KEYS = {"train/": "train/global_step", "": "Step"}
_FEATURE = "the W&B workspace (spectral_monitor.dashboards)"
_METRIC_NAME = re.compile(r"[A-Za-z0-9_]+")  # metric names need no escaping in a regex


class DashboardError(SpectralMonitorError, RuntimeError):
    """The workspace could not be saved to W&B (no login, no network, or the server refused)."""


def builtin_alert_rules() -> tuple[str, ...]:
    """Names of the library's alert rules (``spectral/alert/<name>``), from the rule classes' defaults."""
    names = []
    for obj in vars(alerts).values():
        if isinstance(obj, type) and issubclass(obj, alerts.Rule) and dataclasses.is_dataclass(obj):
            default = next(f.default for f in dataclasses.fields(obj) if f.name == "name")
            if default and default not in names:
                names.append(default)
    return tuple(names)


def layer_regex(metric: str) -> str:
    """Regular expression of every layer's key of ``metric``: ``^spectral/<metric>/[^/]+$``.

    Anchored and without groups, so it means the same in W&B's regex engines (JavaScript, RE2)
    and Python's ``re``; layer names never contain ``/``, so the other sections (``spectral/model/...``)
    and metrics sharing a prefix (``alpha`` and ``alpha_ks``) are not matched."""
    if not _METRIC_NAME.fullmatch(metric):
        raise ConfigError(f"a per-layer metric name is letters, digits and '_', got {metric!r}")
    return f"^{PREFIX}/{metric}/[^/]+$"


def wandb_workspace(
    entity: str,
    project: str,
    *,
    name: str = "spectral_monitor",
    prefix: str = "train/",
    step_key: str | None = None,
    layer_metrics: Sequence[str] = LAYER_SCALARS,
    heatmap_metrics: Sequence[str] = ("rho1", "alpha", "erank"),
    trainer_keys: Sequence[str] = ("loss", "reward", "kl"),
    alert_rules: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
) -> Any:
    """Build (not save) the workspace: a ``wandb_workspaces.workspaces.Workspace``.

    Args:
        entity, project: where the workspace is saved (the W&B user or team, and the project).
        name: the workspace's name in the W&B UI.
        prefix: the trainer's prefix of the overview keys: ``"train/"`` (HF Trainer, TRL) or ``""``
            (Lightning, a plain ``WandbSink``); must be empty or end with ``/``.
        step_key: the x-axis metric; default ``train/global_step`` for ``prefix="train/"``, else
            ``Step`` (W&B's own step, right for a plain ``WandbSink``; pass
            ``"trainer/global_step"`` for Lightning).
        layer_metrics: per-layer metrics with a chart in the Per-layer section (default: those a
            ``WandbSink(log_layers=True)`` logs, :data:`~spectral_monitor.records.LAYER_SCALARS`).
        heatmap_metrics: metrics with a heatmap image (the ``WandbSink`` argument of that name, same default).
        trainer_keys: the trainer's own scalars to plot, without prefix (``loss`` -> ``train/loss``;
            TRL's GRPO logs ``reward`` and ``kl``; Lightning: the names given to ``self.log``).
        alert_rules: rules whose ``spectral/alert/<rule>`` flag is plotted; default
            :func:`builtin_alert_rules` (add the names of your own rules).
        layers: list these layers' keys in the per-layer charts instead of selecting them by regex
            (for W&B servers without regex line plots).
    """
    ws = require("wandb_workspaces.workspaces", _FEATURE)
    wr = require("wandb_workspaces.reports.v2", _FEATURE)
    if not entity or not project:
        raise ConfigError(f"entity and project must be non-empty, got entity={entity!r}, project={project!r}")
    if prefix and not prefix.endswith("/"):
        raise ConfigError(f"prefix must be '' or end with '/', as in 'train/'; got {prefix!r}")
    if step_key is None:
        step_key = _STEP_KEYS.get(prefix, "Step")
    rules = builtin_alert_rules() if alert_rules is None else tuple(alert_rules)

    def line(title: str, keys: Sequence[str], **kw: Any) -> Any:
        return wr.LinePlot(title=title, x=step_key, y=list(keys), **kw)

    def section(title: str, panels: list[Any], *, open_: bool, columns: int = 3, rows: int = 2) -> Any:
        return ws.Section(
            name=title,
            panels=panels,
            is_open=open_,
            layout_settings=ws.SectionLayoutSettings(columns=columns, rows=rows),
            panel_settings=ws.SectionPanelSettings(x_axis=step_key),
        )

    overview = _overview_panels(line, prefix, rules, trainer_keys)
    heatmaps = [
        *(wr.MediaBrowser(title=f"{m}: layer × step", media_keys=[f"{PREFIX}/heatmap/{m}"]) for m in heatmap_metrics),
        wr.WeavePanelSummaryTable(table_name=f"{PREFIX}/layers"),
        wr.WeavePanelSummaryTable(table_name=f"{PREFIX}/alerts"),
    ]
    if layers is None:
        per_layer = [line(f"{m} by layer", [], metric_regex=layer_regex(m)) for m in layer_metrics]
    else:
        per_layer = [line(f"{m} by layer", [f"{PREFIX}/{m}/{layer}" for layer in layers]) for m in layer_metrics]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        settings=ws.WorkspaceSettings(x_axis=step_key),
        sections=[
            section("Overview", overview, open_=True, rows=3),
            section("Heatmaps", heatmaps, open_=True, columns=2),
            section("Per-layer", per_layer, open_=False),
        ],
    )


def _overview_panels(line: Any, prefix: str, rules: Sequence[str], trainer_keys: Sequence[str]) -> list[Any]:
    """The Overview section's line plots; ``line(title, keys)`` builds one."""

    def model(*names: str) -> list[str]:
        return [f"{prefix}{PREFIX}/model/{n}" for n in names]

    def probe(*names: str) -> list[str]:
        return [f"{prefix}{PREFIX}/probe/{n}" for n in names]

    # the first page (3 x 3 panels) holds the values to watch; the rest of the aggregates follow
    return [
        line("ρ₁: rank-1 energy share of ΔW", model("rho1_mean", "rho1_max")),
        line("effective and stable rank", model("erank_mean", "stable_rank_mean")),
        line("heavy-tail exponent α", model("alpha_mean", "alpha_min", "alpha_max")),
        line("update norm ‖ΔW‖_F", model("update_norm_total", "update_norm_mean")),
        line("probe: KL(base ‖ current), nats/token", probe("kl")),
        line("probe: held-out loss relative to the base", probe("loss_rel")),
        line("alerts fired (1 = fired at this step)", [f"{prefix}{PREFIX}/alert/{rule}" for rule in rules]),
        *(line(f"trainer: {key}", [f"{prefix}{key}"]) for key in trainer_keys),
        line("relative update ‖ΔW‖/‖W₀‖", model("update_rel_mean", "update_rel_max")),
        line("intruder dimensions", model("intruders_mean", "intruders_max")),
        line("top direction vs previous measurement", model("align_prev_mean", "overlap_prev_mean")),
        line("top direction inside the base's top subspace", model("align_base_mean")),
        line("top-k energy share", model("topk_energy_mean")),
        line("spectral gap σ₁/σ₂", model("gap_mean")),
        line("sparsity of ΔW", model("sparsity_mean")),
        line("share of layers with a reliable α fit", model("alpha_reliable_frac")),
        line("probe: held-out loss", probe("loss")),
        line("probe: top-1 agreement with the base", probe("top1_agree")),
        line("monitor cost, seconds per measurement", [*model("measure_s"), *probe("seconds")]),
        line("monitor: share of wall time, share of layers measured", model("overhead", "coverage")),
    ]


def describe(workspace: Any) -> str:
    """The sections and panels of ``workspace`` as text: one line per panel with its keys."""
    where = f"{workspace.entity}/{workspace.project}"
    out = [f"W&B workspace {workspace.name!r} in {where}, x-axis {workspace.settings.x_axis}"]
    for section in workspace.sections:
        out.append(f"[{section.name}] ({'open' if section.is_open else 'collapsed'}, {len(section.panels)} panels)")
        for panel in section.panels:
            kind = type(panel).__name__
            if kind == "LinePlot":
                keys = f"/{panel.metric_regex}/" if panel.metric_regex else ", ".join(map(str, panel.y))
                out.append(f"  line   {panel.title}: {keys}  (x: {panel.x})")
            elif kind == "MediaBrowser":
                out.append(f"  media  {panel.title}: {', '.join(panel.media_keys)}")
            elif kind == "WeavePanelSummaryTable":
                out.append(f"  table  {panel.table_name}")
            else:
                out.append(f"  {kind}")
    return "\n".join(out)


def save_workspace(workspace: Any) -> str:
    """Save ``workspace`` (from :func:`wandb_workspace`) to W&B as a new saved view; returns its URL.

    Needs a network connection to the W&B server and a logged-in user (``wandb login``, or
    ``WANDB_API_KEY``; ``WANDB_BASE_URL`` for a private server). Raises :class:`DashboardError`
    naming the cause when there is no login, the server cannot be reached or it refuses.
    Saving again creates another view: W&B keeps both.
    """
    wandb = require("wandb", _FEATURE)
    hint = (
        "saving a W&B workspace needs a network connection to the W&B server and a logged-in user "
        "(run `wandb login` or set WANDB_API_KEY); `spectral-monitor wandb-workspace --dry-run` shows it offline"
    )
    try:
        wandb.Api()  # checks the login with the server: fails here, before anything is sent, when offline
        workspace.save()
        return workspace.url
    except wandb.errors.Error as exc:
        raise DashboardError(
            f"could not save the workspace {workspace.name!r} to {workspace.entity}/{workspace.project}: {exc}. {hint}"
        ) from exc


def main(argv: list[str] | None = None) -> int:
    """The CLI: ``spectral-monitor wandb-workspace --entity E --project P [--name N] [--prefix P]
    [--step-key K] [--dry-run]``; returns the exit status (1 when saving failed)."""
    parser = argparse.ArgumentParser(
        prog="spectral-monitor wandb-workspace",
        description="create a W&B workspace (saved view) with spectral_monitor's charts in a project",
    )
    parser.add_argument("--entity", required=True, help="W&B user or team that owns the project")
    parser.add_argument("--project", required=True, help="W&B project the runs log to")
    parser.add_argument("--name", default="spectral_monitor", help="workspace name (default: %(default)s)")
    parser.add_argument(
        "--prefix",
        default="train/",
        help="prefix of the model-level keys: 'train/' for HF Trainer/TRL (default), '' for Lightning or a WandbSink",
    )
    parser.add_argument(
        "--step-key",
        default=None,
        help="x-axis metric (default: train/global_step with prefix 'train/', else Step; "
        "Lightning: trainer/global_step)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sections and panels, save nothing")
    args = parser.parse_args(argv)
    try:
        workspace = wandb_workspace(
            args.entity, args.project, name=args.name, prefix=args.prefix, step_key=args.step_key
        )
        if args.dry_run:
            print(describe(workspace))
            return 0
        print(f"saved: {save_workspace(workspace)}")
        return 0
    except SpectralMonitorError as exc:
        print(f"spectral-monitor wandb-workspace: error: {exc}", file=sys.stderr)
        return 1
