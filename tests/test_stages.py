import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ncu import stages
from ncu.run import build, build_trainer


def test_warmup_then_cosine_without_overshoot():
    total, warmup = 100, 10
    f = [stages.warmup_cosine(s, total, warmup) for s in range(total + 20)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # it really warms up
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then only decays
    assert f[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f[total] == 0.0 and max(f[total:]) == 0.0  # no rise again after the end
    assert stages.warmup_cosine(100, 100, 0, min_ratio=0.1) == pytest.approx(0.1)


def test_set_trainable_rules_and_unknown_rule():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    names = stages.set_trainable(net, ["*"], ["0.*"])
    assert names == ["1.weight", "1.bias"]
    assert not net[0].weight.requires_grad and net[1].weight.requires_grad
    with pytest.raises(ValueError, match="matches no parameter"):
        stages.set_trainable(net, ["*"], ["visual.*"])


def test_param_groups_split_decay_and_custom_lr():
    net = torch.nn.ModuleDict({"proj": torch.nn.Linear(3, 3), "ln_1": torch.nn.LayerNorm(3),
                               "emb": torch.nn.Embedding(4, 3)})
    groups = stages.param_groups(net, {"fast": {"params": ["emb.*"], "lr": 1.0}}, 0.2, ["*emb*"], 0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["default/decay"]["weight_decay"] == 0.2
    assert [p.shape for p in by_name["default/decay"]["params"]] == [torch.Size([3, 3])]
    assert by_name["default/no_decay"]["weight_decay"] == 0.0  # biases and norms
    assert by_name["fast/no_decay"]["lr"] == 1.0 and by_name["fast/no_decay"]["weight_decay"] == 0.0


def test_frozen_parameters_do_not_change_after_a_step(make_cfg):
    cfg = make_cfg("trainer.limit_train_batches=2", "trainer.limit_val_batches=1")
    _, dm, module = build(cfg)
    stage = {**OmegaConf.to_container(cfg.optim.stage_defaults), "epochs": 1, "objective": "clip", "lr": 1e-2,
             "weight_decay": 0.1, "warmup": 0, "train": ["*"],
             "freeze": ["model.visual.*", "model.transformer.resblocks.0.*"]}
    trainable = module.set_stage("frozen_visual", stage)
    assert trainable and not any(n.startswith("model.visual.") for n in trainable)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = build_trainer(cfg, stage, [], Path(cfg.paths.output_dir), 0, "frozen_visual", 0)
    trainer.fit(module, datamodule=dm)
    for name, p in module.named_parameters():
        # the negation context trains only in the hardest-negative stage
        frozen = name.startswith(("model.visual.", "model.transformer.resblocks.0.", "prompt.", "negation_head."))
        assert p.requires_grad == (not frozen)
        changed = not torch.equal(before[name], p.detach())
        if frozen:
            assert not changed, name
    assert not torch.equal(before["model.text_projection"], module.model.text_projection.detach())
