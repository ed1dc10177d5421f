import subprocess
import sys

import pytest
import torch

from conftest import CONF, ROOT, compose_cfg
from ncu.config import ConfigError, compose_config, plan_stages, validate

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if not p.stem.startswith("_"))  # _base: shared


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    extra = []
    if experiment.startswith("paper_"):  # the presets leave the data and the start checkpoint to the user
        (tmp_path / "start.pt").write_bytes(b"")
        (tmp_path / "00000.tar").write_bytes(b"")
        extra = [f"model.pretrained={tmp_path / 'start.pt'}", f"data.shards={tmp_path / '00000.tar'}"]
    cfg = compose_cfg([f"experiment={experiment}", *extra], tmp_path=tmp_path)
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
    ("model.logit_scale=0", "model.logit_scale"),
    ("model.logit_scale=150", "model.logit_scale"),
    ("data.train_size=0", "data.train_size"),
])
def test_invalid_values_fail_with_a_message_naming_them(override, needle, tmp_path):
    cfg = compose_cfg(override.split(), tmp_path=tmp_path)
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


def test_paper_presets_hold_the_official_cc3m_recipe():
    from conftest import compose_cfg
    from ncu.config import ConfigError, plan_stages, validate

    cfg = compose_cfg(["experiment=paper_cc3m"])
    assert cfg.model.name == "LaCLIP-ViT-B-16" and cfg.data.source == "wds" and cfg.noise.protocol == "none"
    assert cfg.data.batch_size == 2048 and cfg.method.nc_ratio == 0.1 and cfg.method.gamma == 0.7
    assert cfg.solver.reg == 0.03 and cfg.solver.max_iter == 100 and cfg.trainer.precision == "bf16-mixed"
    plan = dict(plan_stages(cfg))
    assert list(plan) == ["hn", "unlearn"]  # no pre-training: the LaCLIP checkpoint is the start
    assert plan["hn"]["epochs"] == 2 and plan["hn"]["lr"] == 1e-4 and plan["hn"]["weight_decay"] == 0.2
    assert plan["hn"]["groups"]["prompt"] == {"params": ["prompt.ctx"], "lr": 3e-4, "weight_decay": 0.2}
    assert plan["unlearn"]["lr"] == 5e-5 and plan["unlearn"]["weight_decay"] == 0.2
    with pytest.raises(ConfigError, match="data.shards is not set"):
        validate(cfg)
    cc12m = compose_cfg(["experiment=paper_cc12m"])
    assert cc12m.experiment_name == "paper_cc12m" and cc12m.method.nc_ratio == 0.1
    assert cc12m.data.batch_size == 2048 and cc12m.data.val_frac < cfg.data.val_frac


def test_named_template_sets():
    from ncu.eval.benchmarks import named_templates
    from ncu.eval.tasks import class_prompts

    assert len(named_templates("imagenet")) == 80
    assert named_templates("laclip")[:2] == ["itap of a {}.", "a bad photo of the {}."]
    assert len(named_templates("laclip")) == 7
    names, templates = class_prompts({"classnames": "imagenet", "templates": "laclip"}, [])
    assert len(names) == 1000 and templates == named_templates("laclip")


def test_logit_scale_starts_a_model_from_scratch_only(tmp_path):
    import math

    from ncu.models.factory import create

    assert create("ncu-micro").model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert create("ncu-micro", logit_scale=100.0).model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)
    assert math.isclose(compose_cfg(["model.logit_scale=100"], tmp_path=tmp_path).model.logit_scale, 100)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    with pytest.raises(ConfigError, match="model.logit_scale=100.* brings its own"):
        validate(compose_cfg(["model.logit_scale=100", f"model.pretrained={weights}"], tmp_path=tmp_path))


CONFIGS = [[f"method={m}"] for m in METHODS] + [["pretrain=robust"]] + [
    [f"experiment={e}", "model=micro"] for e in EXPERIMENTS]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: o[0])
def test_the_module_sees_the_yaml_values_of_every_method_and_experiment(overrides, tmp_path):
    """No value the module acts on comes from anywhere but the composed YAML: the flagging rule, the
    detection settings (a stage's own over the method's), the negation options, each stage's settings and the
    objective options the step passes to the loss."""
    from omegaconf import OmegaConf

    from ncu.lit_module import CLIPUnlearner
    from ncu.models import factory

    cfg = compose_cfg(overrides, tmp_path=tmp_path)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    method["solver"] = OmegaConf.to_container(cfg.solver, resolve=True)
    bundle = factory.create("ncu-micro", None)
    module = CLIPUnlearner(bundle.model, bundle.tokenizer, method, OmegaConf.to_container(cfg.optim),
                           config={"seed": cfg.seed})
    assert module.detection == method["detection"] and module.detector == method["detector"]
    assert module.negation_mode == method["negation"]["mode"]
    if module.negation_mode != "none":
        neg = method["negation"]
        assert (module.anchor, module.perturber is not None) == (neg["anchor"], neg["perturb"]["enabled"])
        if module.prompt is not None:
            assert module.prompt.ctx.shape[0] == neg["n_ctx"]
    k = int(method["nc_ratio"] * 40) if method["nc_count"] == "truncate" else int(method["nc_ratio"] * 40 + 1e-9)
    assert int(module.quota(torch.rand(40)).sum()) == k
    for name, stage in plan_stages(cfg):
        if stage["objective"] in ("ncu_hn",) and module.negation_mode == "none":
            continue
        module.set_stage(name, stage)
        assert module.stage == stage
        assert module.detection == {**method["detection"], **stage["detection"]}
        assert module.detector == (stage["detector"] or method["detector"])
        opts = module.objective_options
        if "gamma" in opts:
            u = method["unlearn"]
            assert opts["gamma"] == method["gamma"] and opts["band"] == tuple(method["band"])
            assert {key: opts[key] for key in ("normalize_t2v", "reuse_transpose", "flagged_captions",
                                               "hn_capacity", "w_flagged", "detach_hn", "w_band")} == {
                key: u[key] for key in ("normalize_t2v", "reuse_transpose", "flagged_captions", "hn_capacity",
                                        "w_flagged", "detach_hn", "w_band")}
        if "w_cyc" in opts:
            assert {key: opts[key] for key in method["stage1"]} == method["stage1"]
        if "local_loss" in opts:
            assert opts["local_loss"] == method["local_loss"]


def test_a_method_file_without_the_base_is_refused_in_one_line(tmp_path):
    from omegaconf import open_dict

    cfg = compose_cfg(["method=clip"], tmp_path=tmp_path)
    with open_dict(cfg):
        del cfg.method["detection"]
        del cfg.method["nc_count"]
    with pytest.raises(ConfigError, match=r"no method.nc_count, method.detection.threshold.*defaults: \[_base\]"):
        validate(cfg)
