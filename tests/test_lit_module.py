"""NCU inside the LightningModule: what each stage trains, and an end-to-end smoke run."""
import pytest
import torch

from ncu.config import ConfigError, plan_stages, validate
from ncu.run import build, train


def _parts(make_cfg, method):
    cfg = make_cfg(*f"method={method}".split(), "data.limit=96", "data.batch_size=32")
    _, dm, module = build(cfg)
    batch = next(iter(dm.train_dataloader()))
    return cfg, module, batch, dict(plan_stages(cfg))


@pytest.fixture
def ncu_parts(make_cfg):
    """The official recipe (method=ncu_official): what its stages train and freeze."""
    return _parts(make_cfg, "ncu_official")


@pytest.fixture
def default_parts(make_cfg):
    return _parts(make_cfg, "ncu")


def _step(module, batch):
    module.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    return {n: p.grad for n, p in module.named_parameters()}


def test_stage1_trains_the_prompt_and_not_the_image_tower(ncu_parts):
    _, module, batch, plan = ncu_parts
    module.set_stage("hn", plan["hn"])
    grads = _step(module, batch)
    assert grads["prompt.ctx"] is not None and grads["prompt.ctx"].abs().sum() > 0
    visual = [n for n in grads if n.startswith("model.visual.") and n != "model.visual.proj"]
    assert visual and all(grads[n] is None for n in visual)
    assert all(not dict(module.named_parameters())[n].requires_grad for n in visual)
    assert grads["model.visual.proj"] is not None  # the image projection trains, as in the official model
    assert grads["model.text_projection"].abs().sum() > 0


def test_stage2_leaves_prompt_positions_and_bottom_text_blocks_unchanged_and_trains_token_embedding(ncu_parts):
    _, module, batch, plan = ncu_parts
    module.set_stage("unlearn", plan["unlearn"])
    frozen = ("prompt.ctx", "model.positional_embedding",
              "model.transformer.resblocks.0.")  # micro has 2 text blocks: round(0.4167 * 2) = 1 frozen
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    grads = _step(module, batch)
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad.sign()
    for name, p in module.named_parameters():
        if name.startswith(frozen):
            assert not p.requires_grad and grads[name] is None and torch.equal(before[name], p), name
    assert not torch.equal(before["model.transformer.resblocks.1.mlp.c_fc.weight"],
                           module.model.transformer.resblocks[1].mlp.c_fc.weight)
    # the official run's token embedding trains: its intended freeze was a no-op
    assert not torch.equal(before["model.token_embedding.weight"], module.model.token_embedding.weight)
    assert grads["model.visual.conv1.weight"].abs().sum() > 0  # the image tower unlearns


def test_default_stage1_learns_only_the_negated_path(default_parts):
    _, module, batch, plan = default_parts
    module.set_stage("hn", plan["hn"])
    grads = _step(module, batch)
    assert grads["prompt.ctx"].abs().sum() > 0
    assert all(g is None for n, g in grads.items() if n.startswith("model."))
    # The anchored t~ sits at the band's centre from its own caption.
    t = module.model.encode_text(batch["text"], normalize=True)
    tn = module.negated_features(batch["caption"], t)
    assert torch.allclose((t * tn).sum(1), torch.full((len(t),), -0.45), atol=1e-5)


def test_rotation_head_trains_with_the_prompt_in_stage1(make_cfg):
    _, module, batch, plan = _parts(make_cfg, "ncu method.negation.head=rotation")
    module.set_stage("hn", plan["hn"])
    grads = _step(module, batch)
    assert grads["negation_head.weight"].abs().sum() > 0
    module.set_stage("unlearn", plan["unlearn"])
    assert not module.negation_head.weight.requires_grad


def test_default_stage2_trains_the_whole_model_and_keeps_the_negated_path(default_parts):
    _, module, batch, plan = default_parts
    module.set_stage("unlearn", plan["unlearn"])
    grads = _step(module, batch)
    assert grads["prompt.ctx"] is None
    for name in ("model.visual.conv1.weight", "model.transformer.resblocks.0.mlp.c_fc.weight",
                 "model.token_embedding.weight", "model.text_projection"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name


def test_oracle_detector_flags_exactly_the_noisy_pairs(default_parts):
    _, module, batch, plan = default_parts
    module.method["detector"] = "oracle"
    module.set_stage("unlearn", plan["unlearn"])  # the detector is resolved once per stage
    scores = torch.rand(len(batch["noisy"]))
    flagged, ranked = module.flag(scores, batch["noisy"])
    assert torch.equal(flagged, batch["noisy"].bool()) and torch.equal(ranked, scores)
    module.method["detector"] = "batch"
    module.set_stage("unlearn", plan["unlearn"])
    assert int(module.flag(scores, batch["noisy"])[0].sum()) == int(0.4 * len(scores))


def test_logit_scale_clamped_after_a_step_in_stage2(ncu_parts):
    _, module, batch, plan = ncu_parts
    module.set_stage("unlearn", plan["unlearn"])
    with torch.no_grad():
        module.model.logit_scale.fill_(6.0)
    module.on_train_batch_end(None, batch, 0)
    assert module.model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


def test_synonym_replacement_without_wordnet_is_a_config_error(make_cfg):
    cfg = make_cfg("method=ncu", "method.negation.perturb.ops=[swap,synonym]")
    with pytest.raises(ConfigError, match="WordNet"):
        validate(cfg)
    validate(make_cfg("method=ncu", "method.negation.perturb.ops=[swap,synonym]",
                      "method.negation.perturb.require_wordnet=false"))


@pytest.mark.parametrize("method", ["ncu", pytest.param("ncu_no_hn", marks=pytest.mark.slow)])
def test_ncu_smoke_run_logs_detection_and_unlearning_metrics(make_cfg, method):
    cfg = make_cfg(f"method={method}", "trainer.limit_val_batches=1")
    metrics, objects = train(cfg)
    for key in ("train/nc_auroc", "train/nc_precision", "train/nc_recall", "train/nc_f1", "train/kl_v2t",
                "test/rsum", "pretrain/rsum"):
        assert key in metrics, key
    assert 0.0 <= metrics["train/nc_auroc"] <= 1.0
    names = sorted(p.name for p in (objects["run_dir"] / "checkpoints").glob("stage*"))
    expected = {"ncu": ["stage0_pretrain.ckpt", "stage1_hn.ckpt", "stage2_unlearn.ckpt"],
                "ncu_no_hn": ["stage0_pretrain.ckpt", "stage1_unlearn.ckpt"]}[method]
    assert [n for n in names if not n.endswith("_best.ckpt")] == expected
    assert {n.replace("_best", "") for n in names if n.endswith("_best.ckpt")} >= set(expected[1:])  # checkpoint.best
    for key in ("pretrain/nc_auroc", "pretrain/nc_precision", "pretrain/val_rsum", "unlearn/val_rsum"):
        assert key in metrics, key
    if method == "ncu":
        # Stage 1 learns only the negation prompt: the model, hence val retrieval, is unchanged by it, and the
        # anchored t~ sits at the band's centre.
        assert metrics["hn/val_rsum"] == pytest.approx(metrics["pretrain/val_rsum"], abs=1e-4)
        assert metrics["hn/cos_t_tn"] == pytest.approx(-0.45, abs=1e-4)


@pytest.mark.slow
def test_oracle_detector_run_flags_with_precision_one_and_whole_split_detection_at_rate_zero(make_cfg):
    metrics, _ = train(make_cfg("method=filter", "method.detector=oracle", "trainer.limit_val_batches=1"))
    assert metrics["train/nc_precision"] == 1.0 and metrics["train/nc_recall"] == 1.0
    assert metrics["pretrain/nc_precision"] < 1.0  # the whole-split pass measures the model's own flags
    clean, _ = train(make_cfg("method=filter", "noise.rate=0.0", "trainer.limit_val_batches=1"))
    # At rate 0 AUROC/AUPRC are undefined: left out, never NaN.
    assert "pretrain/nc_auroc" not in clean and "pretrain/nc_precision" in clean
    assert [k for k, v in clean.items() if v != v] == []
