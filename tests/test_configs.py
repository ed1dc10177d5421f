import subprocess
import sys

import pytest

from conftest import CONF, ROOT, compose_cfg
from ncu.config import ConfigError, compose_config, plan_stages, validate

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = compose_cfg([f"experiment={experiment}"], tmp_path=tmp_path)
    validate(cfg)
    assert plan_stages(cfg)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_composes_and_validates(method, tmp_path):
    cfg = compose_cfg([f"method={method}"], tmp_path=tmp_path)
    validate(cfg)
    names = [name for name, _ in plan_stages(cfg)]
    assert names[0] == "pretrain"  # no pretrained weights: pre-train first
    assert len(names) >= 2 or method == "pretrain_only"


def test_pretrained_weights_skip_pretraining(tmp_path):
    ckpt = tmp_path / "w.ckpt"
    ckpt.write_bytes(b"")
    cfg = compose_cfg([f"model.pretrained={ckpt}"], tmp_path=tmp_path)
    assert "pretrain" not in [n for n, _ in plan_stages(cfg)]


def test_stage_inherits_defaults_and_epochs_cap(tmp_path):
    cfg = compose_cfg(["experiment=smoke", "method=clip", "optim.stage_defaults.weight_decay=0.33"],
                      tmp_path=tmp_path)
    plan = dict(plan_stages(cfg))
    assert all(stage["epochs"] <= 2 for stage in plan.values())
    assert plan["finetune"]["weight_decay"] == 0.33  # not set by the stage: inherited
    assert plan["pretrain"]["weight_decay"] == 0.1  # set by the stage


@pytest.mark.parametrize("override, needle", [
    ("noise.rate=1.5", "noise.rate"),
    ("noise.rate=-0.1", "noise.rate"),
    ("noise.rate=1.0", "noise.rate"),
    ("model.name=not-a-model", "model.name"),
    ("model.pretrained=/no/such/file.pt", "model.pretrained"),
    ("noise.protocol=bogus", "noise.protocol"),
    ("data.batch_size=1", "data.batch_size"),
    ("method.stages.unlearn.epochs=0", "epochs"),
])
def test_invalid_values_fail_with_a_message_naming_them(override, needle, tmp_path):
    cfg = compose_cfg([override], tmp_path=tmp_path)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        validate(cfg)


def test_cli_invalid_rate_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "noise.rate=1.5", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert err == ["error: noise.rate=1.5 is invalid: it must be a number in [0, 1)"]


@pytest.mark.parametrize("sweep", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_every_sweep_composes_as_a_multirun(sweep):
    cfg = compose_config([f"sweep={sweep}"], return_hydra_config=True)
    assert str(cfg.hydra.mode).endswith("MULTIRUN") and len(cfg.hydra.sweeper.params) >= 1
    assert cfg.experiment_name == sweep
