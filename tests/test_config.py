"""MonitorConfig: validation messages show the bad value, frozen/keyword-only, the schedule."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from spectral_monitor.config import BASE_STORES, MonitorConfig, build_config
from spectral_monitor.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"every_n_steps": 0}, "every_n_steps must be None or a positive int, got 0"),
        ({"overhead": 0.0}, "overhead must be a fraction in (0, 1], got 0.0"),
        ({"overhead": 2}, "got 2"),
        ({"max_every": 0}, "max_every must be a positive int, got 0"),
        ({"rank": -3}, "rank must be a positive int, got -3"),
        ({"rank": True}, "rank must be a positive int, got True"),
        ({"rank": 4.0}, "rank must be a positive int, got 4.0"),
        ({"align_k": 0}, "align_k must be a positive int, got 0"),
        ({"base_k": "8"}, "base_k must be a positive int, got '8'"),
        ({"alpha_min_tail": 0}, "alpha_min_tail must be a positive int, got 0"),
        ({"memory_budget_mb": 0}, "memory_budget_mb must be a positive int, got 0"),
        ({"oversample": -1}, "oversample must be an int >= 0, got -1"),
        ({"niter": 1.5}, "niter must be an int >= 0, got 1.5"),
        ({"full_every": -2}, "full_every must be an int >= 0, got -2"),
        ({"seed": False}, "seed must be an int >= 0, got False"),
        ({"rank": 64, "max_rank": 32}, "max_rank (32) must be >= rank (64)"),
        ({"base_store": "gpu"}, "got 'gpu'"),
        ({"base_store": "disk"}, "base_dir"),
        ({"intruder_threshold": 1.5}, "intruder_threshold must be in (0, 1), got 1.5"),
        ({"intruder_threshold": 0.0}, "got 0.0"),
        ({"alpha_max_ks": 0.0}, "alpha_max_ks must be in (0, 1], got 0.0"),
        ({"layers": "attn"}, "got 'attn'"),
        ({"schedule": 5}, "got 5"),
    ],
)
def test_validation_errors_show_the_bad_value(kwargs, shown):
    with pytest.raises(ConfigError) as info:
        MonitorConfig(**kwargs)
    assert shown in str(info.value)
    assert isinstance(info.value, ValueError)  # plain `except ValueError` works


def test_defaults_are_valid_and_documented():
    cfg = MonitorConfig()
    assert cfg.layers == "all-linear"
    assert cfg.every_n_steps is None and cfg.overhead == 0.01 and cfg.measure_first  # the budget sets the cadence
    assert cfg.base_store in BASE_STORES and cfg.base_store == "auto"
    assert cfg.rank <= cfg.max_rank


def test_frozen_and_keyword_only():
    cfg = MonitorConfig(rank=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 16  # type: ignore[misc]
    with pytest.raises(TypeError):
        MonitorConfig("all-linear")  # type: ignore[misc]


def test_sequences_become_tuples_and_regex_layers_are_accepted():
    cfg = MonitorConfig(layers=["a.q_proj", "a.k_proj"], exclude=["lm_head"])
    assert cfg.layers == ("a.q_proj", "a.k_proj")
    assert cfg.exclude == ("lm_head",)
    hash(cfg)  # frozen + tuples: hashable
    assert MonitorConfig(layers="re:attn").layers == "re:attn"
    assert MonitorConfig(base_store="disk", base_dir="/tmp/x").base_dir == "/tmp/x"


def test_is_scheduled_is_the_periodic_schedule():
    cfg = MonitorConfig(every_n_steps=5)  # the first step seen is added by the run (measure_first)
    assert [s for s in range(0, 21) if cfg.is_scheduled(s)] == [0, 5, 10, 15, 20]
    cfg = MonitorConfig(every_n_steps=1)
    assert all(cfg.is_scheduled(s) for s in range(1, 10))


def test_is_scheduled_custom_callable_overrides_everything():
    calls = []

    def squares(step: int) -> bool:
        calls.append(step)
        return int(step**0.5) ** 2 == step

    cfg = MonitorConfig(every_n_steps=5, schedule=squares)
    assert [s for s in range(1, 30) if cfg.is_scheduled(s)] == [1, 4, 9, 16, 25]
    assert calls == list(range(1, 30))
    # the callable wins even over measure_first at step 1, and its truthy values become bool
    never = MonitorConfig(schedule=lambda step: 0)
    assert never.is_scheduled(1) is False
    assert MonitorConfig(schedule=lambda step: "yes").is_scheduled(3) is True


def test_to_dict_is_plain_json():
    def every_third(step: int) -> bool:
        return step % 3 == 0

    cfg = MonitorConfig(layers=["x"], exclude=("y",), schedule=every_third)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["layers"] == ["x"] and data["exclude"] == ["y"]
    assert data["schedule"] == "every_third"
    assert data["rank"] == 32
    assert MonitorConfig().to_dict()["schedule"] is None
    assert MonitorConfig().to_dict()["layers"] == "all-linear"


def test_exclude_string_is_one_regex():
    assert MonitorConfig(exclude="pooler").exclude == ("pooler",)


@pytest.mark.parametrize(("kwargs", "shown"), [({"layers": "re:["}, "re:["), ({"exclude": ["ok", "("]}, "'('")])
def test_bad_regex_is_a_config_error_at_construction(kwargs, shown):
    with pytest.raises(ConfigError, match="not a valid regular expression") as info:
        MonitorConfig(**kwargs)
    assert shown in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_a_cuda_device_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA device"):
        MonitorConfig(device="cuda")
    with pytest.raises(ConfigError, match="not a device"):
        MonitorConfig(device="gpu0")
    assert MonitorConfig(device="cpu").device == "cpu"


def test_a_misspelt_option_suggests_the_right_name():
    from torch import nn

    from spectral_monitor import MonitorRun, SpectralMonitor

    for build in (
        lambda: MonitorRun(nn.Linear(4, 4), every_n_step=5),
        lambda: SpectralMonitor(nn.Linear(4, 4), rnak=4),
    ):
        with pytest.raises(ConfigError, match="did you mean") as info:
            build()
        assert "'every_n_steps'" in str(info.value) or "'rank'" in str(info.value)
    with pytest.raises(ConfigError, match="either config"):
        build_config(MonitorConfig(), {"rank": 4}, owner="x")
