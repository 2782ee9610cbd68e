"""The TRL adapter driving real TRL trainers (GRPO, SFT, DPO, PEFT LoRA) on a tiny GPT-2 (CPU).

Task: fixed-width addition prompts (``"07+12="``), answer digits. The untrained model almost never
gets an exact match, so the tests use a shaped reward (share of answer characters in the right
place), which gives GRPO groups reward variance, hence gradients, from the first step.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from spectral_monitor.integrations.trl import SpectralMonitorCallback  # noqa: E402
from spectral_monitor.layers import select_layers  # noqa: E402
from spectral_monitor.sinks.jsonl import read_jsonl  # noqa: E402
from tests.integrations.conftest import addition_texts, probe_pairs, run_recipe  # noqa: E402

# TRL 1.16 itself still calls transformers' deprecated ``is_gradient_checkpointing``
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

COMMON = {
    "use_cpu": True,
    "bf16": False,
    "activation_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "disable_tqdm": True,
    "seed": 0,
    "lr_scheduler_type": "constant",
    "dataloader_num_workers": 0,
}


def addition_rows(n: int = 64, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(100), rng.randrange(100)) for _ in range(n)]


def prompts_dataset(n: int = 64):
    return datasets.Dataset.from_list(
        [{"prompt": f"{a:02d}+{b:02d}=", "answer": str(a + b)} for a, b in addition_rows(n)]
    )


def shaped_reward(completions, answer, **kwargs) -> list[float]:
    """Share of answer characters matched position by position (1.0 = exact)."""
    return [sum(x == y for x, y in zip(c.strip(), a)) / len(a) for c, a in zip(completions, answer)]


def grpo_args(out, **overrides) -> GRPOConfig:
    kw = {
        **COMMON,
        "output_dir": str(out),
        "max_steps": 3,
        "per_device_train_batch_size": 16,
        "num_generations": 4,
        "max_completion_length": 4,
        "temperature": 1.0,
        "learning_rate": 3e-3,
        "logging_steps": 1,
        "disable_dropout": True,
    }
    kw.update(overrides)
    return GRPOConfig(**kw)


def jsonl(out) -> list:
    return read_jsonl(out / "spectral_monitor" / "metrics.jsonl")


def update_norms(model, base) -> dict[str, float]:
    """‖W_t − W_0‖_F per monitored layer, ``base`` a module with the same parameter names."""
    params = dict(base.named_parameters())
    return {
        s.name: float((s.parameter().detach().float() - params[s.param_name].detach().float()).norm())
        for s in select_layers(model)
    }


def test_grpo_logs_spectra_and_keeps_the_reward_line(tmp_path, tiny_gpt2, char_tokenizer):
    cb = SpectralMonitorCallback(every_n_steps=2, rank=8)
    trainer = GRPOTrainer(
        model=tiny_gpt2(),
        reward_funcs=shaped_reward,
        args=grpo_args(tmp_path, max_steps=4),
        train_dataset=prompts_dataset(),
        processing_class=char_tokenizer,
        callbacks=[cb],
    )
    trainer.train()
    hist = trainer.state.log_history
    assert [e["step"] for e in hist if "reward" in e] == [1, 2, 3, 4]  # TRL's log() still owns its metrics
    assert [e["step"] for e in hist if "spectral/model/rho1_mean" in e] == [1, 2, 4]
    assert not any("reward" in e and "spectral/model/rho1_mean" in e for e in hist)  # not stolen
    assert all("completions/mean_length" in e for e in hist if "reward" in e)
    reports = jsonl(tmp_path)
    assert [r.step for r in reports] == [1, 2, 4]
    rewards = {e["step"]: e["reward"] for e in hist if "reward" in e}
    # context = the latest values TRL logged before the measurement (logging follows on_step_end)
    assert "spectral/context/reward" not in reports[0].metrics
    assert reports[1].metrics["spectral/context/reward"] == pytest.approx(rewards[1])
    assert reports[2].metrics["spectral/context/reward"] == pytest.approx(rewards[3])
    assert cb.run.monitor.store.kind == "device"  # beta=0: no reference model, own snapshot
    assert reports[-1].metrics["spectral/model/update_norm_total"] > 0


def test_grpo_with_kl_uses_the_reference_model_as_base(tmp_path, tiny_gpt2, char_tokenizer):
    path = tmp_path / "tiny"
    tiny_gpt2().save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    cb = SpectralMonitorCallback(every_n_steps=2, rank=8)
    trainer = GRPOTrainer(
        model=str(path),
        reward_funcs=shaped_reward,
        args=grpo_args(tmp_path / "out", beta=0.1),
        train_dataset=prompts_dataset(),
        processing_class=char_tokenizer,
        callbacks=[cb],
    )
    trainer.train()
    store = cb.run.monitor.store
    assert trainer.ref_model is not None
    assert store.kind == "reference" and store.nbytes == 0  # no copy of the weights
    assert any("kl" in e for e in trainer.state.log_history)
    reports = jsonl(tmp_path / "out")
    assert [r.step for r in reports] == [1, 2, 3]
    got = reports[-1].layer_values("update_norm")
    assert got == pytest.approx(update_norms(trainer.model, trainer.ref_model), rel=1e-4)
    original = type(trainer.ref_model).from_pretrained(path)  # the reference is still the original model
    assert got == pytest.approx(update_norms(trainer.model, original), rel=1e-4)
    assert min(got.values()) > 0


def test_sft_and_dpo_log_spectra(tmp_path, tiny_gpt2, char_tokenizer):
    rows = addition_rows(64)
    sft_data = datasets.Dataset.from_list([{"prompt": f"{a:02d}+{b:02d}=", "completion": str(a + b)} for a, b in rows])
    cb = SpectralMonitorCallback(every_n_steps=2, rank=8)
    sft = SFTTrainer(
        model=tiny_gpt2(),
        args=SFTConfig(
            **COMMON,
            output_dir=str(tmp_path / "sft"),
            max_steps=3,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            logging_steps=1,
        ),
        train_dataset=sft_data,
        processing_class=char_tokenizer,
        callbacks=[cb],
    )
    sft.train()
    hist = sft.state.log_history
    assert [e["step"] for e in hist if "loss" in e] == [1, 2, 3]
    assert [e["step"] for e in hist if "spectral/model/rho1_mean" in e] == [1, 2, 3]
    assert all("mean_token_accuracy" in e for e in hist if "loss" in e)  # SFT's own metrics kept
    assert [r.step for r in jsonl(tmp_path / "sft")] == [1, 2, 3]

    dpo_data = datasets.Dataset.from_list(
        [{"prompt": f"{a:02d}+{b:02d}=", "chosen": str(a + b), "rejected": str((a + b + 7) % 200)} for a, b in rows]
    )
    policy = tiny_gpt2()
    cb = SpectralMonitorCallback(every_n_steps=2, rank=8)
    dpo = DPOTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=DPOConfig(
            **COMMON,
            output_dir=str(tmp_path / "dpo"),
            max_steps=2,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            logging_steps=1,
        ),
        train_dataset=dpo_data,
        processing_class=char_tokenizer,
        callbacks=[cb],
    )
    dpo.train()
    assert cb.run.monitor.store.kind == "reference"  # DPO's reference model is the base
    hist = dpo.state.log_history
    assert [e["step"] for e in hist if "spectral/model/rho1_mean" in e] == [1, 2]
    assert all("rewards/margins" in e for e in hist if "loss" in e)
    reports = jsonl(tmp_path / "dpo")
    assert reports[-1].layer_values("update_norm") == pytest.approx(update_norms(dpo.model, dpo.ref_model), rel=1e-4)


def test_a_reference_model_that_differs_is_not_used_as_base(tmp_path, tiny_gpt2, char_tokenizer, caplog):
    rows = addition_rows(16)
    data = datasets.Dataset.from_list(
        [{"prompt": f"{a:02d}+{b:02d}=", "chosen": str(a + b), "rejected": str((a + b + 7) % 200)} for a, b in rows]
    )
    cb = SpectralMonitorCallback(every_n_steps=2, rank=8)
    args = DPOConfig(**COMMON, output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, logging_steps=1)
    dpo = DPOTrainer(
        model=tiny_gpt2(seed=0),
        ref_model=tiny_gpt2(seed=1),  # another checkpoint: ΔW against it would not be the update
        args=args,
        train_dataset=data,
        processing_class=char_tokenizer,
        callbacks=[cb],
    )
    dpo.train()
    assert cb.run.monitor.store.kind == "device"
    assert "differs from the policy at train start" in caplog.text


def test_lora_policy_needs_no_snapshot(tmp_path, tiny_gpt2, char_tokenizer):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    cb = SpectralMonitorCallback(every_n_steps=2, rank=4)
    trainer = GRPOTrainer(
        model=tiny_gpt2(),
        reward_funcs=shaped_reward,
        args=grpo_args(tmp_path, learning_rate=1e-2),
        train_dataset=prompts_dataset(),
        processing_class=char_tokenizer,
        peft_config=lora,
        callbacks=[cb],
    )
    trainer.train()
    monitor = cb.run.monitor
    assert monitor.store is None  # no copy of anything: ΔW = scale·B·A
    assert {s.kind for s in monitor.specs} == {"lora"} and len(monitor.specs) == 8
    reports = jsonl(tmp_path)
    assert [r.step for r in reports] == [1, 2, 3]
    got = reports[-1].layer_values("update_norm")
    want = {}
    for name, mod in trainer.model.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
            want[name] = float((mod.scaling["default"] * b @ a).detach().norm())
    assert set(got) == set(want)
    assert got == pytest.approx(want, rel=1e-4)
    assert max(want.values()) > 0
    # LoRA rank r=4 bounds the update's rank
    assert all(len(s) <= 4 for s in reports[-1].spectra.values())
    assert torch.is_tensor(next(iter(reports[-1].spectra.values())))


@pytest.mark.slow
def test_recipe_trl_grpo_quick(tmp_path):
    proc = run_recipe("trl_grpo", tmp_path)
    assert "held-out addition exact match" in proc.stdout and "probe (subtraction): KL to base" in proc.stdout
    assert [r.step for r in jsonl(tmp_path)] == [1, 2, 4]


@pytest.mark.slow
def test_knowledge_loss_through_sft(tmp_path, addition_base, char_tokenizer):
    """The probe given as TRL-style rows (prompt + completion): SFT on a conflicting rule stops with
    knowledge_loss; SFT on more of the base's own task runs to the end without it."""
    rows = [{"prompt": p, "completion": c} for p, c in probe_pairs()]
    outcomes = {}
    for task, lr in (("conflict", 1e-3), ("continue", 3e-4)):
        texts = addition_texts(task, 512, 1)
        data = datasets.Dataset.from_list([{"prompt": t[:6], "completion": t[6:]} for t in texts])
        cb = SpectralMonitorCallback(every_n_steps=5, probe=rows, early_stop=True)
        trainer = SFTTrainer(
            model=addition_base(),
            args=SFTConfig(
                **COMMON,
                output_dir=str(tmp_path / task),
                max_steps=40,
                per_device_train_batch_size=32,
                learning_rate=lr,
                logging_steps=5,
            ),
            train_dataset=data,
            processing_class=char_tokenizer,
            callbacks=[cb],
        )
        trainer.train()
        outcomes[task] = (trainer.state.global_step, jsonl(tmp_path / task))
    steps, reports = outcomes["conflict"]
    assert steps < 40 and any(a.rule == "knowledge_loss" and a.stop for a in reports[-1].alerts)
    steps, reports = outcomes["continue"]
    assert steps == 40 and not any(a.rule == "knowledge_loss" for r in reports for a in r.alerts)
    assert reports[-1].probes["tokens"] == 64 * 3
