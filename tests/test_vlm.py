"""The VLM backbone (lifelong_moe/backbones/vlm.py): tokenizer, open_clip -> transformers vision tower,
token spans, teacher forcing vs generation, freezing, loading by directory / hub id."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lifelong_moe.errors import UserError
from lifelong_moe.backbones.factory import load_vlm
from lifelong_moe.backbones.vlm import IGNORE, VisionLanguageModel

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = ["what color is the star?", "where is the object in the picture?", "how many objects are there?",
             "is there a red object?"]
ANSWERS = ["red", "top left", "two", "yes"]


@pytest.fixture(scope="module")
def tiny() -> VisionLanguageModel:
    """The shipped tiny LLaVA, randomly initialised (no pretraining)."""
    return VisionLanguageModel.from_config("lmoe-tiny-llava")


def images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_covers_the_world_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    from lifelong_moe.streams.vqa_synthetic import QUESTION_TYPES, make_questions, sample_for
    from lifelong_moe.backbones.vlm_tiny import tiny_spec, tiny_words
    from lifelong_moe.backbones.vlm_tokenizer import build_tokenizer

    tok = build_tokenizer(tiny_words(tiny_spec("lmoe-tiny-llava")))
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    rng = np.random.default_rng(0)
    texts = []
    for qtype in QUESTION_TYPES:
        q, a = make_questions(sample_for(qtype, 40, rng), qtype, rng)
        texts += q + a
    ids = tok(texts)["input_ids"]
    assert all(row[0] == tok.bos_token_id and tok.unk_token_id not in row for row in ids)
    # words and punctuation are separate tokens; decoding joins tokens with single spaces
    assert tok.convert_ids_to_tokens(tok("is the circle red?")["input_ids"]) == ["<s>", "is", "the", "circle", "red", "?"]
    assert tok("<image><image> top left")["input_ids"][1:3] == [4, 4]
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert back(texts)["input_ids"] == ids
    assert back.image_token == "<image>" and back.pad_token_id == 0 and back.eos_token_id == 2


# ----------------------------------------------------------------------------- vision tower conversion
def _open_clip_block_outputs(visual, x):
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for b in visual.transformer.resblocks]
    try:
        pooled = visual(x)
    finally:
        for h in hooks:
            h.remove()
    if not getattr(visual.transformer, "batch_first", True):
        outs = [o.transpose(0, 1) for o in outs]
    return outs, pooled


def test_converted_vision_tower_equals_open_clip():
    from transformers import CLIPVisionModel

    from lifelong_moe.backbones.clip import create_clip
    from lifelong_moe.backbones.pretrain_clip import model_config
    from lifelong_moe.backbones.vlm_tiny import clip_vision_config_of, load_open_clip_visual, open_clip_activation, tiny_spec

    torch.manual_seed(0)
    clip, *_ = create_clip("lmoe-tiny-vit", None)
    visual = clip.visual.eval()
    with torch.no_grad():  # perturb LayerNorms and biases so that a dropped weight would show
        for n, p in visual.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    act = open_clip_activation(visual)
    assert act == "gelu" == tiny_spec("lmoe-tiny-llava")["vision_config"]["hidden_act"]  # open_clip: nn.GELU, exact
    tower = CLIPVisionModel(clip_vision_config_of(model_config("lmoe-tiny-vit"), act)).eval()
    load_open_clip_visual(tower, visual)
    x = images(5, seed=1)
    with torch.no_grad():
        blocks, pooled = _open_clip_block_outputs(visual, x)
        out = tower(pixel_values=x, output_hidden_states=True)
    assert len(out.hidden_states) == len(blocks) + 1
    for mine, ref in zip(out.hidden_states[1:], blocks):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)
    # the CLIP image embedding: ln_post(CLS) @ proj on both sides
    torch.testing.assert_close(out.pooler_output @ visual.proj, pooled, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- the tiny VLM
def test_tiny_vlm_is_frozen_and_exposes_its_structure(tiny):
    import peft

    assert tiny.family == "vlm" and tiny.image_size == 32 and len(tiny.mean) == len(tiny.std) == 3
    assert all(not p.requires_grad for p in tiny.parameters())
    assert len(tiny.decoder_layers) == 4 and tiny.decoder_layers is tiny.model.model.language_model.layers
    lin = tiny.linear_modules()
    per_layer = {n.rsplit(".", 1)[1] for n in lin}
    assert per_layer == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(lin) == 7 * 4 and all(".language_model.layers." in n for n in lin)
    for target in (tiny.model, tiny):  # peft finds exactly those linears, whichever module it wraps
        cfg = peft.LoraConfig(r=2, target_modules=tiny.lora_target_regex())
        wrapped = peft.get_peft_model(_copy(target), cfg)
        names = {n for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)}
        assert len(names) == 28 and all(n.endswith(tuple(per_layer)) and "language_model" in n for n in names)
    wrapped = VisionLanguageModel(peft.get_peft_model(_copy(tiny.model), cfg), tiny.processor)
    assert len(wrapped.decoder_layers) == 4  # still found under peft, and the wrapped linears with it
    assert sum(n.endswith(".base_layer") for n in wrapped.linear_modules()) == 28
    cfg = peft.LoraConfig(r=2, target_modules=tiny.lora_target_regex(["q_proj", "v_proj"]))
    assert sum(hasattr(m, "lora_A") for m in peft.get_peft_model(_copy(tiny.model), cfg).modules()
               if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)) == 8


def _copy(module):
    import copy

    return copy.deepcopy(module)


def test_batch_spans_and_labels(tiny):
    tok = tiny.tokenizer
    b = tiny.batch(images(4), QUESTIONS, ANSWERS)
    valid = b.attention_mask.bool()
    assert not (b.image_mask & b.prompt_mask).any() and not (b.prompt_mask & b.answer_mask).any()
    assert torch.equal(b.image_mask | b.prompt_mask | b.answer_mask, valid)
    assert b.image_mask.sum(1).tolist() == [17] * 4  # 16 patches + CLS ("full" feature select)
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        n = int(valid[i].sum())
        assert valid[i, :n].all() and not valid[i, n:].any()  # right padding
        ans = b.input_ids[i][b.answer_mask[i]].tolist()
        # the answer after the prompt tokenises as the answer alone, then EOS
        assert ans == tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert torch.equal(b.labels[i][b.answer_mask[i]], b.input_ids[i][b.answer_mask[i]])
        assert (b.labels[i][~b.answer_mask[i]] == IGNORE).all()
        prompt = tok.decode(b.input_ids[i][b.prompt_mask[i]].tolist(), skip_special_tokens=True)
        assert prompt == " ".join(tok.convert_ids_to_tokens(tok(f"question: {q} answer:")["input_ids"][1:]))
    left = tiny.batch(images(4), QUESTIONS, padding_side="left")
    assert left.attention_mask[:, -1].all() and not left.answer_mask.any()
    with pytest.raises(ValueError, match="pixel_values"):
        tiny.batch(images(3), QUESTIONS)


def test_teacher_forced_scores(tiny):
    b = tiny.batch(images(4), QUESTIONS, ANSWERS)
    with torch.no_grad():
        logits = tiny.logits(b)
    assert logits.shape[:2] == b.input_ids.shape
    lp = tiny.answer_logprobs(b, logits)
    manual = []
    for i in range(4):
        pos = b.answer_mask[i].nonzero().flatten()
        manual.append(sum(logits[i, p - 1].log_softmax(-1)[b.input_ids[i, p]] for p in pos.tolist()))
    torch.testing.assert_close(lp, torch.stack(manual))
    n_tokens = b.answer_mask.sum()
    torch.testing.assert_close(tiny.answer_loss(b, logits), -lp.sum() / n_tokens)
    # token accuracy: make the argmax right on exactly the first answer token of row 0
    rigged = torch.zeros_like(logits)
    first = int(b.answer_mask[0].nonzero()[0])
    rigged[0, first - 1, b.input_ids[0, first]] = 1.0
    acc = tiny.token_accuracy(b, rigged)
    assert acc[0].item() == pytest.approx(1 / int(b.answer_mask[0].sum()))


def test_generation_is_greedy_batched_and_matches_teacher_forcing(tiny):
    x = images(4, seed=3)
    ids = tiny.generate_ids(x, QUESTIONS, max_new_tokens=3)
    for i in range(4):  # batched (left padded) == one by one (no padding)
        one = tiny.generate_ids(x[i:i + 1], QUESTIONS[i:i + 1], max_new_tokens=3)
        assert one[0].tolist() == ids[i, :one.shape[1]].tolist()
    # feeding the generated tokens back as the answer: each is the teacher-forced argmax
    answers = tiny.decode(ids)
    assert answers == tiny.generate(x, QUESTIONS, max_new_tokens=3)
    b = tiny.batch(x, QUESTIONS, answers)
    with torch.no_grad():
        pred = tiny.logits(b).argmax(-1)
    for i in range(4):
        pos = b.answer_mask[i].nonzero().flatten()[:-1]  # answer tokens without EOS
        assert pred[i, pos - 1].tolist() == ids[i, :len(pos)].tolist()
        assert pred[i, pos[0] - 1] == ids[i, 0]


# ----------------------------------------------------------------------------- loading
def test_missing_directory_and_uncached_id_are_user_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match="no-such-model"):
        VisionLanguageModel.from_config(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        VisionLanguageModel.from_config(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="lifelong-moe-tests/not-a-cached-model.*local Hugging Face cache"):
        VisionLanguageModel.from_config("lifelong-moe-tests/not-a-cached-model")
    with pytest.raises(UserError, match="did you mean 'lmoe-tiny-llava'"):
        VisionLanguageModel.from_config("lmoe-tiny-lava")
    with pytest.raises(UserError, match="pretrained"):
        VisionLanguageModel.from_config("lmoe-tiny-llava", str(missing))


def _char_llama_tokenizer():
    """A standard Llama tokenizer (BPE over "▁"-marked words) on a small character vocabulary,
    with a few whole-word merges: "▁red" and "red" are different tokens, as in real LLaVA."""
    from transformers import LlamaTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:?.,!'\n") + ["▁"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + chars)}
    merges = []
    for word in ("▁red", "▁yes", "▁no", "▁two"):
        for k in range(2, len(word) + 1):
            merges.append((word[:k - 1], word[k - 1]))
            vocab.setdefault(word[:k], len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def _save_random_llava(path):
    """What a real user has: a LlavaForConditionalGeneration + LlavaProcessor saved by save_pretrained."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _char_llama_tokenizer()
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=16, patch_size=8),
                      text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, vocab_size=len(tok),
                                              pad_token_id=tok.pad_token_id),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=4)
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    proc.save_pretrained(path)
    return tok


def test_a_saved_llava_directory_loads_and_runs(tmp_path):
    from lifelong_moe.backbones.vlm import LLAVA_15_TEMPLATE

    tok = _save_random_llava(tmp_path / "llava")
    vlm = VisionLanguageModel.from_config(str(tmp_path / "llava"))
    assert vlm.prompt_template == LLAVA_15_TEMPLATE and vlm.image_size == 16 and vlm.num_image_tokens == 4
    assert all(not p.requires_grad for p in vlm.parameters())
    qs, ans = ["What color is it?", "Is it red?"], ["red", "no"]
    x = images(2, seed=4, size=16)
    b = vlm.batch(x, qs, ans)
    assert b.image_mask.sum(1).tolist() == [4, 4]
    for i, a in enumerate(ans):  # "ASSISTANT:" + " red": the answer is the word-initial "▁red" token
        assert b.input_ids[i][b.answer_mask[i]].tolist() == [tok.convert_tokens_to_ids("▁" + a), tok.eos_token_id]
    loss = vlm.answer_loss(b)
    assert torch.isfinite(loss) and loss.item() > 0
    ids = vlm.generate_ids(x, qs, max_new_tokens=4)
    for i in range(2):
        one = vlm.generate_ids(x[i:i + 1], qs[i:i + 1], max_new_tokens=4)
        assert one[0].tolist() == ids[i, :one.shape[1]].tolist()
    with torch.no_grad():
        first = vlm.logits(b).argmax(-1)
    for i in range(2):
        start = int(b.answer_mask[i].nonzero()[0])
        assert first[i, start - 1] == ids[i, 0]
    assert all(isinstance(a, str) for a in vlm.generate(x, qs, max_new_tokens=4))
    custom = VisionLanguageModel.from_config(str(tmp_path / "llava"), prompt_template="<image> Q: {question} A:")
    assert custom.batch(x, qs).input_ids.shape[1] < b.input_ids.shape[1]
    with pytest.raises(UserError, match="prompt_template"):
        VisionLanguageModel.from_config(str(tmp_path / "llava"), prompt_template="{question}")


# ----------------------------------------------------------------------------- pretraining
def test_pretraining_batches_mix_captions_and_seen_question_types_only():
    from lifelong_moe.backbones.pretrain_vlm import VlmPretrainConfig, cache_key, make_batch_source
    from lifelong_moe.streams.vqa_synthetic import answer_space

    cfg = VlmPretrainConfig(batch_size=20, caption_share=0.25, question_types=("color", "count"))
    images_, qs, ans = make_batch_source(cfg, "describe the picture", np.random.default_rng(0))()
    assert images_.shape == (20, 3, 32, 32) and images_.dtype == np.uint8 and len(qs) == len(ans) == 20
    assert qs[:5] == ["describe the picture"] * 5 and all(a.startswith(("a ", "an ", "there", "two", "three", "four",
                                                                           "one", "some")) or a.endswith(".")
                                                          for a in ans[:5])
    allowed = set(answer_space("color")) | set(answer_space("count"))
    assert all(a in allowed for a in ans[5:]) and "describe the picture" not in qs[5:]
    again = make_batch_source(cfg, "describe the picture", np.random.default_rng(0))()
    assert np.array_equal(again[0], images_) and again[1:] == (qs, ans)
    key = cache_key(cfg, "clip-abc.safetensors")
    assert key == cache_key(VlmPretrainConfig(batch_size=20, caption_share=0.25, question_types=["color", "count"],
                                              threads=2, eval_test=3),
                            "clip-abc.safetensors")
    assert len({key, cache_key(VlmPretrainConfig(batch_size=20, question_types=("color",)), "clip-abc.safetensors"),
                cache_key(cfg, "clip-xyz.safetensors")}) == 3


def test_pretrain_options_are_validated():
    from lifelong_moe.backbones.pretrain_vlm import resolve_synthetic_vlm

    with pytest.raises(UserError, match="unknown key 'step'.*did you mean 'steps'"):
        resolve_synthetic_vlm("lmoe-tiny-llava", {"step": 3})
    with pytest.raises(UserError, match="unknown type 'colour'"):
        resolve_synthetic_vlm("lmoe-tiny-llava", {"question_types": ["colour"]})


@pytest.mark.slow
def test_pretrain_vlm_learns_caches_and_loads_like_a_user_directory(capsys):
    import json
    import math

    from safetensors.torch import load_file

    from lifelong_moe.cli import main
    from lifelong_moe.backbones.pretrain_vlm import info_path
    from lifelong_moe.streams.vqa_synthetic import QUESTION_TYPES

    small = {"steps": 30, "batch_size": 16, "warmup_steps": 5, "eval_test": 10, "eval_probe": 40, "vision_steps": 5}
    args = [f"{k}={v}" for k, v in small.items()]
    assert main(["pretrain", "vlm", *args]) == 0
    out = capsys.readouterr().out
    path = next(line.split()[1] for line in out.splitlines() if line.startswith("checkpoint:"))
    info = json.loads(info_path(path).read_text())
    assert set(info["zero_shot"]) == set(QUESTION_TYPES)
    probe = info["vision_probe"]  # every type whose answer the picture alone decides
    assert set(probe) == set(QUESTION_TYPES) - {"judge"} and all(0 <= a <= 1 for a in probe.values())
    assert info["final_loss"] < math.log(144) - 1.0  # learnt: well below a uniform guess over the vocabulary
    weights = load_file(f"{path}/model.safetensors")
    # cached: a second call finds the directory and trains nothing
    assert main(["pretrain", "vlm", *args, "-q"]) == 0
    assert capsys.readouterr().out.strip() == path
    # the config's name resolves to it, loaded through from_pretrained(<dir>) as a user's directory
    vlm = load_vlm("lmoe-tiny-llava", "synthetic", pretrain=small, progress=False)
    by_dir = VisionLanguageModel.from_config(path)
    for a, b in zip(vlm.state_dict().values(), by_dir.state_dict().values()):
        assert torch.equal(a, b)
    assert all(not p.requires_grad for p in vlm.parameters())
    assert vlm.prompt_template == "<image> question: {question} answer:"
    # the vision tower is the tiny CLIP's: trained further by stage 0 (vision_steps), then frozen under the
    # LLM (LLaVA); without stage 0 it is the CLIP's, unchanged
    from lifelong_moe.backbones.clip import create_clip
    from lifelong_moe.backbones.pretrain_clip import resolve_synthetic
    from lifelong_moe.backbones.vlm_tiny import convert_open_clip_visual

    clip, *_ = create_clip("lmoe-tiny-vit", resolve_synthetic("lmoe-tiny-vit", progress=False))
    clip_tower = convert_open_clip_visual(clip.visual)
    tower = vlm.model.model.vision_tower.state_dict()
    assert not all(torch.equal(tower[k], v) for k, v in clip_tower.items())
    plain = load_vlm("lmoe-tiny-llava", "synthetic", pretrain={**small, "steps": 3, "vision_steps": 0}, progress=False)
    tower = plain.model.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in clip_tower.items())
    # deterministic by seed: retraining (--force) writes the same weights
    assert main(["pretrain", "vlm", *args, "--force", "-q"]) == 0
    again = load_file(f"{path}/model.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)


def test_text_only_prompts_have_no_image_and_generate_as_they_teacher_force(tiny):
    """``pixel_values=None``: the template without the image token, spans still exact, the model
    runs without an image, generation (KV cache) agrees with teacher forcing."""
    tok = tiny.tokenizer
    b = tiny.batch(None, QUESTIONS, ANSWERS)
    assert b.pixel_values is None and not b.image_mask.any() and not (b.input_ids == tiny.image_token_id).any()
    assert torch.equal(b.prompt_mask | b.answer_mask, b.attention_mask.bool())
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS)):
        assert b.input_ids[i][b.prompt_mask[i]].tolist() == tok(f"question: {q} answer:")["input_ids"]
        answer = tok(a, add_special_tokens=False)["input_ids"] + [tiny.eos_token_id]
        assert b.input_ids[i][b.answer_mask[i]].tolist() == answer
    bi = tiny.batch(images(4), QUESTIONS, ANSWERS)
    with torch.no_grad():
        text, imaged = tiny.logits(b), tiny.logits(bi)
    assert not torch.allclose(text[b.answer_mask], imaged[bi.answer_mask], atol=1e-3)  # really no image
    ids = tiny.generate_ids(None, QUESTIONS, max_new_tokens=3)
    for i in range(4):  # batched (left padded) == one by one
        one = tiny.generate_ids(None, QUESTIONS[i:i + 1], max_new_tokens=3)[0]
        assert one.tolist() == ids[i, :len(one)].tolist()
    answers = tiny.decode(ids)
    tf = tiny.batch(None, QUESTIONS, answers)
    with torch.no_grad():
        pred = tiny.logits(tf).argmax(-1)
    for i in range(4):
        pos = tf.answer_mask[i].nonzero().flatten()[:-1]
        assert pred[i, pos - 1].tolist() == ids[i, :len(pos)].tolist()
