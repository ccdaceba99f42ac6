"""The offline synthetic world: deterministic, balanced, captions true of their scenes."""
import numpy as np
import pytest
import torch

from lifelong_moe.streams import synthetic as S
from lifelong_moe.streams.sources import KNOWN_SOURCES, load_source
from lifelong_moe.streams.synthetic_render import A, digit_pool, render


def test_at_least_eight_domains_listed_as_sources():
    assert len(S.DOMAINS) >= 8
    assert {f"synthetic/{d}" for d in S.DOMAINS} <= set(KNOWN_SOURCES)
    assert len(S.get_domain("fine").class_names) == 64


@pytest.mark.parametrize("name", S.DOMAINS)
def test_domain_is_balanced_deterministic_and_seeded(name):
    a = S.load_domain(name, seed=3, n_train_per_class=4, n_test_per_class=2)
    b = S.load_domain(f"synthetic/{name}", seed=3, n_train_per_class=4, n_test_per_class=2)
    c = S.load_domain(name, seed=4, n_train_per_class=4, n_test_per_class=2)
    n_cls = len(a.class_names)
    assert np.bincount(a.train_targets, minlength=n_cls).tolist() == [4] * n_cls
    assert np.bincount(a.test_targets, minlength=n_cls).tolist() == [2] * n_cls
    assert torch.equal(a.train.images, b.train.images) and a.train_targets == b.train_targets
    assert not torch.equal(a.train.images, c.train.images)
    x, y = a.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    assert y == a.train_targets[0]
    assert len(a.templates) == 1 and "{}" in a.templates[0]


def test_train_and_test_images_differ():
    d = S.load_domain("shapes", seed=0, n_train_per_class=5, n_test_per_class=5)
    tr = d.train.images.flatten(1).float()
    te = d.test.images.flatten(1).float()
    assert torch.cdist(te, tr).min() > 0  # no test image is a copy of a training image


def test_digit_glyph_splits_are_disjoint():
    pools = {s: np.concatenate(digit_pool(s)) for s in ("pretrain", "train", "test")}
    assert not set(pools["pretrain"]) & set(pools["train"])
    assert not set(pools["pretrain"]) & set(pools["test"])
    assert not set(pools["train"]) & set(pools["test"])


def test_unknown_domain_suggests_close_match():
    with pytest.raises(S.UnknownDomainError, match="did you mean 'shapes'"):
        load_source("synthetic/shapez", root=None)


def test_caption_matches_by_hand():
    scenes = np.full((2, len(S.ATTRS)), -1)
    scenes[0, [A["shape"], A["color"], A["count"]]] = [0, 0, 1]   # one red circle
    scenes[1, [A["shape"], A["color"], A["count"]]] = [1, 0, 3]   # three red squares
    mentions = np.full((4, len(S.ATTRS)), -1)
    mentions[0, A["color"]] = 0                                 # "a red object"
    mentions[1, A["shape"]] = 0                                 # "a circle"
    mentions[2, A["count"]] = -2                                # plural, no number ("some objects")
    mentions[3, [A["shape"], A["count"]]] = [1, 3]              # "three squares"
    assert S.caption_matches(scenes, mentions).tolist() == [[True, True, False, False],
                                                            [True, False, True, True]]


def test_caption_batch_captions_are_true_of_their_images():
    rng = np.random.default_rng(0)
    images, captions, scenes, mentions = S.caption_batch(64, rng, return_attrs=True)
    assert images.shape == (64, 3, 32, 32) and images.dtype == np.uint8
    assert len(captions) == 64 and all(isinstance(c, str) and c for c in captions)
    assert S.caption_matches(scenes, mentions).diagonal().all()


def test_attribute_bank_names_one_attribute_each():
    caps, rows = S.attribute_bank(np.random.default_rng(0))
    assert len(caps) == len(rows) == len(set(caps))
    assert ((rows != -1).sum(1) == 1).all()
    assert any("circle" in c for c in caps) and any("digit 7" in c for c in caps)


def test_styles_change_the_image():
    rng = np.random.default_rng(0)
    sc = S.sample_scenes(1, rng)
    sc = np.repeat(sc, len(S.STYLES), axis=0)
    sc[:, A["style"]] = np.arange(len(S.STYLES))
    imgs = render(sc, np.random.default_rng(1), rotation=0.0).astype(int)
    clean = imgs[0]
    for s in range(1, len(S.STYLES)):
        assert np.abs(imgs[s] - clean).mean() > 5, S.STYLES[s]


def test_quickstart_domains_each_have_their_own_backdrop():
    """Like real datasets, each domain of the toy MTIL has its own look (here its background),
    independent of the class: what DDAS's autoencoders can key on."""
    names = ["shapes", "counts", "styles", "digits", "fine"]
    backdrops = [int(np.argmax(S.get_domain(n).mix.backgrounds)) for n in names]
    assert len(set(backdrops)) == len(names)
    for n, b in zip(names, backdrops):
        assert np.flatnonzero(S.get_domain(n).mix.backgrounds).tolist() == [b]
    data = S.load_domain("counts", n_train_per_class=5, n_test_per_class=2)
    corner = data.train.images[:, :, 0, 0].float() / 255  # top-left pixel: mostly background (clean style)
    gray = torch.full((3,), 0.36)
    assert ((corner - gray).abs().max(dim=1).values < 0.05).float().mean() >= 0.8
