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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
