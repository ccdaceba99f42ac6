"""Pretraining the embedded tiny CLIP: cache key, atomic cached checkpoint, open_clip loading route."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lifelong_moe.backbones import pretrain_clip as P
from lifelong_moe.cli import main
from lifelong_moe.backbones.clip import create_clip
from lifelong_moe.backbones.factory import load_clip
from lifelong_moe.backbones.pretrain_clip import resolve_synthetic
from lifelong_moe.errors import UserError

TINY = dict(steps=2, batch_size=8, warmup_steps=1, eval_test_per_class=1)


def test_cache_key_follows_everything_that_shapes_the_weights(monkeypatch):
    base = P.PretrainConfig(**TINY)
    assert P.cache_key(base) == P.cache_key(P.PretrainConfig(**TINY))
    assert P.cache_key(base) == P.cache_key(P.PretrainConfig(**{**TINY, "eval_test_per_class": 7, "threads": 1}))
    keys = {P.cache_key(P.PretrainConfig(**{**TINY, **o})) for o in ({"steps": 3}, {"seed": 1}, {"lr": 2e-3})}
    assert P.cache_key(base) not in keys and len(keys) == 3
    import lifelong_moe.streams.synthetic as S

    before = P.cache_key(base)
    monkeypatch.setattr(S, "GENERATOR_VERSION", S.GENERATOR_VERSION + 1)
    assert P.cache_key(base) != before


def test_pretrain_writes_cached_checkpoint_loadable_by_open_clip(tmp_path):
    cfg = P.PretrainConfig(**TINY)
    path = P.pretrain_clip(cfg, cache_dir=tmp_path, progress=False)
    assert path.parent == tmp_path / "clip" and path.suffix == ".safetensors"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    info = json.loads(P.info_path(path).read_text())
    assert info["steps"] == 2 and set(info["zero_shot"]) == set(__import__("lifelong_moe.streams.synthetic",
                                                                         fromlist=["DOMAINS"]).DOMAINS)
    model, *_ = create_clip(cfg.model, str(path))  # the route a real user takes
    saved = load_file(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k].to(v.dtype)), k
    # the frozen random token table is stored in fp16 (half the bytes) without losing a bit
    assert saved["token_embedding.weight"].dtype == torch.float16
    assert saved["positional_embedding"].dtype == torch.float32
    mtime = path.stat().st_mtime_ns
    assert P.pretrain_clip(cfg, cache_dir=tmp_path, progress=False) == path
    assert path.stat().st_mtime_ns == mtime  # cached: not retrained


def test_pretraining_is_deterministic(tmp_path):
    cfg = P.PretrainConfig(**TINY)
    a = load_file(str(P.pretrain_clip(cfg, cache_dir=tmp_path / "a", progress=False)))
    b = load_file(str(P.pretrain_clip(cfg, cache_dir=tmp_path / "b", progress=False)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        untrained, *_ = create_clip(cfg.model, None)
    assert any(not torch.equal(untrained.state_dict()[k], a[k]) for k in a)  # training changed weights


def test_backbone_pretrained_synthetic_trains_on_first_use(tmp_path, monkeypatch):
    monkeypatch.setenv("LIFELONG_MOE_CACHE", str(tmp_path))
    model = load_clip("lmoe-tiny-vit", "synthetic", pretrain=TINY, progress=False)
    path = P.checkpoint_path(P.PretrainConfig(**TINY), tmp_path)
    assert path.is_file()
    saved = load_file(str(path))
    assert torch.equal(model.clip.visual.conv1.weight, saved["visual.conv1.weight"])
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_pretrain_key_is_one_clear_error():
    with pytest.raises(UserError, match=r"backbone.pretrain: unknown key 'stepz' \(did you mean 'steps'\?\)"):
        resolve_synthetic("lmoe-tiny-vit", {"stepz": 3})
    with pytest.raises(UserError, match="only used with backbone.pretrained: synthetic"):
        load_clip("lmoe-tiny-vit", None, pretrain={"steps": 3})


def test_cli_pretrain_prints_checkpoint(tmp_path, capsys):
    args = ["pretrain", "clip", "--cache-dir", str(tmp_path), "-q"] + [f"{k}={v}" for k, v in TINY.items()]
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.endswith(".safetensors") and (tmp_path / "clip").is_dir() and out.startswith(str(tmp_path))
    assert main(["pretrain", "clip", "--cache-dir", str(tmp_path), "-q", "stepz=3"]) == 2


def test_prefetched_batches_are_those_of_a_plain_loop():
    import numpy as np

    from lifelong_moe.backbones.pretrain_clip import prefetched

    a, b = np.random.default_rng(3), np.random.default_rng(3)
    fetched = [x.copy() for x in prefetched(lambda: a.random(4), 7)]
    plain = [b.random(4) for _ in range(7)]
    assert len(fetched) == 7 and all((x == y).all() for x, y in zip(fetched, plain))


def test_prefetched_hands_a_producer_error_to_the_consumer():
    from lifelong_moe.backbones.pretrain_clip import prefetched

    n = iter(range(10))

    def produce():
        i = next(n)
        if i == 2:
            raise ValueError("bad batch 2")
        return i

    got = []
    with pytest.raises(ValueError, match="bad batch 2"):
        for x in prefetched(produce, 5):
            got.append(x)
    assert got == [0, 1]
