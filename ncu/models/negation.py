"""Hardest-negative ("negated") text embeddings for open_clip models.

Prompt mode (the method's active path): the caption is perturbed, ``n_ctx`` placeholder words "X" are put
in front of it, and after the token-embedding lookup the placeholder positions 1..n_ctx (right after SOT)
are replaced by learned context vectors. The rest is open_clip's text forward unchanged: positional
embedding, causal transformer, final LayerNorm, pooling at EOT, projection, optional L2 normalisation.

Template mode (the "without hardest-negative learning" ablation): a literal negation phrase + the caption,
encoded by the ordinary text path, with no learned context.

Supported text towers: open_clip ``CLIP`` (text modules stored on the model) and models whose ``text`` is
open_clip's ``TextTransformer`` (``CustomTextCLIP``). Other towers (e.g. Hugging Face) raise ``TypeError``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from torch import Tensor, nn

from ncu.text_aug import CaptionPerturber

PLACEHOLDER = "X"
MODES: tuple[str, ...] = ("prompt", "template")

# Literal negation phrases for template mode; each is followed by a space and the caption.
DEFAULT_NEGATION_TEMPLATES: tuple[str, ...] = (
    "a photo that does not show",
    "there is no",
    "an image without",
    "a picture with no",
    "this is not",
    "nothing here resembles",
    "a photo missing",
    "the picture does not contain",
    "an image that is not about",
    "no sign of",
    "a scene lacking",
    "this photo has nothing to do with",
    "it is not true that this shows",
    "a photo of something other than",
    "an image unrelated to",
)


class NegationPrompt(nn.Module):
    """Learned context vectors that replace the placeholder tokens of the negated text."""

    def __init__(self, n_ctx: int = 8, width: int = 512, init_std: float = 0.02) -> None:
        super().__init__()
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
        self.n_ctx = n_ctx
        self.width = width
        self.ctx = nn.Parameter(torch.empty(n_ctx, width))
        nn.init.normal_(self.ctx, mean=0.0, std=init_std)

    @classmethod
    def for_model(cls, model: nn.Module, n_ctx: int = 8, init_std: float = 0.02) -> NegationPrompt:
        """A prompt whose width matches the model's token embedding."""
        width = text_tower(model).token_embedding.embedding_dim
        return cls(n_ctx=n_ctx, width=width, init_std=init_std)

    def forward(self) -> Tensor:
        return self.ctx

    def extra_repr(self) -> str:
        return f"n_ctx={self.n_ctx}, width={self.width}"


def complex_structure(dim: int, seed: int = 0) -> Tensor:
    """A random orthogonal J with J^T = -J (so J J = -I and x.(J x) = 0 for every x); ``dim`` must be even."""
    if dim % 2:
        raise ValueError(f"the negation head needs an even feature width, got {dim}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    block = torch.zeros(dim, dim, dtype=torch.float64)
    idx = torch.arange(0, dim, 2)
    block[idx, idx + 1], block[idx + 1, idx] = -1.0, 1.0
    return (q @ block @ q.T).float()


class NegationHead(nn.Module):
    """A linear map on the negated path's output features, before normalisation: t~ = normalize(W e).

    W starts as the rotation cos(a) I + sin(a) J, with J a random complex structure (see
    :func:`complex_structure`): for every feature x, cos(x, W x) = cos(a) exactly and W is orthogonal, so
    the negated features start at the chosen angle from the captions with the caption geometry intact
    (the cyc term is 0). Stage 1 then learns W with the prompt, leaving the text tower as pre-trained.
    """

    def __init__(self, dim: int, cos_angle: float = -0.45, seed: int = 0, learn: bool = True) -> None:
        super().__init__()
        if not -1.0 <= cos_angle <= 1.0:
            raise ValueError(f"negation head: cos_angle must be in [-1, 1], got {cos_angle}")
        sin = (1.0 - cos_angle**2) ** 0.5
        weight = cos_angle * torch.eye(dim) + sin * complex_structure(dim, seed)
        self.weight = nn.Parameter(weight, requires_grad=learn)

    def forward(self, e: Tensor) -> Tensor:
        return e @ self.weight.T.to(e.dtype)

    @classmethod
    def for_model(cls, model: nn.Module, cos_angle: float = -0.45, seed: int = 0) -> NegationHead:
        proj = text_tower(model).text_projection
        if isinstance(proj, nn.Linear):
            dim = proj.out_features
        elif proj is not None:
            dim = proj.shape[1]
        else:
            dim = text_tower(model).ln_final.normalized_shape[0]
        return cls(dim, cos_angle, seed)


def anchor_at_angle(t: Tensor, e: Tensor, cos_angle: float) -> Tensor:
    """Unit vectors at exactly ``cos_angle`` from each (unit) caption feature t_i, in the plane of t_i and
    e_i: t~_i = cos_angle * t_i + sin * u_i with u_i the unit part of e_i orthogonal to t_i.

    The band cos(t, t~) then holds by construction, and the learned negated path (``e``) chooses only the
    direction away from the caption. Gradients flow to both ``t`` and ``e``."""
    if not -1.0 <= cos_angle <= 1.0:
        raise ValueError(f"cos_angle must be in [-1, 1], got {cos_angle}")
    t, e = t.float(), e.float()
    ortho = e - (e * t).sum(dim=-1, keepdim=True) * t
    u = F.normalize(ortho, dim=-1, eps=1e-6)
    return cos_angle * t + (1.0 - cos_angle**2) ** 0.5 * u


@dataclass
class TextTowerView:
    """The pieces of an open_clip text tower that the text forward needs (live references)."""

    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Parameter | nn.Linear | None
    attn_mask: Tensor | None
    pool_type: str
    eos_id: int | None
    cls_emb: Tensor | None = None  # CoCa-style class token appended at the end
    use_pad_mask: bool = False
    pad_id: int = 0
    heads: int = 1
    correct_cls_mask: bool = False


_CLIP_TEXT_ATTRS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")


def text_tower(model: nn.Module) -> TextTowerView:
    """Give uniform access to the text tower of an open_clip ``CLIP`` or ``CustomTextCLIP``.

    Raises ``TypeError`` for any other text tower (for example a Hugging Face encoder).
    """
    text = getattr(model, "text", None)
    if text is not None:
        if not isinstance(text, TextTransformer):
            raise TypeError(
                f"unsupported text tower {type(text).__name__} on {type(model).__name__}: negated text "
                "embeddings need open_clip's TextTransformer (token embedding + causal transformer)"
            )
        return TextTowerView(
            token_embedding=text.token_embedding,
            positional_embedding=text.positional_embedding,
            transformer=text.transformer,
            ln_final=text.ln_final,
            text_projection=text.text_projection,
            attn_mask=text.attn_mask,
            pool_type=text.pool_type,
            eos_id=getattr(text, "eos_id", None),
            cls_emb=text.cls_emb,
            use_pad_mask=bool(getattr(text, "use_pad_mask", False)),
            pad_id=int(getattr(text, "pad_id", 0)),
            heads=int(getattr(text, "heads", 1)),
            correct_cls_mask=bool(getattr(text, "correct_cls_mask", False)),
        )
    is_clip_like = all(hasattr(model, name) for name in _CLIP_TEXT_ATTRS)
    if is_clip_like and isinstance(model.token_embedding, nn.Embedding):
        # open_clip CLIP keeps the text modules on the model itself; its encode_text ignores cls_emb.
        return TextTowerView(
            token_embedding=model.token_embedding,
            positional_embedding=model.positional_embedding,
            transformer=model.transformer,
            ln_final=model.ln_final,
            text_projection=getattr(model, "text_projection", None),
            attn_mask=model.attn_mask,
            pool_type=getattr(model, "text_pool_type", "argmax"),
            eos_id=getattr(model, "text_eos_id", None),
        )
    raise TypeError(
        f"unsupported text tower on {type(model).__name__}: expected open_clip CLIP (token_embedding, "
        "transformer, ln_final, ...) or a model whose .text is open_clip's TextTransformer"
    )


def _pool(x: Tensor, tokens: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """Select one feature per row, as open_clip's text pooling does."""
    rows = torch.arange(x.shape[0], device=x.device)
    if pool_type == "argmax":  # EOT has the largest id of the BPE vocabulary
        return x[rows, tokens.argmax(dim=-1)]
    if pool_type == "eos":
        if eos_id is None:
            raise ValueError("pool_type 'eos' needs an eos id")
        return x[rows, (tokens == eos_id).int().argmax(dim=-1)]
    if pool_type == "first":
        return x[:, 0]
    if pool_type == "last":
        return x[:, -1]
    return x  # 'none'


def _pad_cls_mask(tower: TextTowerView, tokens: Tensor, seq_len: int, dtype: torch.dtype) -> Tensor:
    """Additive (B*heads, S, S) mask hiding padding keys; the appended class token stays visible."""
    valid = tokens != tower.pad_id
    if tower.cls_emb is not None:
        cls_valid = valid.new_ones(valid.shape[0], 1)
        valid = torch.cat([valid, cls_valid] if tower.correct_cls_mask else [cls_valid, valid], dim=1)
    keep = valid.unsqueeze(1).expand(-1, seq_len, -1)
    mask = torch.zeros(keep.shape, dtype=dtype, device=tokens.device)
    mask.masked_fill_(~keep, float("-inf"))
    return mask.repeat_interleave(tower.heads, dim=0)


def encode_text_with_ctx(model: nn.Module, tokens: Tensor, ctx: Tensor, normalize: bool = True) -> Tensor:
    """Text features with token positions 1..n_ctx replaced by ``ctx``.

    Args:
        model: open_clip ``CLIP`` or ``CustomTextCLIP``.
        tokens: (B, L) ids of "SOT X ... X caption EOT pad...", as made by ``build_negated_tokens``.
        ctx: (n_ctx, width), shared by the batch, or (B, n_ctx, width).
        normalize: L2-normalise the output.

    Returns:
        (B, embed_dim) features; autograd flows to ``ctx`` and to the (unfrozen) text tower.
    """
    tower = text_tower(model)
    cast_dtype = tower.transformer.get_cast_dtype()
    batch, seq_len = tokens.shape
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(batch, -1, -1)
    n_ctx = ctx.shape[1]
    if 1 + n_ctx >= seq_len:
        raise ValueError(f"{n_ctx} context tokens do not fit in a sequence of length {seq_len}")

    x = tower.token_embedding(tokens).to(cast_dtype)
    # Replace (not add to) the placeholder embeddings, so the placeholders' own embeddings get no gradient.
    x = torch.cat([x[:, :1], ctx.to(cast_dtype), x[:, 1 + n_ctx :]], dim=1)

    attn_mask = tower.attn_mask
    if tower.cls_emb is not None:
        x = torch.cat([x, tower.cls_emb.to(cast_dtype).view(1, 1, -1).expand(batch, -1, -1)], dim=1)
        seq_len += 1
    if tower.use_pad_mask or tower.cls_emb is not None:
        extra = _pad_cls_mask(tower, tokens, seq_len, x.dtype)
        attn_mask = extra if attn_mask is None else attn_mask[:seq_len, :seq_len].unsqueeze(0) + extra
    elif attn_mask is not None:
        attn_mask = attn_mask[:seq_len, :seq_len]

    x = x + tower.positional_embedding[:seq_len].to(cast_dtype)
    x = tower.transformer(x, attn_mask=attn_mask)  # handles batch_first itself

    if tower.cls_emb is not None:
        pooled = tower.ln_final(x[:, -1])  # the appended class token; LayerNorm after pooling
    else:
        pooled = _pool(tower.ln_final(x), tokens, tower.pool_type, tower.eos_id)

    proj = tower.text_projection
    if isinstance(proj, nn.Linear):
        pooled = proj(pooled)
    elif proj is not None:
        pooled = pooled @ proj
    return F.normalize(pooled, dim=-1) if normalize else pooled


def placeholder_prefix(n_ctx: int) -> str:
    """The string "X X ... X " with ``n_ctx`` placeholder words."""
    return (PLACEHOLDER + " ") * n_ctx


def _eot_id(tokenizer: Callable[..., Tensor]) -> int:
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is None:
        raise TypeError(
            f"tokenizer {type(tokenizer).__name__} has no eot_token_id; negated text needs open_clip's "
            "SimpleTokenizer (BPE with SOT/EOT)"
        )
    return int(eot)


def ensure_eot(tokens: Tensor, eot_id: int) -> Tensor:
    """Put EOT at the last position of every row that lost it to truncation (returns a copy)."""
    tokens = tokens.clone()
    missing = ~(tokens == eot_id).any(dim=1)
    tokens[missing, -1] = eot_id
    return tokens


def build_negated_tokens(
    tokenizer: Callable[..., Tensor],
    captions: Sequence[str],
    n_ctx: int = 8,
    perturber: CaptionPerturber | Callable[[str], str] | None = None,
    mode: str = "prompt",
    templates: Sequence[str] | None = None,
    rng: random.Random | None = None,
) -> Tensor:
    """Tokens of the negated captions, shape (B, L) with L the tokenizer's context length.

    mode "prompt": "X X ... X " (n_ctx times) + perturbed caption; placeholders land on positions 1..n_ctx.
    mode "template": random negation phrase from ``templates`` + " " + (perturbed) caption.
    Every row is guaranteed to contain EOT, so EOT pooling never picks a caption token.
    """
    if mode not in MODES:
        raise ValueError(f"unknown negation mode {mode!r}; choose from {list(MODES)}")
    eot = _eot_id(tokenizer)
    texts = [perturber(c) if perturber is not None else c for c in captions]

    if mode == "prompt":
        prefix = placeholder_prefix(n_ctx)
        tokens = tokenizer([prefix + t for t in texts])
        if tokens.shape[1] < n_ctx + 2:
            raise ValueError(f"context length {tokens.shape[1]} is too short for n_ctx={n_ctx}")
        placeholder_id = tokenizer([PLACEHOLDER])[0, 1]
        if not bool((tokens[:, 1 : 1 + n_ctx] == placeholder_id).all()):
            raise ValueError(
                f"the tokenizer did not place {n_ctx} placeholder tokens at positions 1..{n_ctx}; "
                "prompt mode needs one token per placeholder word right after SOT"
            )
    else:
        phrases = list(templates) if templates else list(DEFAULT_NEGATION_TEMPLATES)
        rng = rng if rng is not None else random.Random()
        tokens = tokenizer([f"{rng.choice(phrases)} {t}" for t in texts])

    return ensure_eot(tokens.long(), eot)


def negated_text_features(
    model: nn.Module, prompt: NegationPrompt | None, tokens: Tensor, mode: str = "prompt",
    head: NegationHead | None = None,
) -> Tensor:
    """L2-normalised negated-text features t̃ for tokens from ``build_negated_tokens`` (through ``head``
    when given)."""
    if mode == "prompt":
        if prompt is None:
            raise ValueError("prompt mode needs a NegationPrompt")
        e = encode_text_with_ctx(model, tokens, prompt.ctx, normalize=head is None)
    elif mode == "template":
        e = model.encode_text(tokens, normalize=head is None)
    else:
        raise ValueError(f"unknown negation mode {mode!r}; choose from {list(MODES)}")
    return e if head is None else F.normalize(head(e), dim=-1)
