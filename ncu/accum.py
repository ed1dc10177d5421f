"""Exact large-batch accumulation by feature caching (the GradCache idea; open_clip's ``--accum-freq``).

An objective that couples the batch (InfoNCE's negatives, the NC quota, the OT plan) changes when it is
computed per micro-batch. Here it is computed once over all K micro-batches, and the encoders' gradients are
taken micro-batch by micro-batch:

1. each micro-batch is encoded without gradients (its random state recorded) and its features kept;
2. the loss of the whole batch is computed on those features as leaves: ``dL/df`` for every feature row, and
   ``dL/dp`` for the parameters the loss uses directly (the logit scale);
3. each micro-batch is encoded again with gradients under the same random state, and ``sum(f * dL/df)``
   (plus ``sum(p * dL/dp)`` once) is back-propagated: by the chain rule its parameter gradients sum to those of
   one step on the whole batch, while only one micro-batch's activations are held at a time.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ncu.data.stats import batch_size_of

Features = dict[str, torch.Tensor]


@dataclass
class RandomState:
    """The torch generators a forward pass may draw from (dropout, patch dropout)."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


@dataclass
class MicroBatch:
    """One micro-batch: what its encoding needs again (``inputs``), the random state it was encoded under and
    its features from the pass without gradients."""

    inputs: Any
    state: RandomState
    features: Features


def encode_without_grad(encode: Callable[[Any], Features], inputs: Any, device: torch.device) -> MicroBatch:
    state = RandomState.capture(device)
    with torch.no_grad():
        features = encode(inputs)
    return MicroBatch(inputs, state, {k: f.detach() for k, f in features.items()})


def loss_and_feature_grads(loss_fn: Callable[[list[Features]], torch.Tensor], micro: Sequence[MicroBatch],
                           params: Sequence[torch.nn.Parameter]
                           ) -> tuple[torch.Tensor, list[Features], list[tuple[torch.nn.Parameter, torch.Tensor]]]:
    """The whole batch's loss on the cached features, its gradient with respect to each feature row (per
    micro-batch, as the features) and to each of ``params`` it uses directly. ``torch.autograd.grad`` leaves
    ``.grad`` untouched (and fires no gradient hooks), so only step 3's backward passes write gradients."""
    leaves = [{k: f.detach().requires_grad_(f.is_floating_point()) for k, f in m.features.items()} for m in micro]
    loss = loss_fn(leaves)
    flat = [f for leaf in leaves for f in leaf.values() if f.requires_grad]
    grads = torch.autograd.grad(loss, [*flat, *params], allow_unused=True)
    it = iter(grads[:len(flat)])
    feature_grads = [{k: next(it) for k, f in leaf.items() if f.requires_grad} for leaf in leaves]
    direct = [(p, g) for p, g in zip(params, grads[len(flat):]) if g is not None]
    return loss.detach(), feature_grads, direct


def surrogate(features: Features, grads: Features,
              direct: Sequence[tuple[torch.nn.Parameter, torch.Tensor]] = ()) -> torch.Tensor:
    """``sum(f * dL/df)`` over the features that carry a gradient (a frozen tower's do not), plus
    ``sum(p * dL/dp)`` for ``direct``: its gradient is the micro-batch's part of the whole batch's gradient."""
    total = None
    terms = [(f, grads[k]) for k, f in features.items() if f.requires_grad and grads.get(k) is not None]
    terms += list(direct)
    for x, g in terms:
        part = (x * g.to(x.dtype)).sum()
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no trainable parameter reaches the features or the loss of this step")
    return total


def backward_micro_batches(encode: Callable[[Any], Features], micro: Sequence[MicroBatch], feature_grads: list[Features],
                           direct: Sequence[tuple[torch.nn.Parameter, torch.Tensor]],
                           backward: Callable[[torch.Tensor, bool], None], device: torch.device) -> None:
    """Step 3: each micro-batch encoded again under its recorded random state, its surrogate back-propagated
    (``backward(surrogate, last)``: the caller syncs gradients across processes on the last one only). The
    random state afterwards is the one before, so the re-encoding draws nothing from the training's streams."""
    after = RandomState.capture(device)
    for i, m in enumerate(micro):
        m.state.restore(device)
        last = i == len(micro) - 1
        backward(surrogate(encode(m.inputs), feature_grads[i], direct if last else ()), last)
    after.restore(device)


# ----- the Lightning module's accumulated step (CLIPUnlearner with optim.accum_freq > 1: manual optimization)


def accumulate(module: Any, batch: dict) -> torch.Tensor | None:
    """One micro-batch of ``optim.accum_freq``: encoded without gradients now; the K-th runs the optimizer
    step of the whole K-micro-batch batch (``accumulated_backward``). A last group of fewer than K
    micro-batches at an epoch's end is dropped (``on_train_epoch_end``)."""
    module.micro_batches.append((batch, encode_without_grad(module.encode_train, module.train_inputs(batch),
                                                         module.device)))
    if len(module.micro_batches) < module.accum_freq:
        return None
    group, module.micro_batches = module.micro_batches, []
    optimizer = module.optimizers()
    loss = accumulated_backward(module, group, functools.partial(module_backward, module))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    module.lr_schedulers().step()
    module.cost["samples"] += sum(batch_size_of(b) for b, _ in group) * module.world_size  # a dropped group: none
    return loss


def accumulated_backward(module: Any, group: list[tuple[dict, MicroBatch]], backward: Any) -> torch.Tensor:
    """The loss over the micro-batches of ``group`` at once, and its gradients written micro-batch by
    micro-batch (ncu/accum.py): the same loss and gradients as one step on their concatenation."""
    batches, micro = [b for b, _ in group], [m for _, m in group]

    def whole(leaves: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return module.batch_loss({k: torch.cat([leaf[k] for leaf in leaves]) for k in leaves[0]}, batches)

    params = [p for p in module.parameters() if p.requires_grad]
    loss, feature_grads, direct = loss_and_feature_grads(whole, micro, params)
    backward_micro_batches(module.encode_train, micro, feature_grads, direct, backward, module.device)
    return loss


def module_backward(module: Any, surrogate: torch.Tensor, last: bool) -> None:
    """Gradients of one micro-batch; under DDP the processes sum them on the last one only."""
    ddp = module.trainer.strategy.model if module.world_size > 1 else None
    if last or not hasattr(ddp, "no_sync"):
        module.manual_backward(surrogate)
    else:
        with ddp.no_sync():
            module.manual_backward(surrogate)
