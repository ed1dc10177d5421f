"""Negated-text construction (learned context on open_clip text towers) and EDA-style perturbation."""

from __future__ import annotations

import json
import logging
import random
import sys
from collections import Counter

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

from ncu.models.negation import (
    DEFAULT_NEGATION_TEMPLATES,
    NegationPrompt,
    build_negated_tokens,
    encode_text_with_ctx,
    ensure_eot,
    negated_text_features,
    text_tower,
)
from ncu.text_aug import (
    CaptionPerturber,
    WordNetUnavailableError,
    clean_text,
    random_deletion,
    synonym_replacement,
)

N_CTX = 8
CONTEXT = 32
SOT, EOT = 49406, 49407

_TEXT = {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
_VISION = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16}
# clip: CLIP, projection as a Parameter, argmax pooling.
# custom: CustomTextCLIP, projection as nn.Linear, pooling at the eos id.
# custom_cls: CustomTextCLIP with an appended class token (pooling = last position, padding masked).
CONFIGS = {
    "ncu-negtest-clip": {"embed_dim": 32, "vision_cfg": _VISION, "text_cfg": _TEXT},
    "ncu-negtest-custom": {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "proj_bias": True, "pool_type": "eos", "eos_id": EOT},
    },
    "ncu-negtest-custom_cls": {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "embed_cls": True},
    },
}
CAPTIONS = ["a dog runs on the green grass", "Two cats, sleeping!", "", "a red bus near a tall building"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("negtest_configs")
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return str(folder)


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_and_tok(request: pytest.FixtureRequest, registry: str):
    torch.manual_seed(0)
    model = open_clip.create_model(request.param, pretrained=None).eval()
    return model, open_clip.get_tokenizer(request.param)


def _placeholder_ctx(model: nn.Module) -> torch.Tensor:
    """Token embeddings of the placeholder word "X" (BPE token "x</w>"), n_ctx times."""
    tok = open_clip.get_tokenizer("ncu-negtest-clip")
    x_id = int(tok(["X"])[0, 1])
    return text_tower(model).token_embedding.weight[x_id].detach().expand(N_CTX, -1).clone()


def _hooked_encode(model: nn.Module, tokens: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Reference: open_clip's own encode_text with a hook overwriting the placeholder embeddings."""

    def hook(_module: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, 1 : 1 + ctx.shape[0]] = ctx
        return out

    handle = text_tower(model).token_embedding.register_forward_hook(hook)
    try:
        return model.encode_text(tokens, normalize=True)
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- model classes


def test_fixture_covers_both_model_classes(registry: str) -> None:
    assert isinstance(open_clip.create_model("ncu-negtest-clip"), CLIP)
    custom = open_clip.create_model("ncu-negtest-custom")
    assert isinstance(custom, CustomTextCLIP)
    assert isinstance(custom.text.text_projection, nn.Linear)


# ----------------------------------------------------------------------------- encode_text_with_ctx


@torch.no_grad()
def test_placeholder_ctx_reproduces_open_clip_encode_text(model_and_tok) -> None:
    model, tok = model_and_tok
    tokens = build_negated_tokens(tok, CAPTIONS, N_CTX)
    ctx = _placeholder_ctx(model)
    ours = encode_text_with_ctx(model, tokens, ctx, normalize=False)
    ref = model.encode_text(tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    ours_n = encode_text_with_ctx(model, tokens, ctx, normalize=True)
    torch.testing.assert_close(ours_n, F.normalize(ref, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_n.norm(dim=-1), torch.ones(len(CAPTIONS)))


@torch.no_grad()
def test_random_ctx_matches_hooked_open_clip_forward(model_and_tok) -> None:
    model, tok = model_and_tok
    tokens = build_negated_tokens(tok, CAPTIONS, N_CTX)
    prompt = NegationPrompt.for_model(model, n_ctx=N_CTX, init_std=0.5)
    ours = negated_text_features(model, prompt, tokens, mode="prompt")
    torch.testing.assert_close(ours, _hooked_encode(model, tokens, prompt.ctx), atol=1e-5, rtol=0)
    # ...and a per-row context gives the row-wise result of the shared one.
    per_row = prompt.ctx.unsqueeze(0).repeat(len(CAPTIONS), 1, 1)
    torch.testing.assert_close(encode_text_with_ctx(model, tokens, per_row), ours, atol=1e-6, rtol=0)


@torch.no_grad()
def test_changing_ctx_changes_output(model_and_tok) -> None:
    model, tok = model_and_tok
    tokens = build_negated_tokens(tok, CAPTIONS, N_CTX)
    ctx = _placeholder_ctx(model)
    base = encode_text_with_ctx(model, tokens, ctx)
    ctx2 = ctx.clone()
    ctx2[3] += 0.5 * torch.randn_like(ctx2[3])
    moved = encode_text_with_ctx(model, tokens, ctx2)
    assert (base - moved).norm(dim=-1).min() > 1e-3  # every row sees the context (causal: EOT is after it)


def test_gradient_reaches_ctx_not_frozen_parts(model_and_tok) -> None:
    model, tok = model_and_tok
    tower = text_tower(model)
    tokens = build_negated_tokens(tok, ["a dog runs on the green grass", "a red bus"], N_CTX)
    prompt = NegationPrompt.for_model(model, n_ctx=N_CTX)
    tower.positional_embedding.requires_grad_(False)
    try:
        model.zero_grad(set_to_none=True)
        out = negated_text_features(model, prompt, tokens, mode="prompt")
        (out * torch.randn_like(out)).sum().backward()
        assert prompt.ctx.grad is not None and bool((prompt.ctx.grad.abs().sum(dim=1) > 0).all())
        assert tower.positional_embedding.grad is None
        # The placeholders are replaced, so their own embedding row gets no gradient; caption words do.
        x_id = int(tok(["X"])[0, 1])
        grad = tower.token_embedding.weight.grad
        assert float(grad[x_id].abs().sum()) == 0.0
        dog_id = int(tok(["dog"])[0, 1])
        assert float(grad[dog_id].abs().sum()) > 0.0
    finally:
        tower.positional_embedding.requires_grad_(True)
        model.zero_grad(set_to_none=True)


def test_negation_prompt_shape_and_init() -> None:
    torch.manual_seed(1)
    prompt = NegationPrompt(n_ctx=64, width=512, init_std=0.02)
    assert prompt.ctx.shape == (64, 512)
    assert [n for n, _ in prompt.named_parameters()] == ["ctx"]
    assert abs(float(prompt.ctx.detach().std()) - 0.02) < 0.001
    assert abs(float(prompt.ctx.detach().mean())) < 0.001


def test_ctx_too_long_for_sequence_raises(model_and_tok) -> None:
    model, _ = model_and_tok
    with pytest.raises(ValueError, match="do not fit"):
        encode_text_with_ctx(model, torch.zeros(1, CONTEXT, dtype=torch.long), torch.zeros(CONTEXT, 64))


# ----------------------------------------------------------------------------- tokens


def test_prompt_tokens_layout(registry: str) -> None:
    tok = open_clip.get_tokenizer("ncu-negtest-clip")
    tokens = build_negated_tokens(tok, CAPTIONS, N_CTX)
    assert tokens.dtype == torch.long and tokens.shape == (len(CAPTIONS), CONTEXT)
    assert bool((tokens[:, 0] == SOT).all())
    assert bool((tokens[:, 1 : 1 + N_CTX] == tok(["x"])[0, 1]).all())
    # Without a perturber the caption follows the placeholders verbatim.
    expected = tok(["x x x x x x x x " + c for c in CAPTIONS])
    assert torch.equal(tokens, expected)
    # The empty caption is SOT, 8 placeholders, EOT.
    assert tokens[2, 1 + N_CTX] == EOT


def test_prompt_tokens_use_the_perturber(registry: str) -> None:
    tok = open_clip.get_tokenizer("ncu-negtest-clip")
    tokens = build_negated_tokens(tok, CAPTIONS, N_CTX, perturber=CaptionPerturber(seed=7))
    twin = CaptionPerturber(seed=7)
    expected = tok(["X " * N_CTX + twin(c) for c in CAPTIONS])
    assert torch.equal(tokens, expected)


def test_long_caption_keeps_eot_and_pooling_uses_it(model_and_tok) -> None:
    model, tok = model_and_tok
    long_caption = " ".join(["zebra"] * 100)
    tokens = build_negated_tokens(tok, [long_caption, "a dog"], N_CTX)
    assert tokens[0, -1] == EOT and int((tokens[0] == EOT).sum()) == 1
    assert bool((tokens == EOT).any(dim=1).all())
    # Pooling reads the last position: with causal attention only that position sees the token just
    # before it, so changing that token must move the long row's feature (and leave the other row alone).
    ctx = _placeholder_ctx(model)
    with torch.no_grad():
        a = encode_text_with_ctx(model, tokens, ctx)
        changed = tokens.clone()
        changed[0, -2] = tok(["cat"])[0, 1]
        b = encode_text_with_ctx(model, changed, ctx)
    assert float((a[0] - b[0]).norm()) > 1e-4
    torch.testing.assert_close(a[1], b[1])


def test_eot_guard_repairs_a_truncating_tokenizer(registry: str) -> None:
    base = open_clip.get_tokenizer("ncu-negtest-clip")

    class NaiveTruncation:
        """A tokenizer that cuts at the context length without re-adding EOT (the reference bug)."""

        eot_token_id = EOT

        def __call__(self, texts: list[str]) -> torch.Tensor:
            rows = [[SOT] + base.encode(t) + [EOT] for t in texts]
            out = torch.zeros(len(rows), CONTEXT, dtype=torch.long)
            for i, r in enumerate(rows):
                r = r[:CONTEXT]
                out[i, : len(r)] = torch.tensor(r)
            return out

    naive = NaiveTruncation()
    long_caption = " ".join(["zebra"] * 100)
    assert not bool((naive(["X " * N_CTX + long_caption]) == EOT).any())  # the bug is real
    tokens = build_negated_tokens(naive, [long_caption, "a dog"], N_CTX)
    assert tokens[0, -1] == EOT and tokens[0].argmax() == CONTEXT - 1
    assert torch.equal(tokens[1], naive(["X " * N_CTX + "a dog"])[0])  # short rows untouched
    # ensure_eot on a hand-made case
    t = torch.tensor([[SOT, 5, 6, 7], [SOT, 5, EOT, 0]])
    assert torch.equal(ensure_eot(t, EOT), torch.tensor([[SOT, 5, 6, EOT], [SOT, 5, EOT, 0]]))


def test_tokenizer_without_eot_id_is_rejected() -> None:
    with pytest.raises(TypeError, match="eot_token_id"):
        build_negated_tokens(lambda texts: torch.zeros(len(texts), 8, dtype=torch.long), ["a"], 2)


def test_unknown_mode_raises(registry: str) -> None:
    tok = open_clip.get_tokenizer("ncu-negtest-clip")
    with pytest.raises(ValueError, match="mode"):
        build_negated_tokens(tok, ["a"], N_CTX, mode="nope")


# ----------------------------------------------------------------------------- template mode


@torch.no_grad()
def test_template_mode_is_the_ordinary_text_path(model_and_tok) -> None:
    model, tok = model_and_tok
    caps = ["a dog runs", "two cats"]
    tokens = build_negated_tokens(tok, caps, N_CTX, mode="template", templates=["there is no"])
    expected_tokens = tok(["there is no a dog runs", "there is no two cats"])
    assert torch.equal(tokens, expected_tokens)
    feats = negated_text_features(model, None, tokens, mode="template")
    torch.testing.assert_close(feats, F.normalize(model.encode_text(expected_tokens), dim=-1))


def test_template_choice_follows_rng(registry: str) -> None:
    tok = open_clip.get_tokenizer("ncu-negtest-clip")
    caps = ["a dog", "a cat", "a bus", "a tree", "a boat"]
    tokens = build_negated_tokens(tok, caps, N_CTX, mode="template", rng=random.Random(3))
    picker = random.Random(3)
    expected = tok([f"{picker.choice(DEFAULT_NEGATION_TEMPLATES)} {c}" for c in caps])
    assert torch.equal(tokens, expected)
    assert 10 <= len(DEFAULT_NEGATION_TEMPLATES) <= 25


# ----------------------------------------------------------------------------- unsupported towers


def test_unsupported_text_tower_raises() -> None:
    class HFLikeTextEncoder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class ModelWithHFText(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text = HFLikeTextEncoder()

    with pytest.raises(TypeError, match="HFLikeTextEncoder"):
        text_tower(ModelWithHFText())
    with pytest.raises(TypeError, match="HFLikeTextEncoder"):
        encode_text_with_ctx(ModelWithHFText(), torch.zeros(1, 16, dtype=torch.long), torch.zeros(2, 8))
    with pytest.raises(TypeError, match="unsupported text tower"):
        text_tower(nn.Linear(2, 2))


# ----------------------------------------------------------------------------- perturbation


SENTENCE = "the quick brown fox jumps over the lazy dog near a quiet river bank today"  # 15 words


def test_clean_text_lowercases_and_strips() -> None:
    assert clean_text("A Dog's 3 BIG-bones!\tnow") == "a dogs big bones now"
    p = CaptionPerturber(ops=("swap",), seed=0)
    assert p.words("Hello, World! 42") == ["hello", "world"]
    out = p("Hello, World! 42")
    assert sorted(out.split()) == ["hello", "world"]
    keep_case = CaptionPerturber(ops=("swap",), lowercase_strip=False, seed=0)
    assert sorted(keep_case("Hello, World!").split()) == ["Hello,", "World!"]


def test_perturber_is_deterministic_under_seed() -> None:
    caps = [SENTENCE, "a red bus near a tall building", "Two cats sleeping on a sofa"] * 5
    p, q, r = CaptionPerturber(seed=11), CaptionPerturber(seed=11), CaptionPerturber(seed=12)
    out_p, out_q, out_r = [p(c) for c in caps], [q(c) for c in caps], [r(c) for c in caps]
    assert out_p == out_q
    assert out_p != out_r
    given = CaptionPerturber(rng=random.Random(11))
    assert [given(c) for c in caps] == out_p


def test_perturber_does_not_touch_global_random() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    p = CaptionPerturber(seed=0)
    for _ in range(20):
        p(SENTENCE)
    assert random.random() == expected


def test_swap_keeps_the_word_multiset() -> None:
    p = CaptionPerturber(ops=("swap",), alpha=0.3, seed=0)
    changed = 0
    for _ in range(20):
        out = p(SENTENCE)
        assert Counter(out.split()) == Counter(SENTENCE.split())
        changed += out != SENTENCE
    assert changed > 0


def test_delete_keeps_at_least_one_word() -> None:
    everything = CaptionPerturber(ops=("delete",), alpha=1.0, seed=0)
    for _ in range(10):
        out = everything(SENTENCE).split()
        assert len(out) == 1 and out[0] in SENTENCE.split()
    nothing = CaptionPerturber(ops=("delete",), alpha=0.0, seed=0)
    assert nothing(SENTENCE) == SENTENCE
    some = CaptionPerturber(ops=("delete",), alpha=0.5, seed=0)
    lengths = [len(some(SENTENCE).split()) for _ in range(50)]
    assert min(lengths) >= 1 and max(lengths) < 15
    assert 4 < sum(lengths) / len(lengths) < 11  # ~7.5 expected words kept
    # the remaining words keep their order (deletion only)
    out = some(SENTENCE).split()
    it = iter(SENTENCE.split())
    assert all(w in it for w in out)
    assert random_deletion(["solo"], 1.0, random.Random(0)) == ["solo"]


@pytest.mark.parametrize(
    ("n_words", "alpha", "added"), [(15, 0.1, 1), (25, 0.1, 2), (5, 0.1, 1), (10, 0.5, 5)]
)
def test_insert_adds_the_expected_count(n_words: int, alpha: float, added: int) -> None:
    words = ["w" + chr(97 + i // 26) + chr(97 + i % 26) for i in range(n_words)]  # distinct, letters only
    sentence = " ".join(words)
    p = CaptionPerturber(ops=("insert",), alpha=alpha, seed=0)
    out = p(sentence).split()
    assert len(out) == n_words + added
    extra = Counter(out) - Counter(words)
    assert sum(extra.values()) == added and set(extra) <= set(words)


def test_empty_caption_comes_back_unchanged() -> None:
    p = CaptionPerturber(ops=("swap", "delete", "insert"), seed=0)
    assert p("") == ""
    assert p("123 !!!") == "123 !!!"
    assert p("   ") == "   "


def test_synonym_replacement_with_a_given_lexicon() -> None:
    lexicon = {"dog": ["hound"], "grass": ["lawn"], "runs": ["sprints"], "the": ["thy"]}
    words = "the dog runs on the grass the dog".split()
    out = synonym_replacement(words, 2, random.Random(0), lambda w: lexicon.get(w, []))
    assert len(out) == len(words)
    diffs = {(a, b) for a, b in zip(words, out, strict=True) if a != b}
    assert len({a for a, _ in diffs}) == 2  # two distinct words replaced ...
    assert all(lexicon[a] == [b] for a, b in diffs)  # ... by their synonyms, every occurrence
    assert out.count("the") == 3  # stop words are kept


def test_synonym_without_wordnet_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    with pytest.raises(WordNetUnavailableError, match=r"negation\.perturb\.ops"):
        CaptionPerturber(ops=("swap", "synonym"), seed=0)


def test_synonym_without_wordnet_warns_once_when_allowed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "nltk", None)
    monkeypatch.setitem(sys.modules, "nltk.corpus", None)
    with caplog.at_level(logging.WARNING, logger="ncu.text_aug"):
        p = CaptionPerturber(ops=("swap", "delete", "synonym"), require_wordnet=False, seed=0)
        for _ in range(5):
            p(SENTENCE)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "OFF" in warnings[0].getMessage()
    assert p.active_ops == ("swap", "delete")


def test_unknown_op_raises() -> None:
    with pytest.raises(ValueError, match="unknown"):
        CaptionPerturber(ops=("swap", "shuffle"))


def test_negation_head_starts_as_rotation_at_the_requested_angle():
    from ncu.models.negation import NegationHead, complex_structure

    j = complex_structure(16, seed=3)
    assert torch.allclose(j.T, -j, atol=1e-6) and torch.allclose(j @ j, -torch.eye(16), atol=1e-5)
    head = NegationHead(16, cos_angle=-0.45, seed=3)
    w = head.weight.detach()
    assert torch.allclose(w.T @ w, torch.eye(16), atol=1e-5)  # orthogonal: caption geometry kept
    x = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    y = head(x)
    assert torch.allclose((x * y).sum(1), torch.full((50,), -0.45), atol=1e-5)
    assert torch.allclose(x @ x.T, y @ y.T, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        complex_structure(5)


def test_anchor_at_angle_fixes_the_angle_and_keeps_the_learned_direction():
    from ncu.models.negation import anchor_at_angle

    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    e = torch.randn(20, 8, generator=g)
    tn = anchor_at_angle(t, e, -0.45)
    assert torch.allclose(tn.norm(dim=1), torch.ones(20), atol=1e-6)
    assert torch.allclose((t * tn).sum(1), torch.full((20,), -0.45), atol=1e-6)
    # The component orthogonal to t points along e's component orthogonal to t.
    e_perp = e - (e * t).sum(1, keepdim=True) * t
    tn_perp = tn - (tn * t).sum(1, keepdim=True) * t
    cos = torch.nn.functional.cosine_similarity(e_perp, tn_perp, dim=1)
    assert torch.allclose(cos, torch.ones(20), atol=1e-5)
    with pytest.raises(ValueError, match="cos_angle"):
        anchor_at_angle(t, e, 1.5)
