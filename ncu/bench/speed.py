"""Training-step speed: clip, NCU stage 1 and 2 steps, the Sinkhorn solve alone, a plain open_clip loop."""
from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ncu.bench.sinkhorn import stage2_ot_problem
from ncu.bench.timing import MiB, Variant, measure_peaks, summarise, time_interleaved

FINAL_KEYS = ("ncu_stage2/clip", "sinkhorn_share", "clip/open_clip")
# The memory and speed switches, each against the plain NCU stage-2 step: (time ratio, peak-memory ratio).
SWITCH_VARIANTS = {"grad_checkpointing": "ncu_stage2_ckpt", "compile": "ncu_stage2_compiled",
                   "accum_4x": "ncu_stage2_accum4"}


# ----------------------------------------------------------------------------------------------- speed


def compose_method(method: str) -> Any:
    """The run config with ``method=<method>`` (the real conf/ files, Hydra compose API)."""
    from ncu.config import compose_config

    return compose_config([f"method={method}"])


def stage_of(cfg: Any, objective: str) -> dict:
    """The method's stage with this objective (not pre-training), as the run plans it."""
    from ncu.config import plan_stages

    for name, stage in plan_stages(cfg):
        if name != "pretrain" and stage["objective"] == objective:
            return stage
    raise KeyError(f"method {cfg.method.name!r} has no stage with objective {objective!r}")


def bench_batch(tokenizer: Any, n: int, image_size: int | tuple[int, int], noise_rate: float, seed: int,
                device: torch.device) -> dict[str, Any]:
    """Random images + real emoji-name captions (``noise_rate`` of them shuffled), in the training batch format."""
    from ncu.data.embedded import embedded_pairs

    rng = random.Random(seed)
    pool = embedded_pairs(("twemoji",))["caption"].tolist()
    captions = [pool[rng.randrange(len(pool))] for _ in range(n)]
    noisy_idx = [i for i in range(n) if rng.random() < noise_rate]
    moved = noisy_idx[:]
    rng.shuffle(moved)
    original = list(captions)
    for i, j in zip(noisy_idx, moved):
        captions[i] = original[j]
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    g = torch.Generator().manual_seed(seed)
    noisy = torch.zeros(n, dtype=torch.bool)
    noisy[noisy_idx] = True
    return {
        "image": torch.randn(n, 3, h, w, generator=g).to(device),
        "text": tokenizer(captions).to(device),
        "noisy": noisy.to(device),
        "caption": captions,
        "index": torch.arange(n, device=device),
    }


def model_image_size(name: str, model: torch.nn.Module) -> int | tuple[int, int]:
    import open_clip

    cfg = open_clip.get_model_config(name) or {}
    size = (cfg.get("vision_cfg") or {}).get("image_size") or getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (list, tuple)) else int(size)


def open_clip_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's training-script split: no weight decay on gains, biases and the logit scale."""
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


class _RecordingSolver:
    """Passes calls through to ``solver`` and keeps a copy of the last problem it was given."""

    def __init__(self, solver: Callable) -> None:
        self.solver, self.last = solver, None

    def __call__(self, cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None):
        self.last = tuple(x.clone() if x is not None else None for x in (cost, a, b, mask))
        return self.solver(cost, a, b, mask)


@dataclass
class SpeedSetup:
    """The speed benchmark's variants, built on one model and one batch."""

    variants: list[Variant]
    modules: dict[str, Any]
    batch: dict[str, Any]


def speed_setup(model_name: str, batch_size: int, device: torch.device, precision: str = "32",
                seed: int = 0, compile: bool = True) -> SpeedSetup:
    """Model, batch, modules, optimizers and the variants of :func:`speed` (nothing timed yet)."""
    import copy

    import open_clip
    from omegaconf import OmegaConf

    from ncu import accum, stages
    from ncu.lit_module import LOG_SCALE_MAX, CLIPUnlearner
    from ncu.models import factory
    from ncu.ot import sinkhorn

    torch.manual_seed(seed)
    bundle = factory.create(model_name, None)
    model = bundle.model.to(device).train()
    clip_cfg, ncu_cfg = compose_method("clip"), compose_method("ncu")
    optim = OmegaConf.to_container(ncu_cfg.optim, resolve=True)
    clip_method = OmegaConf.to_container(clip_cfg.method, resolve=True)
    ncu_method = OmegaConf.to_container(ncu_cfg.method, resolve=True)
    ncu_method["solver"] = OmegaConf.to_container(ncu_cfg.solver, resolve=True)
    clip_mod = CLIPUnlearner(model, bundle.tokenizer, clip_method, optim, config={"seed": seed}).to(device)
    ncu_mod = CLIPUnlearner(model, bundle.tokenizer, ncu_method, optim, config={"seed": seed}).to(device)
    batch = bench_batch(bundle.tokenizer, batch_size, model_image_size(model_name, model), 0.2, seed, device)

    # Every step starts from these weights (the model's and the negation prompt's).
    params = list(ncu_mod.parameters())
    snapshot = [p.detach().clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
        ncu_mod.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(False)
        clip_mod.detect.reset()
        ncu_mod.detect.reset()

    def amp() -> torch.autocast:
        if precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return torch.autocast(device_type=device.type, enabled=False)

    def lightning_variant(name: str, module: CLIPUnlearner, cfg: Any, objective: str, micro: int = 1,
                          checkpointing: bool = False, reset: Callable[[], None] = restore) -> Variant:
        stage = stage_of(cfg, objective)
        module.set_stage(objective, stage)
        opt = stages.make_adamw(module, stage, optim)  # as CLIPUnlearner.configure_optimizers, no schedule

        def prepare() -> None:
            reset()
            module.set_stage(objective, stage)
            module.model.set_grad_checkpointing(checkpointing)

        def run() -> None:
            # What Lightning's automatic optimisation does per batch (autocast around training_step only).
            opt.zero_grad(set_to_none=True)
            with amp():
                if micro == 1:
                    loss = module.training_step(batch, 0)
                    loss.backward()
                else:  # optim.accum_freq=micro: the same batch as micro-batches, one step (CLIPUnlearner.accumulate)
                    size = batch_size // micro
                    group = []
                    for i in range(micro):
                        part = {k: x[i * size:(i + 1) * size] for k, x in batch.items()}
                        group.append((part, accum.encode_without_grad(module.encode_train, module.train_inputs(part),
                                                                      device)))
                    loss = accum.accumulated_backward(module, group, lambda surrogate, last: surrogate.backward())
            opt.step()
            module.on_train_batch_end(loss, batch, 0)

        return Variant(name, run, prepare)

    clip_v = lightning_variant("clip", clip_mod, clip_cfg, "clip")
    hn_v = lightning_variant("ncu_stage1", ncu_mod, ncu_cfg, "ncu_hn")
    ul_v = lightning_variant("ncu_stage2", ncu_mod, ncu_cfg, "ncu_unlearn")
    switches = [lightning_variant("ncu_stage2_ckpt", ncu_mod, ncu_cfg, "ncu_unlearn", checkpointing=True),
                lightning_variant("ncu_stage2_accum4", ncu_mod, ncu_cfg, "ncu_unlearn", micro=4)]
    if compile:  # a copy whose towers are compiled in place (model.compile); the first warm-up round compiles
        compiled_mod = copy.deepcopy(ncu_mod)
        factory.speed_switches(compiled_mod.model, grad_checkpointing=False, compile=True)
        compiled_params = list(compiled_mod.parameters())

        def restore_compiled() -> None:
            with torch.no_grad():
                for p, s in zip(compiled_params, snapshot):
                    p.copy_(s)
            compiled_mod.zero_grad(set_to_none=True)
            compiled_mod.detect.reset()

        switches.append(lightning_variant("ncu_stage2_compiled", compiled_mod, ncu_cfg, "ncu_unlearn",
                                          reset=restore_compiled))

    # The plain open_clip loop a user would write instead.
    clip_stage = stage_of(clip_cfg, "clip")
    loss_fn = open_clip.loss.ClipLoss()
    oc_opt = torch.optim.AdamW(open_clip_param_groups(model, clip_stage["weight_decay"]), lr=clip_stage["lr"],
                               betas=tuple(optim["betas"]), eps=optim["eps"])

    def oc_prepare() -> None:
        restore()
        for p in model.parameters():
            p.requires_grad_(True)

    def oc_run() -> None:
        oc_opt.zero_grad(set_to_none=True)
        with amp():
            img = model.encode_image(batch["image"], normalize=True)
            txt = model.encode_text(batch["text"], normalize=True)
            loss = loss_fn(img, txt, model.logit_scale.exp())
        loss.backward()
        oc_opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOG_SCALE_MAX)

    oc_v = Variant("open_clip", oc_run, oc_prepare)

    # The OT problem the stage-2 step solves, captured from one step, then its solve timed alone.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        solver = ncu_mod.solver
        ncu_mod.solver = recorder = _RecordingSolver(solver)
        ul_v.prepare()
        ul_v.run()
        ncu_mod.solver = solver
    problem = recorder.last
    _, info = sinkhorn(*problem, reg=solver.reg, max_iter=solver.max_iter, tol=solver.tol, return_info=True)
    sk_v = Variant("sinkhorn", lambda: solver(*problem), note=f"{info.n_iter} it, this batch")
    # The same size with the similarity structure of a trained CLIP (a random-init model's is flatter).
    structured = stage2_ot_problem(batch_size, nc_ratio=ncu_method["nc_ratio"], seed=seed, device=device)
    _, sinfo = sinkhorn(*structured, reg=solver.reg, max_iter=solver.max_iter, tol=solver.tol, return_info=True)
    sks_v = Variant("sinkhorn_structured", lambda: solver(*structured), note=f"{sinfo.n_iter} it, synthetic")
    return SpeedSetup([clip_v, hn_v, ul_v, sk_v, sks_v, oc_v, *switches],
                      {"clip": clip_mod, "ncu": ncu_mod, "model": model}, batch)


def speed(model_name: str, batch_size: int, steps: int, warmup: int, device: torch.device,
          precision: str = "32", seed: int = 0, out: Callable[[str], None] = print,
          compile: bool = True) -> dict[str, float]:
    """Run the interleaved speed benchmark, print the table, the switches' ratio lines and the three final
    ratio lines; return the ratios."""
    setup = speed_setup(model_name, batch_size, device, precision, seed, compile)
    variants = setup.variants
    with warnings.catch_warnings():
        # self.log without a Trainer warns and returns: the steps run without Lightning's logging.
        warnings.filterwarnings("ignore", message=".*self.log.*")
        time_interleaved(variants, steps, warmup, device)
        mem_method = measure_peaks(variants, device)

    med = {v.name: summarise(v.times)[0] for v in variants}
    out(f"device: {device} ({torch.get_num_threads()} threads), model: {model_name}, batch: {batch_size}, "
        f"precision: {precision}, steps: {steps} after {warmup} warm-up, interleaved")
    out(f"peak memory: {mem_method}")
    out(f"{'variant':<20} {'median ms':>10} {'IQR ms':>9} {'x clip':>7} {'peak MiB':>9}  note")
    for v in variants:
        m, iqr = summarise(v.times)
        out(f"{v.name:<20} {m:>10.2f} {iqr:>9.2f} {m / med['clip']:>7.3f} {v.peak / MiB:>9.1f}  {v.note}")
    # The share is charged with the slower of the two solves: the captured one reflects this random-init model.
    sink = max(med["sinkhorn"], med["sinkhorn_structured"])
    peaks = {v.name: v.peak for v in variants}
    ratios = {}
    for switch, name in SWITCH_VARIANTS.items():
        if name in med:
            ratios[f"{switch}_time"] = med[name] / med["ncu_stage2"]
            ratios[f"{switch}_memory"] = peaks[name] / peaks["ncu_stage2"] if peaks["ncu_stage2"] > 0 else float("nan")
            out(f"{switch} / plain ncu_stage2: step time {ratios[f'{switch}_time']:.2f}x, "
                f"peak memory {ratios[f'{switch}_memory']:.2f}x")
    ratios.update({
        "ncu_stage2/clip": med["ncu_stage2"] / med["clip"],
        "sinkhorn_share": sink / med["ncu_stage2"],
        "clip/open_clip": med["clip"] / med["open_clip"],
    })
    out(f"ncu_stage2/clip: {ratios['ncu_stage2/clip']:.2f}")
    out(f"sinkhorn_share: {ratios['sinkhorn_share']:.3f}")
    out(f"clip/open_clip: {ratios['clip/open_clip']:.2f}")
    return ratios
