"""LaCLIP checkpoint import: key names, shapes, tensor values and forward passes against references."""

from __future__ import annotations

import argparse
import json
import math

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from open_clip.model import CLIP

from ncu.models import laclip
from ncu.models.factory import CONFIG_DIR

# A small LaCLIP-shaped model: timm ViT trunk with QK-norm, OpenAI text transformer.
TINY = dict(
    image_size=32, patch=8, vis_width=48, vis_depth=2, vis_heads=3,
    embed=24, context=16, vocab=100, txt_width=32, txt_layers=2, txt_heads=2,
)
TINY_TIMM = "laclip_test_vit_tiny"
TINY_NAME = "LaCLIP-test-tiny"
# LaCLIP's CLIP_VITB16.
B16 = dict(
    image_size=224, patch=16, vis_width=768, vis_depth=12, vis_heads=12,
    embed=512, context=77, vocab=49408, txt_width=512, txt_layers=12, txt_heads=8,
)


def laclip_spec(image_size, patch, vis_width, vis_depth, vis_heads, embed, context, vocab, txt_width,
                txt_layers, txt_heads) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a LaCLIP CLIP state dict, written from LaCLIP's architecture description."""
    vw, tw = vis_width, txt_width
    spec: dict[str, tuple[int, ...]] = {
        "visual.cls_token": (1, 1, vw),
        "visual.pos_embed": (1, (image_size // patch) ** 2 + 1, vw),
        "visual.patch_embed.proj.weight": (vw, 3, patch, patch),
        "visual.patch_embed.proj.bias": (vw,),
    }
    for i in range(vis_depth):
        b = f"visual.blocks.{i}."
        for norm in ("norm1", "norm2"):
            spec[b + norm + ".weight"] = spec[b + norm + ".bias"] = (vw,)
        for norm in ("attn.q_norm", "attn.k_norm"):  # LayerNorm over one head
            spec[b + norm + ".weight"] = spec[b + norm + ".bias"] = (vw // vis_heads,)
        spec |= {
            b + "attn.qkv.weight": (3 * vw, vw), b + "attn.qkv.bias": (3 * vw,),
            b + "attn.proj.weight": (vw, vw), b + "attn.proj.bias": (vw,),
            b + "mlp.fc1.weight": (4 * vw, vw), b + "mlp.fc1.bias": (4 * vw,),
            b + "mlp.fc2.weight": (vw, 4 * vw), b + "mlp.fc2.bias": (vw,),
        }
    spec |= {"visual.norm.weight": (vw,), "visual.norm.bias": (vw,), "image_projection": (vw, embed)}
    spec |= {"token_embedding.weight": (vocab, tw), "positional_embedding": (context, tw)}
    for i in range(txt_layers):
        b = f"transformer.resblocks.{i}."
        for norm in ("ln_1", "ln_2"):
            spec[b + norm + ".weight"] = spec[b + norm + ".bias"] = (tw,)
        spec |= {
            b + "attn.in_proj_weight": (3 * tw, tw), b + "attn.in_proj_bias": (3 * tw,),
            b + "attn.out_proj.weight": (tw, tw), b + "attn.out_proj.bias": (tw,),
            b + "mlp.c_fc.weight": (4 * tw, tw), b + "mlp.c_fc.bias": (4 * tw,),
            b + "mlp.c_proj.weight": (tw, 4 * tw), b + "mlp.c_proj.bias": (tw,),
        }
    spec |= {"ln_final.weight": (tw,), "ln_final.bias": (tw,), "text_projection": (tw, embed)}
    spec["logit_scale"] = ()
    return spec


def expected_model_key(key: str) -> str:
    """Where each LaCLIP tensor must land in the open_clip model (written independently of the importer)."""
    if key == "image_projection":
        return "visual.head.proj.weight"
    if key.startswith("visual."):
        return "visual.trunk" + key[len("visual"):]
    return key


def random_state(spec: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Scaled so that activations stay moderate through the small networks.
    return {k: 0.2 * torch.randn(shape, generator=gen) for k, shape in spec.items()}


@pytest.fixture(scope="module")
def tiny_model_factory(tmp_path_factory):
    t = TINY
    laclip.register_qknorm_vit(
        TINY_TIMM, "vit_tiny_patch16_224", img_size=t["image_size"], patch_size=t["patch"],
        embed_dim=t["vis_width"], depth=t["vis_depth"], num_heads=t["vis_heads"],
    )
    cfg = laclip.laclip_config(
        TINY_TIMM, embed_dim=t["embed"], image_size=t["image_size"], context_length=t["context"],
        vocab_size=t["vocab"], text_width=t["txt_width"], text_heads=t["txt_heads"],
        text_layers=t["txt_layers"],
    )
    path = tmp_path_factory.mktemp("cfg") / f"{TINY_NAME}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return lambda: open_clip.create_model(TINY_NAME, pretrained=None).eval()


def check_loaded(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert len(state) == len(source)
    for key, value in source.items():
        expected = value.T if key == "image_projection" else value
        assert torch.equal(state[expected_model_key(key)], expected), key


def test_tiny_load_copies_every_tensor(tiny_model_factory):
    model = tiny_model_factory()
    source = random_state(laclip_spec(**TINY))
    report = laclip.load_laclip(model, source)
    assert report == {"missing": [], "unexpected": []}
    check_loaded(model, source)


def test_module_prefix_state_dict_wrapper_and_file(tiny_model_factory, tmp_path):
    source = random_state(laclip_spec(**TINY), seed=1)
    wrapped = {"epoch": 3, "args": argparse.Namespace(model="CLIP_VITB16"),
               "state_dict": {"module." + k: v for k, v in source.items()}}
    model = tiny_model_factory()
    laclip.load_laclip(model, wrapped)
    check_loaded(model, source)
    path = tmp_path / "ckpt.pt"
    torch.save(wrapped, path)
    model = tiny_model_factory()
    laclip.load_laclip(model, path)
    check_loaded(model, source)


def test_key_map_renames_and_transposes():
    proj = torch.arange(6.0).reshape(3, 2)
    mapped = laclip.laclip_key_map({
        "module.visual.blocks.0.attn.q_norm.weight": torch.ones(2),
        "module.image_projection": proj,
        "transformer.resblocks.0.ln_1.bias": torch.zeros(2),
        "logit_scale": torch.tensor(1.0),
    })
    assert sorted(mapped) == sorted([
        "visual.trunk.blocks.0.attn.q_norm.weight", "visual.head.proj.weight",
        "transformer.resblocks.0.ln_1.bias", "logit_scale",
    ])
    assert torch.equal(mapped["visual.head.proj.weight"], torch.tensor([[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]))


def test_missing_and_unexpected_keys_are_listed(tiny_model_factory):
    model = tiny_model_factory()
    source = random_state(laclip_spec(**TINY))
    del source["visual.blocks.1.attn.k_norm.bias"]
    source["prompt_ctx"] = torch.zeros(8, 32)
    with pytest.raises(KeyError) as err:
        laclip.load_laclip(model, source)
    message = str(err.value)
    assert "visual.trunk.blocks.1.attn.k_norm.bias" in message and "prompt_ctx" in message
    assert "missing" in message and "unexpected" in message

    report = laclip.load_laclip(model, source, strict=False)
    assert report == {"missing": ["visual.trunk.blocks.1.attn.k_norm.bias"], "unexpected": ["prompt_ctx"]}
    assert torch.equal(model.state_dict()["visual.trunk.norm.weight"], source["visual.norm.weight"])

    source["visual.blocks.1.attn.k_norm.bias"] = torch.zeros(TINY["vis_width"] // TINY["vis_heads"])
    laclip.load_laclip(model, source, ignore=("prompt_ctx",))


def test_shape_mismatch_raises(tiny_model_factory):
    source = random_state(laclip_spec(**(TINY | dict(image_size=40))))  # pos_embed for a 5x5 grid
    with pytest.raises(ValueError, match="visual.trunk.pos_embed"):
        laclip.load_laclip(tiny_model_factory(), source)


def reference_image_embedding(source: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """LaCLIP's encode_image: timm QK-norm ViT, cls token after the final norm, then @ image_projection."""
    t = TINY
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, qk_norm=True, img_size=t["image_size"],
        patch_size=t["patch"], embed_dim=t["vis_width"], depth=t["vis_depth"], num_heads=t["vis_heads"],
    ).eval()
    vit.load_state_dict({k[len("visual."):]: v for k, v in source.items() if k.startswith("visual.")})
    tokens = vit.forward_features(images)
    return tokens[:, 0] @ source["image_projection"]


def reference_text_embedding(sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """LaCLIP's encode_text written out: pre-LN causal transformer with QuickGELU, EOT (argmax) pooling."""
    width, heads = TINY["txt_width"], TINY["txt_heads"]
    batch, length = tokens.shape
    head_dim = width // heads
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(TINY["txt_layers"]):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(width, dim=-1)
        q, k, v = (z.reshape(batch, length, heads, head_dim).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(batch, length, width)
        x = x + out @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
    x = F.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(batch), tokens.argmax(dim=-1)] @ sd["text_projection"]


def test_forward_matches_laclip_reference(tiny_model_factory):
    source = random_state(laclip_spec(**TINY), seed=2)
    for key in list(source):  # norms near 1, as in a trained model
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "ln_1.weight", "ln_2.weight",
                         "ln_final.weight", "q_norm.weight", "k_norm.weight")):
            source[key] = 1.0 + source[key]
    model = tiny_model_factory()
    laclip.load_laclip(model, source)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, TINY["image_size"], TINY["image_size"], generator=gen)
    tokens = torch.randint(1, TINY["vocab"] - 1, (3, TINY["context"]), generator=gen)
    for row, eot in enumerate([5, 9, TINY["context"] - 1]):  # EOT = the largest id, padding after it
        tokens[row, eot] = TINY["vocab"] - 1
        tokens[row, eot + 1:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), reference_image_embedding(source, images), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            model.encode_text(tokens), reference_text_embedding(source, tokens), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("name,size", [("LaCLIP-ViT-B-16", B16)])
def test_shipped_configs_match_laclip_checkpoints(name, size):
    on_disk = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    assert on_disk == laclip.laclip_config(laclip.LACLIP_MODELS[name])
    assert open_clip.get_model_config(name) is not None  # registered on import
    spec = laclip_spec(**size)
    with torch.device("meta"):  # full size without allocating 150M parameters
        model = CLIP(**open_clip.get_model_config(name))
        source = {k: torch.empty(shape) for k, shape in spec.items()}
    assert sum(math.prod(s) for s in spec.values()) == sum(p.numel() for p in model.parameters())
    assert laclip.load_laclip(model, source) == {"missing": [], "unexpected": []}


def test_factory_reads_laclip_files_for_laclip_names_with_laclip_preprocessing(tiny_model_factory, tmp_path):
    """The path train.py and evaluate.py take: model.name=LaCLIP-* with one of LaCLIP's .pt files."""
    from ncu.models.factory import create

    tiny_model_factory()  # registers the tiny LaCLIP-shaped config
    source = random_state(laclip_spec(**TINY), seed=2)
    path = tmp_path / "laclip.pt"
    torch.save({"args": argparse.Namespace(model="CLIP_VITB16"),
                "state_dict": {"module." + k: v for k, v in source.items()}}, path)
    bundle = create(TINY_NAME, str(path))
    check_loaded(bundle.model, source)
    normalize = [t for t in bundle.preprocess_val.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(normalize.mean) == laclip.IMAGENET_MEAN and tuple(normalize.std) == laclip.IMAGENET_STD


def test_an_open_clip_state_dict_under_a_laclip_name_says_which_name_to_use(tiny_model_factory):
    model = tiny_model_factory()
    wrong = {"visual.conv1.weight": torch.zeros(1), "visual.transformer.resblocks.0.ln_1.weight": torch.zeros(1)}
    with pytest.raises(laclip.CheckpointKeyError, match="model.name=ViT-B-32"):
        laclip.load_laclip(model, wrong)


@pytest.mark.slow
def test_laclip_laion_b32_checkpoint_loads_as_open_clip_vit_b32(tmp_path):
    """LaCLIP's LAION-400M ViT-B/32 checkpoints are open_clip ViT-B-32 models saved as {"state_dict": ...}
    with DDP's ``module.`` prefixes: under model.name=ViT-B-32 they give open_clip's own outputs."""
    from ncu.models.factory import create

    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path / "laion400m_clip.pt"
    torch.save({"epoch": 32, "name": "laion400m", "state_dict": {"module." + k: v for k, v in
                                                                 reference.state_dict().items()}}, path)
    model = create("ViT-B-32", str(path)).model.eval()
    images = torch.randn(2, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a dog", "a diagram"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images))
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens))
