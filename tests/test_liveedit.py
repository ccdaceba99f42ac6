"""LiveEdit (strategies/liveedit.py) on the pretrained tiny LLaVA: the backbone is untouched when no
edit is routed, the sentinel's threshold decides, text-only inputs bypass, routing over 10,000
stored edits is one batched similarity, weights round-trip, generation applies the experts at
every cached step, and meta-training learns to edit (slow)."""
from __future__ import annotations

import os

import pytest
import torch

from lifelong_moe.editing import liveedit_modules as modules
from lifelong_moe.editing.liveedit_modules import paired_similarity, slot_similarity, soft_weights
from lifelong_moe.errors import UserError
from lifelong_moe.streams.edit_synthetic import IMAGE_MEAN, IMAGE_STD, edit_records
from lifelong_moe.strategies.liveedit import Method, Params
from lifelong_moe.backbones.factory import load_vlm
from lifelong_moe.backbones.vlm import VisionLanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> VisionLanguageModel:
    """The tiny LLaVA pretrained on the synthetic world (shared test cache, as conftest sets it)."""
    cache = os.environ.get("LIFELONG_MOE_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIFELONG_MOE_CACHE", cache)
        return load_vlm("lmoe-tiny-llava", "synthetic", progress=False)


@pytest.fixture(scope="module")
def records():
    return edit_records("test", 12, seed=0)


@pytest.fixture
def method(vlm):
    m = Method(Params(max_experts=None))  # the reference's routing; untrained: the rules hold for any weights
    m.attach(vlm)
    yield m
    m.detach()


def image_batch(vlm, recs, answers=True):
    x = torch.stack([r.image for r in recs])
    return vlm.batch(x, [r.src for r in recs], [r.alt for r in recs] if answers else None)


def text_batch(vlm, recs):
    return vlm.batch(None, [r.loc for r in recs], [r.loc_ans for r in recs])


@torch.no_grad()
def logits(vlm, batch):
    return vlm.logits(batch)


@torch.no_grad()
def input_features(m, batch):
    """(phi_in, phi_sentinel) of each row: what the hard filter compares."""
    hidden, _ = m._to_block(batch)
    ext, h = m.nets.input_extractor, hidden.float()
    phi = ext.vision(h, batch.prompt_mask, h, batch.image_mask)
    return phi, ext.sentinel_vision(h, batch.prompt_mask)


def forced(m, record, batch, accept: bool):
    """``record``'s edit with its visual key just past (accept) or just short of the sentinel's
    threshold for the single input ``batch``: v_m - v_s = +-0.5 sim(phi_in, phi_in)."""
    e = m.make_edit(record)
    phi, sentinel = input_features(m, batch)
    e["vision_key"] = (sentinel[0] + (0.5 if accept else -0.5) * phi[0]).cpu()
    return e


# ----------------------------------------------------------------------------- routing rules
def test_similarity_and_soft_weights_on_hand_made_inputs():
    a = torch.tensor([[[1.0, 0, 0, 0], [0, 2.0, 0, 0]]])            # 1 input, 2 slots, m = 4
    b = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0]],              # slot-wise: (1 + 2) / 2 / sqrt(4)
                      [[0, 1.0, 0, 0], [1.0, 0, 0, 0]]])             # only cross-slot overlap: 0
    assert slot_similarity(a, b).tolist() == [[0.75, 0.0]]
    assert paired_similarity(a, b[:1]).tolist() == [0.75]
    s = torch.tensor([[0.0, 2.0, -1.0], [1.0, 1.0, 1.0]])
    keep = torch.tensor([[True, True, False], [False, False, False]])
    w = soft_weights(s, keep)
    rel = torch.tensor([0.0, 2.0]).softmax(0)
    torch.testing.assert_close(w[0, :2], rel * torch.sigmoid(torch.tensor([0.0, 2.0])))
    assert w[0, 2] == 0 and (w[1] == 0).all()                        # filtered out; nothing kept
    assert 0 < w[0].sum() < 1
    perm = torch.tensor([2, 0, 1])                                   # order of the store does not matter
    torch.testing.assert_close(soft_weights(s[:, perm], keep[:, perm]), w[:, perm])
    # the residual over each row's own kept experts equals the dense sum over the whole bank
    g = torch.Generator().manual_seed(0)
    x, c, r = (torch.randn(*shape, generator=g) for shape in ((2, 5, 8), (6, 4, 8), (6, 4, 8)))
    dense = torch.tensor([[0.0, 0.3, 0.0, 0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    k = Method._sparse(dense)
    assert k[1].shape == (2, 2) and sorted(k[1][0].tolist()) == [1, 4]
    torch.testing.assert_close(modules.routed_residual(x, c, r, *k), modules.expert_residual(x, c, r, dense))
    assert (modules.routed_residual(x, c, r, *k)[1] == 0).all()


def test_lora_scale_is_the_reference_by_default_and_width_matched_on_request(vlm):
    from lifelong_moe.strategies.liveedit import width_matched_lora_scale
    assert width_matched_lora_scale(4096) == 5.0  # the reference's LLaVA / MiniGPT-4 width
    assert width_matched_lora_scale(128) == pytest.approx(5 / 32 ** 0.5)
    for d in (128, 1024, 4096):  # the residual's size relative to |h| ~ d s^2 stays the reference's
        s = 1 / (width_matched_lora_scale(d) * 2)
        assert d * s ** 2 == pytest.approx(4096 * 0.1 ** 2)
    for params, scale in ((Params(), 0.1), (Params(lora_scale="width_matched"), 1 / (2 * 5 / 32 ** 0.5)),
                          (Params(lora_scale=1.0), 0.5)):
        m = Method(params)
        m.attach(vlm)
        try:
            assert m.nets.gen_c.scale == m.nets.gen_r.scale == pytest.approx(scale)
        finally:
            m.detach()
    for bad in (0, -1.0, "width"):
        with pytest.raises(ValueError):
            Params(lora_scale=bad)


def test_empty_store_is_bit_identical_to_the_backbone(vlm, records):
    img, txt = image_batch(vlm, records[:4]), text_batch(vlm, records[:4])
    x, qs = torch.stack([r.image for r in records[:4]]), [r.src for r in records[:4]]
    base = logits(vlm, img), logits(vlm, txt), vlm.generate_ids(x, qs, max_new_tokens=3)
    m = Method(Params())
    m.attach(vlm)
    try:
        m.set_edits({})
        assert torch.equal(logits(vlm, img), base[0]) and torch.equal(logits(vlm, txt), base[1])
        assert torch.equal(vlm.generate_ids(x, qs, max_new_tokens=3), base[2])
        m.set_edits({"a": m.make_edit(records[0])})
        m.set_edits({})                                              # deleting every edit restores it
        assert torch.equal(logits(vlm, img), base[0])
    finally:
        m.detach()
    assert torch.equal(logits(vlm, img), base[0])                     # detached: hooks gone


def test_the_sentinel_threshold_decides_and_a_rejected_edit_changes_nothing(vlm, method, records):
    one = image_batch(vlm, records[:1])
    base = logits(vlm, one)
    method.set_edits({"e": forced(method, records[0], one, accept=False)})
    keep, w = method.routing(one)
    assert keep.tolist() == [[False]] and w.tolist() == [[0.0]]
    assert torch.equal(logits(vlm, one), base)
    method.set_edits({"e": forced(method, records[0], one, accept=True)})
    keep, w = method.routing(one)
    assert keep.tolist() == [[True]] and 0 < w.item() < 1
    assert not torch.allclose(logits(vlm, one), base)                 # the kept expert acts
    rejected = forced(method, records[0], one, accept=False)
    state = method.state_dict()
    method.detach()                                                   # one method on the VLM at a time
    no_filter = Method(Params(hard_filter=False))                     # mode switch: every expert passes
    no_filter.attach(vlm)
    try:
        no_filter.load_state_dict(state)
        no_filter.set_edits({"e": rejected})
        assert no_filter.routing(one)[0].tolist() == [[True]]
    finally:
        no_filter.detach()
        method.attach(vlm)


def test_text_only_inputs_never_change(vlm, method, records):
    one = image_batch(vlm, records[:1])
    txt = text_batch(vlm, records[:6])
    base, base_ids = logits(vlm, txt), vlm.generate_ids(None, [r.loc for r in records[:6]], max_new_tokens=3)
    base_img = logits(vlm, one)
    method.set_edits({"e": forced(method, records[0], one, accept=True)})
    assert not torch.allclose(logits(vlm, one), base_img)             # the edit is live for its image
    assert torch.equal(logits(vlm, txt), base)
    assert torch.equal(vlm.generate_ids(None, [r.loc for r in records[:6]], max_new_tokens=3), base_ids)
    assert not method.routing(txt)[0].any()


def test_ten_thousand_edits_route_in_one_batched_similarity(vlm, method, records, monkeypatch):
    g = torch.Generator().manual_seed(0)
    shapes = method._edit_shapes()
    store = {f"e{i}": {k: torch.randn(*s, generator=g) * (0.05 if k in ("c", "r") else 1.0)
                       for k, s in shapes.items()} for i in range(10_000)}
    method.set_edits(store)
    assert method._bank["c"].shape == (10_000, *shapes["c"])
    batch = image_batch(vlm, records[:3])
    calls = []
    real = modules.slot_similarity
    monkeypatch.setattr("lifelong_moe.strategies.liveedit.slot_similarity",
                        lambda a, b: calls.append(tuple(b.shape)) or real(a, b))
    keep, w = method.routing(batch)
    assert calls == [(10_000, *shapes["vision_key"]), (10_000, *shapes["text_key"])]  # visual, text: once each
    assert keep.shape == w.shape == (3, 10_000) and 0 < keep.sum() < keep.numel()
    # the batched rule is the per-edit rule
    phi, sentinel = input_features(method, batch)
    ids = list(store)  # bank order = store order
    for i in torch.randint(0, 10_000, (25,), generator=g).tolist():
        v = paired_similarity(phi, store[ids[i]]["vision_key"].expand_as(phi))
        assert keep[:, i].tolist() == (v > paired_similarity(phi, sentinel)).tolist()
    assert ((w > 0) == keep).all() and (w.sum(1) < 1).all()
    capped = Method(Params(max_experts=5))                            # cost bound: the 5 largest weights
    state = method.state_dict()
    method.detach()                                                   # one method on the VLM at a time
    capped.attach(vlm)
    try:
        capped.load_state_dict(state)
        capped.set_edits(store)
        ck, cw = capped.routing(batch)
        assert (ck.sum(1) == torch.clamp(keep.sum(1), max=5)).all() and (ck <= keep).all()
        assert ((cw > 0) == ck).all() and (cw.sum(1) < 1).all()
        for row in range(3):  # the kept five are the five largest weights (same scores, same order)
            assert set(ck[row].nonzero().flatten().tolist()) == set(w[row].topk(5).indices.tolist())
    finally:
        capped.detach()
        method.attach(vlm)
        method.set_edits(store)
    # only the kept experts matter: a store of exactly those gives the same outputs
    edited = logits(vlm, batch)
    kept_ids = [ids[i] for i in keep.any(0).nonzero().flatten().tolist()]
    method.set_edits({k: store[k] for k in kept_ids})
    torch.testing.assert_close(logits(vlm, batch), edited, rtol=1e-5, atol=1e-5)


def test_weights_round_trip_to_identical_outputs(vlm, method, records):
    import json

    from lifelong_moe.editing.types import EditMethod

    assert isinstance(method, EditMethod) and method.name == "liveedit" and method.supports_delete
    assert json.loads(json.dumps(method.config()))["layer"] == 2  # block at 2/3 of the tiny VLM's 4
    recs = records[:4]
    edits = {str(i): method.make_edit(r) for i, r in enumerate(recs)}
    one = image_batch(vlm, recs[:1])
    edits["0"] = forced(method, recs[0], one, accept=True)
    method.set_edits(edits)
    batch, x = image_batch(vlm, recs), torch.stack([r.image for r in recs])
    out, ids = logits(vlm, batch), vlm.generate_ids(x, [r.src for r in recs], max_new_tokens=3)
    state = method.state_dict()
    method.detach()
    method.attach(vlm)                                                # re-attaching keeps the weights
    method.set_edits(edits)
    assert torch.equal(logits(vlm, batch), out)
    method.detach()
    again = Method(Params(seed=7))                                    # other init, overwritten by the load
    again.load_state_dict(state)                                      # before attach: applied on attach
    again.attach(vlm)
    try:
        again.set_edits(edits)
        assert torch.equal(logits(vlm, batch), out)
        assert torch.equal(vlm.generate_ids(x, [r.src for r in recs], max_new_tokens=3), ids)
        again.set_edits({})
        for k, e in edits.items():                                    # appended one at a time (the Editor's
            again.add_edits({k: e})                                   # path): the same bank, the same outputs
        assert torch.equal(logits(vlm, batch), out)
        assert all(torch.equal(again._bank[k], torch.stack([e[k] for e in edits.values()])) for k in again._bank)
        assert all(torch.equal(a, b) for a, b in zip(again.make_edit(recs[1]).values(), edits["1"].values()))
        with pytest.raises(UserError, match="do not fit"):
            again.load_state_dict({k: v for k, v in state.items() if "sentinel" not in k})
        with pytest.raises(UserError, match="does not fit"):
            again.set_edits({"bad": {**edits["1"], "c": torch.zeros(3, 5)}})
    finally:
        again.detach()
        method.attach(vlm)


def test_resuming_after_the_hooked_block_runs_it_once(vlm, method, records):
    """The training forward resumes after the hooked block: exactly the full forward. Feeding the
    block's output into it again (the reference's training forward) gives something else."""
    batch = image_batch(vlm, records[:3])
    hidden, kwargs = method._to_block(batch)
    with torch.no_grad():
        assert torch.equal(method._resume(hidden, kwargs), logits(vlm, batch))
        block = vlm.decoder_layers[method.layer]
        method._capture = None
        twice = block(hidden, **kwargs)
        twice = twice[0] if isinstance(twice, tuple) else twice
        assert not torch.allclose(method._resume(twice, kwargs), logits(vlm, batch), atol=1e-3)


def test_the_cache_keeps_pre_edit_log_probs_only_where_the_locality_loss_reads_them(vlm, records):
    """At the locality input's answer tokens alone (not every position), and it says its size first."""
    from lifelong_moe.backbones.vlm import IGNORE
    from lifelong_moe.editing.frozen_states import bytes_per_record

    m = Method(Params())
    m.attach(vlm)
    try:
        lines = []
        cache = m._frozen_cache(records[:6], chunk=4, progress=lines.append)
        for rec in cache:
            loc = rec[-1]
            answer = int((loc["labels"] != IGNORE).sum())
            assert loc["pre_loc_at"].shape == (answer, vlm.model.config.text_config.vocab_size)
            assert loc["pre_loc_pos"].tolist() == (loc["labels"][1:] != IGNORE).nonzero().flatten().tolist()
        per = sum(map(bytes_per_record, cache[:4])) / 4  # estimated from the first chunk
        assert len(lines) == 1 and f"{per / 2 ** 10:.0f} KiB per record x 6 records" in lines[0], lines
        lines.clear()
        m.params.cache_limit_gb = per * 5 / 2 ** 30  # the 6 records would not fit: no cache, said so
        assert m._frozen_cache(records[:6], chunk=4, progress=lines.append) is None
        assert "without a frozen-state cache" in lines[0] and "runs at every step" in lines[0], lines
    finally:
        m.detach()


def test_bench_meta_cache_counts_the_log_probs_at_answer_tokens_only(one_thread):
    """``bench meta_cache`` at a tiny width: 576 image tokens and LLaVA's vocabulary, the log-probs kept
    at the answer tokens are a small fraction of what every position would take."""
    from lifelong_moe.bench.meta_cache import cache_cost

    r = cache_cost(records=2, hidden=64, layers=1)
    assert r["setup"]["tokens_per_input_mean"] > 576
    assert 0 < r["pre_loc_bytes_per_record"] < r["pre_loc_bytes_per_record_at_every_position"] / 50
    states = 4 * r["setup"]["tokens_per_input_mean"] * 64 * 4  # 4 inputs x tokens x d x fp32
    assert r["cache_bytes_per_record"] >= states + r["pre_loc_bytes_per_record"]
    assert r["said_before_building"][0].startswith("meta-training cache: ")


@pytest.mark.parametrize("layer", [None, 3])  # a block follows the hooked one / the last block
def test_cached_frozen_states_give_the_losses_of_a_fresh_pass(vlm, records, layer):
    """Meta-training caches each record's frozen hooked-block states once; a batch rebuilt from the
    cache (other padding, rebuilt causal mask and rotary embeddings) gives the losses of a fresh pass."""
    import numpy as np

    m = Method(Params(layer=layer))
    m.attach(vlm)
    try:
        cache = m._frozen_cache(records[:10], chunk=4)  # chunks pad differently from the batch below
        pick = [7, 2, 9]
        fresh = m._meta_losses(m._frozen([records[i] for i in pick]), np.random.default_rng(5))
        cached = m._meta_losses(m._from_cache(cache, pick), np.random.default_rng(5))
        assert fresh.keys() == cached.keys()
        for k in fresh:
            torch.testing.assert_close(cached[k], fresh[k], rtol=1e-4, atol=1e-5)
    finally:
        m.detach()


def test_generation_applies_the_experts_at_every_cached_step(vlm, method, records):
    recs = records[:4]
    x, qs = torch.stack([r.image for r in recs]), [r.src for r in recs]
    edits = {str(i): forced(method, r, image_batch(vlm, [r]), accept=True) for i, r in enumerate(recs)}
    boost = 10.0 / method.nets.gen_c.scale  # untrained experts are small: scale them up until they change answers
    for e in edits.values():
        e["c"], e["r"] = e["c"] * boost, e["r"] * boost
    method.set_edits(edits)
    ids = vlm.generate_ids(x, qs, max_new_tokens=4)
    answers = vlm.decode(ids)
    tf = vlm.batch(x, qs, answers)                                    # the whole answer teacher-forced
    pred = logits(vlm, tf).argmax(-1)
    for i in range(len(recs)):
        pos = tf.answer_mask[i].nonzero().flatten()
        assert pred[i, pos - 1].tolist() == ids[i, :len(pos)].tolist()  # every token, EOS included
    # a cached step scores its token as the full edited forward does; the reference's first-forward-only
    # residual does not
    from lifelong_moe.backbones.vlm import VlmBatch

    prompt = vlm.batch(x[:1], qs[:1])
    token = ids[:1, :1]
    grow = lambda t, v: torch.cat([t, torch.full((1, 1), v, dtype=t.dtype)], 1)  # noqa: E731
    full = VlmBatch(grow(prompt.input_ids, token.item()), grow(prompt.attention_mask, 1), prompt.pixel_values,
                    grow(prompt.labels, token.item()), grow(prompt.image_mask, False), grow(prompt.prompt_mask, False),
                    grow(prompt.answer_mask, True))
    want = logits(vlm, full)[0, -1]
    for every in (True, False):
        method.params.every_generation_step = every
        with torch.no_grad(), vlm.running(prompt):
            first = vlm.model(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                              pixel_values=prompt.pixel_values, use_cache=True)
            step = vlm.model(input_ids=token, attention_mask=full.attention_mask,
                             past_key_values=first.past_key_values, use_cache=True).logits[0, -1]
        assert torch.allclose(step, want, atol=1e-4) == every
    method.params.every_generation_step = True
    method.set_edits({})
    assert not torch.equal(vlm.generate_ids(x, qs, max_new_tokens=4), ids)  # the edits do change answers


def test_bad_input_is_one_clear_error(vlm, records):
    with pytest.raises(UserError, match="liveedit.layer: 9"):
        Method(Params(layer=9)).attach(vlm)
    m = Method(Params())
    m.attach(vlm)
    try:
        rec = records[0]
        with pytest.raises(UserError, match="needs an image"):
            m.make_edit(type(rec)(src=rec.src, alt=rec.alt))
        with pytest.raises(UserError, match="batch_size"):
            m.fit(records[:3])
    finally:
        m.detach()
    with pytest.raises(Exception, match="extra|unknown|not permitted|rank"):
        Params(rank=0)


# ----------------------------------------------------------------------------- synthetic edits
def test_synthetic_edit_records_are_mmedit_shaped_deterministic_and_split(vlm):
    train, test = edit_records("train", 30, seed=1), edit_records("test", 30, seed=1)
    again = edit_records("test", 30, seed=1)
    assert [(r.src, r.alt, r.loc) for r in test] == [(r.src, r.alt, r.loc) for r in again]
    assert all(torch.equal(a.image, b.image) and torch.equal(a.m_loc, b.m_loc) for a, b in zip(test, again))
    assert {tuple(r.meta["scene"]) for r in train}.isdisjoint(tuple(r.meta["scene"]) for r in test)
    assert (tuple(vlm.mean), tuple(vlm.std)) == (IMAGE_MEAN, IMAGE_STD)  # the processor's normalisation
    from lifelong_moe.streams.vqa_synthetic import answer_space

    for r in train + test:
        assert r.image.shape == r.image_rephrase.shape == r.m_loc.shape == (3, vlm.image_size, vlm.image_size)
        assert r.alt != r.pred and {r.alt, r.pred} <= set(answer_space(r.meta["question_type"]))
        assert r.rephrase != r.src and not torch.equal(r.image, r.image_rephrase)
        assert r.loc and r.loc_ans and r.m_loc_q and r.m_loc_a
    # the backbone knows much of what is edited (so an edit overwrites knowledge), and never the alt
    x = torch.stack([r.image for r in test])
    answers = vlm.generate(x, [r.src for r in test], max_new_tokens=3)
    assert sum(a == r.pred for a, r in zip(answers, test)) >= 0.5 * len(test)
    with pytest.raises(UserError, match="split"):
        edit_records("val", 3)


# ----------------------------------------------------------------------------- meta-training (slow)
@torch.no_grad()
def scores(vlm, recs):
    """Teacher-forced token accuracy (answer tokens and EOS) of the edit's target on each input kind,
    and the image-loc / text-loc argmax predictions (for agreement with the pre-edit model)."""
    def tf(images, qs, answers):
        return vlm.token_accuracy(vlm.batch(images, qs, answers)).mean().item()

    alts = [r.alt for r in recs]
    out = {"rel": tf(torch.stack([r.image for r in recs]), [r.src for r in recs], alts),
           "text_gen": tf(torch.stack([r.image for r in recs]), [r.rephrase for r in recs], alts),
           "image_gen": tf(torch.stack([r.image_rephrase for r in recs]), [r.src for r in recs], alts)}
    m_loc = vlm.batch(torch.stack([r.m_loc for r in recs]), [r.m_loc_q for r in recs], [r.m_loc_a for r in recs])
    t_loc = vlm.batch(None, [r.loc for r in recs], [r.loc_ans for r in recs])
    return out, [(b, vlm.logits(b).argmax(-1)) for b in (m_loc, t_loc)]


def agreement(batch, pre, post) -> float:
    on = batch.answer_mask[:, 1:]
    return ((pre[:, :-1] == post[:, :-1]) & on).sum().item() / on.sum().item()


STEPS, LR = 600, 1e-3
# measured at seed 0 on a backbone pretrained from an empty cache (as in CI), width-matched
# lora_scale: +0.115 / +0.105 / +0.095 token accuracy, image locality 0.975, 10 of 40 answers exactly
# the new target (0 before) (docs/liveedit.md). About half of each gain as margin.
MARGIN = {"rel": 0.06, "text_gen": 0.05, "image_gen": 0.05}
MIN_IMAGE_LOCALITY, MIN_NEW_EXACT = 0.9, 5


@pytest.mark.slow
def test_meta_trained_liveedit_edits_generalises_and_keeps_locality_over_100_edits(vlm):
    """Meta-train on the synthetic train split, then 100 sequential edits of held-out scenes: the
    edits hold (reliability, text and image generality above the unedited model, and greedy answers
    become the new target) while image locality stays high and text locality exact. About 40 s on a
    quiet machine (75 s under load)."""
    train, test = edit_records("train", 600, seed=0), edit_records("test", 100, seed=0)
    x, qs = torch.stack([r.image for r in test[:40]]), [r.src for r in test[:40]]

    def exact(answers):
        return sum(a == r.alt for a, r in zip(answers, test))

    m = Method(Params(steps=STEPS, lr=LR, lora_scale="width_matched"))
    m.attach(vlm)
    try:
        stats = m.fit(train, seed=0)
        assert stats["final_losses"]["rel"] < 1.0
        before, pre = scores(vlm, test)
        before_exact = exact(vlm.generate(x, qs, max_new_tokens=4))
        store = {}
        for i, r in enumerate(test):  # sequential: the store grows one edit at a time
            store[str(i)] = m.make_edit(r)
            m.set_edits(store)
        after, post = scores(vlm, test)
        m_loc = agreement(post[0][0], pre[0][1], post[0][1])
        after_exact = exact(vlm.generate(x, qs, max_new_tokens=4))
        print("before", before, before_exact, "after", after, after_exact, "image locality", m_loc, "fit", stats)
        for k in ("rel", "text_gen", "image_gen"):
            assert after[k] >= before[k] + MARGIN[k], (k, before[k], after[k])
        assert m_loc >= MIN_IMAGE_LOCALITY, m_loc
        assert agreement(post[1][0], pre[1][1], post[1][1]) == 1.0  # text-only: bypassed
        assert after_exact >= before_exact + MIN_NEW_EXACT
    finally:
        m.detach()
