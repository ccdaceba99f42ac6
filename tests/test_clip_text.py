"""Trimmed text encoding: the same features as open_clip's full-context path, for a fraction of the work."""
import pytest
import torch

from lifelong_moe.backbones.clip import create_clip, encode_text
from lifelong_moe.moe import inject_moe_adapters

PROMPTS = ["a photo of a red circle.", "two small green striped squares in the top left on a gray background.",
           "a cat.", "a photo of a digit 7, in noisy style.", "x"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok, *_ = create_clip("lmoe-tiny-vit", None)
    return model.eval(), tok


@pytest.mark.parametrize("buckets", [1, 2, 3, 10])
def test_trimmed_text_features_equal_open_clip(tiny, buckets, one_thread):
    model, tok = tiny
    tokens = tok(PROMPTS)
    assert int(tokens.argmax(-1).max()) + 1 < tokens.shape[1]  # something to trim
    full = model.encode_text(tokens)
    torch.testing.assert_close(encode_text(model, tokens, buckets=buckets), full, rtol=0, atol=2e-5)


def test_trimmed_text_gradients_equal_open_clip(tiny, one_thread):
    model, tok = tiny
    tokens = tok(PROMPTS)
    w = model.text_projection
    grads = []
    for fn in (lambda: model.encode_text(tokens), lambda: encode_text(model, tokens, buckets=2)):
        w.grad = None
        w.requires_grad_(True)
        fn().square().sum().backward()
        grads.append(w.grad.clone())
    w.requires_grad_(False)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("route_token", ["first", "eot"])
def test_trimmed_text_through_moe_branches(route_token, one_thread):
    torch.manual_seed(0)
    model, tok, *_ = create_clip("lmoe-tiny-vit", None)
    moe = inject_moe_adapters(model, towers=("text",), num_experts=4, k=2, route_token=route_token)
    moe.add_task()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.05)
    model.eval()
    moe.set_task(0)
    tokens = tok(PROMPTS)
    torch.testing.assert_close(encode_text(model, tokens, buckets=3), model.encode_text(tokens), rtol=0, atol=2e-5)


def test_towers_without_causal_mask_take_open_clip_path():
    calls = []

    class Bidirectional(torch.nn.Module):  # e.g. a SigLIP-style tower: no attn_mask, last-token pooling
        attn_mask = None
        text_pool_type = "last"

        def encode_text(self, tokens):
            calls.append(tokens.shape)
            return torch.zeros(tokens.shape[0], 4)

    out = encode_text(Bidirectional(), torch.ones(3, 7, dtype=torch.long))
    assert out.shape == (3, 4) and calls == [(3, 7)]
