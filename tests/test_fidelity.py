"""Fidelity to the reference (ZSCL / MoE-Adapters) on real data: QuickGELU for OpenAI's weights,
the full prompt-template lists, CLIP's train augmentation, CIFAR-100's published class order, and
EWC's Fisher on the text tower."""
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from lifelong_moe.backbones import clip as clip_mod
from lifelong_moe.config import load_config
from lifelong_moe.errors import UserError
from lifelong_moe.runs.runner import build
from lifelong_moe.streams.templates import TEMPLATES
from lifelong_moe.streams.transforms import ClipTrainTransform, ImageTransform, transformed

from conftest import CONFIGS
from helpers import tiny_config

REAL = ["mtil_order1.yaml", "mtil_order2.yaml", "cifar100_cil.yaml", "moe_adapters_mtil_order1.yaml",
        "moe_adapters_mtil_order1_fewshot.yaml", "moe_adapters_cil_cifar100.yaml"]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def activations(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.GELU, QuickGELU))}


# ------------------------------------------------------------------------------------ QuickGELU
@pytest.fixture
def weightless_open_clip(monkeypatch):
    """open_clip's model factory without weights: the model is built on the meta device (shapes only),
    as it would be for the tag, with every other argument create_clip passes."""
    real = open_clip.create_model_and_transforms
    seen = {}

    def build_without_weights(name, pretrained=None, **kw):
        seen.update(name=name, pretrained=pretrained, **kw)
        with torch.device("meta"):
            return real(name, pretrained=None, device="meta", **kw)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", build_without_weights)
    return seen


def test_openai_vit_b16_builds_quickgelu(weightless_open_clip):
    model, tokenizer, size, mean, std = clip_mod.create_clip("ViT-B-16", "openai")
    assert weightless_open_clip["pretrained"] == "openai" and weightless_open_clip["force_quick_gelu"] is True
    assert activations(model) == {QuickGELU}
    assert size == 224 and mean == OPENAI_MEAN and std == OPENAI_STD
    # what open_clip would build by itself for the same name and tag: nn.GELU (it only warns)
    with torch.device("meta"):
        plain = open_clip.create_model("ViT-B-16", pretrained=None, device="meta")
    assert activations(plain) == {nn.GELU}


@pytest.mark.parametrize("name", REAL)
def test_real_presets_build_quickgelu(name, weightless_open_clip):
    for cfg in load_config(CONFIGS / name):
        b = cfg.backbone
        assert (b.name, b.pretrained, b.quick_gelu) == ("ViT-B-16", "openai", True), cfg.name
        # a local copy of the weights (the configs' advice) keeps QuickGELU: the flag is explicit
        assert clip_mod.resolve_quick_gelu(b.name, "/models/ViT-B-16.pt", b.quick_gelu) is True
    model, *_ = clip_mod.create_clip(b.name, b.pretrained, quick_gelu=b.quick_gelu)
    assert activations(model) == {QuickGELU}


def test_quick_gelu_resolution():
    r = clip_mod.resolve_quick_gelu
    assert r("ViT-B-16", "openai") is True                    # the tag was trained with QuickGELU
    assert r("ViT-B-16-quickgelu", None) is True               # the model config says so
    assert r("ViT-B-16", "laion2b_s34b_b88k") is False         # trained with GELU
    assert r("ViT-B-16", "/somewhere/weights.pt") is False     # a path cannot tell: auto is GELU
    assert r("ViT-B-16", "laion2b_s34b_b88k", True) is True    # the flag wins
    assert r("lmoe-tiny-vit", None) is False and r("lmoe-tiny-vit", "synthetic") is False
    with pytest.raises(UserError, match="backbone.quick_gelu"):
        r("ViT-B-16-quickgelu", "openai", False)


def test_tiny_model_keeps_gelu():
    """The shipped tiny model (quickstart, tests) is built as before: nn.GELU, same weights."""
    torch.manual_seed(0)
    model, *_ = clip_mod.create_clip("lmoe-tiny-vit", None)
    torch.manual_seed(0)
    direct = open_clip.create_model("lmoe-tiny-vit", pretrained=None)
    assert activations(model) == {nn.GELU}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))


# ------------------------------------------------------------------------------------ templates
@pytest.mark.parametrize("name,count,first", [
    ("cifar100", 18, "a photo of a {}."),
    ("caltech101", 34, "a photo of a {}."),
    ("dtd", 8, "a photo of a {} texture."),
    ("eurosat", 3, "a centered satellite photo of {}."),
    ("fgvc_aircraft", 2, "a photo of a {}, a type of aircraft."),
    ("flowers102", 1, "a photo of a {}, a type of flower."),
    ("food101", 1, "a photo of a {}, a type of food."),
    ("mnist", 1, 'a photo of the number: "{}".'),
    ("oxford_pet", 1, "a photo of a {}, a type of pet."),
    ("stanford_cars", 9, "a photo of a {}, a type of car."),
    ("sun397", 2, "a photo of a {}."),
])
def test_reference_template_lists(name, count, first):
    """Counts and first (training) templates of MoE-Adapters4CL@4572d97 mtil/src/datasets."""
    t = TEMPLATES[name]
    assert len(t) == count and t[0] == first
    assert len(set(t)) == count and all(s.count("{}") == 1 for s in t)
    assert TEMPLATES["cifar100"][5] == "a bad photo of a {}."  # the CIL prompt is one of the 18


def test_every_mtil_dataset_has_its_list():
    from lifelong_moe.streams.mtil import MTIL_DATASETS
    from lifelong_moe.streams.sources import _TORCHVISION

    assert set(MTIL_DATASETS) <= set(TEMPLATES) and set(_TORCHVISION) <= set(TEMPLATES)


def test_ensemble_head_uses_every_template():
    """A stream task built from a torchvision source evaluates with the whole list and trains with
    the first (strategies/base.py ``templates``)."""
    from lifelong_moe.data import LabelSpace, TaskInfo

    _, strategy, _ = build(tiny_config({"name": "zeroshot"}), progress=False)
    task = TaskInfo(0, "dtd", LabelSpace("dtd", ("banded", "dotted"), tuple(TEMPLATES["dtd"])), (0, 1))
    assert strategy.templates(task, "ensemble") == tuple(TEMPLATES["dtd"])
    assert strategy.templates(task, "first") == ("a photo of a {} texture.",)


# ------------------------------------------------------------------------------------ augmentation
def images(n=6, h=40, w=48):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(3))


def test_clip_train_transform_is_random_but_well_formed():
    t = ImageTransform(32, OPENAI_MEAN, OPENAI_STD, augment="clip").for_training()
    assert isinstance(t, ClipTrainTransform) and t.random
    x = images()
    torch.manual_seed(0)
    a = t.tensor(x)
    b = t.tensor(x)
    assert a.shape == b.shape == (6, 3, 32, 32) and not torch.equal(a, b)   # a new crop per draw
    torch.manual_seed(0)
    assert torch.equal(t.tensor(x), a)                                        # seeded: reproducible
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    pixels = a * std + mean                                                   # normalised from [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # scale 0.9-1.0 of the area: a crop keeps most of the image, so it stays close to the centre view
    centre = ImageTransform(32, OPENAI_MEAN, OPENAI_STD).tensor(x)
    assert (a - centre).abs().mean() < (torch.roll(centre, 1, 0) - centre).abs().mean()
    grey = t.tensor(torch.rand(1, 20, 20))                                    # grey -> RGB
    assert grey.shape == (3, 32, 32)


def test_clip_train_transform_on_pil_images():
    from PIL import Image

    t = ClipTrainTransform(24, OPENAI_MEAN, OPENAI_STD)
    img = Image.fromarray((images(1, 30, 36)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    torch.manual_seed(1)
    a, b = t(img), t(img)
    assert a.shape == (3, 24, 24) and not torch.equal(a, b)


def test_augment_changes_training_images_only():
    from lifelong_moe.data import ClassificationData
    from lifelong_moe.streams.sources import TensorImages

    x, y = images(8, 36, 36), [0, 1] * 4
    data = ClassificationData("d", ["a", "b"], TensorImages(x, y), TensorImages(x, y), y, y)
    plain_train, plain_test = transformed(data, ImageTransform(32, OPENAI_MEAN, OPENAI_STD))
    aug_train, aug_test = transformed(data, ImageTransform(32, OPENAI_MEAN, OPENAI_STD, augment="clip"))
    for i in range(len(y)):
        assert torch.equal(aug_test[i][0], plain_test[i][0])          # evaluation: deterministic, unchanged
        assert torch.equal(plain_train[i][0], plain_train[i][0])
        first, second = aug_train[i][0], aug_train[i][0]
        assert first.shape == (3, 32, 32) and not torch.equal(first, second)
        assert aug_train[i][1] == y[i]


def test_augment_option_validates_and_defaults_to_none():
    assert tiny_config({"name": "zeroshot"}).training.augment == "none"
    assert tiny_config({"name": "zeroshot"}, training__augment="clip").training.augment == "clip"
    from lifelong_moe.errors import ConfigError

    with pytest.raises(ConfigError, match="training.augment"):
        tiny_config({"name": "zeroshot"}, training__augment="random")


@pytest.mark.parametrize("name", REAL)
def test_real_presets_augment(name):
    for cfg in load_config(CONFIGS / name):
        assert cfg.training.augment == "clip" and cfg.evaluation.prompt in ("ensemble", "first")


def test_augmented_run_is_reproducible():
    """Same config and seed -> the same augmented training batches (torch's generator is seeded per
    experience by the strategy)."""
    from torch.utils.data import DataLoader

    def first_batch():
        stream, strategy, _ = build(tiny_config({"name": "zeroshot"}, training__augment="clip"), progress=False)
        torch.manual_seed(5)
        return next(iter(DataLoader(stream.train_stream[0].dataset, batch_size=4)))[0]

    assert torch.equal(first_batch(), first_batch())


# ------------------------------------------------------------------------------------ class order
CIFAR100_ORDER_HEAD = [87, 0, 52, 58, 44, 91, 68, 97, 51, 15]  # MoE-Adapters4CL cil/class_orders/cifar100.yaml
CIFAR100_ORDER_TAIL = [98, 13, 99, 7, 34, 55, 54, 26, 35, 39]


@pytest.mark.parametrize("name", ["cifar100_cil.yaml", "moe_adapters_cil_cifar100.yaml"])
def test_cifar100_presets_use_the_published_order(name):
    for cfg in load_config(CONFIGS / name):
        order = cfg.stream.class_order
        assert isinstance(order, list) and sorted(order) == list(range(100))
        assert order[:10] == CIFAR100_ORDER_HEAD and order[-10:] == CIFAR100_ORDER_TAIL


# ------------------------------------------------------------------------------------ EWC
def test_ewc_fisher_reaches_the_text_tower():
    cfg = tiny_config({"name": "ewc", "towers": ["image", "text"], "fisher_batches": 2})
    stream, strategy, _ = build(cfg, progress=False)
    strategy.train(stream.train_stream[0], eval_streams=[])
    plugin = next(p for p in strategy.plugins if type(p).__name__ == "EWCPlugin")
    fisher, _ = plugin.terms[0]
    trainable = {n for n, p in strategy.model.named_parameters() if p.requires_grad}
    assert set(fisher) == trainable
    assert any(n.startswith("clip.transformer.") for n in trainable)
    zero = sorted(n for n, f in fisher.items() if not bool((f > 0).any()))
    assert zero == []
