"""Every architecture in the vlm family's adapter registry, offline: a tiny random model of each is
written by ``save_pretrained`` with its processor, loaded as a user's directory, checked against its
own processor (image tokens, pixel inputs), then run through every VLM strategy (one training step and
an evaluation) and the Editor (LoRA, and LiveEdit after a two-step fit)."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lifelong_moe.backbones.vlm import VisionLanguageModel
from lifelong_moe.backbones.vlm_adapters import ADAPTERS
from lifelong_moe.config import validate
from lifelong_moe.editing import EditRecord
from lifelong_moe.editing.editor import Editor
from lifelong_moe.errors import UserError
from lifelong_moe.families.vlm import FAMILY
from lifelong_moe.runs.runner import run

from test_vlm import _char_llama_tokenizer


def _tokenizer(*special):
    tok = _char_llama_tokenizer()
    tok.add_tokens(list(special), special_tokens=True)
    return tok


def _llama(tok):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       vocab_size=len(tok), pad_token_id=tok.pad_token_id)


def _clip_vision(**kw):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=16, patch_size=8, **kw)


def save_llava(path):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer()
    cfg = LlavaConfig(vision_config=_clip_vision(), text_config=_llama(tok),
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    LlavaForConditionalGeneration(cfg).save_pretrained(path)
    ip = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(path)


def save_qwen2_vl(path):
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = _tokenizer("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                     "<|video_pad|>")
    ids = tok.convert_tokens_to_ids
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(path)
    patches = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    ip = Qwen2VLImageProcessor(size={"shortest_edge": 8 * 8, "longest_edge": 16 * 16}, **patches)
    Qwen2VLProcessor(image_processor=ip, tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor(**patches)).save_pretrained(path)


GRID = [[16, 32], [32, 16], [32, 32]]


def save_llava_next(path):
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tok = _tokenizer()
    cfg = LlavaNextConfig(vision_config=_clip_vision(), text_config=_llama(tok), image_grid_pinpoints=GRID,
                          image_token_index=tok.convert_tokens_to_ids("<image>"))
    LlavaNextForConditionalGeneration(cfg).save_pretrained(path)
    ip = LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                 image_grid_pinpoints=GRID)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1).save_pretrained(path)


def save_idefics3(path):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor, Idefics3VisionConfig)

    tok = _tokenizer("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=4)
    cfg = Idefics3Config(vision_config=vision, text_config=_llama(tok), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    Idefics3ForConditionalGeneration(cfg).save_pretrained(path)
    ip = Idefics3ImageProcessor(size={"longest_edge": 16}, max_image_size={"longest_edge": 16},
                                do_image_splitting=False)
    Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4).save_pretrained(path)


def save_blip2(path):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    tok = _tokenizer()
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=16, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                 encoder_hidden_size=32, vocab_size=len(tok))
    text = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tok),
                     word_embed_proj_dim=32, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    Blip2ForConditionalGeneration(cfg).save_pretrained(path)
    Blip2Processor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tok,
                   num_query_tokens=4).save_pretrained(path)


BUILDERS = {"llava": save_llava, "qwen2_vl": save_qwen2_vl, "llava_next": save_llava_next, "idefics3": save_idefics3,
            "blip-2": save_blip2}
ARCHS = list(BUILDERS)


def test_every_registered_architecture_is_tested():
    assert set(ADAPTERS) == set(BUILDERS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Architecture -> its saved directory (written once per module, on first use)."""
    root, done = tmp_path_factory.mktemp("vlms"), {}

    def get(arch):
        if arch not in done:
            torch.manual_seed(0)
            BUILDERS[arch](root / arch)
            done[arch] = str(root / arch)
        return done[arch]
    return get


def _picture(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_like_a_user_directory_and_agrees_with_its_processor(arch, saved, one_thread):
    vlm = VisionLanguageModel.from_config(saved(arch))
    assert vlm.adapter is ADAPTERS[arch] and vlm.image_size == 16
    assert all(not p.requires_grad for p in vlm.parameters())
    assert len(vlm.decoder_layers) == 2 and vlm.linear_modules() and vlm.vision_dim == 32
    # one picture: the processor's own image tokens and model inputs, from our [3, S, S] pixels
    pic = _picture(vlm.image_size)
    ours = vlm.batch(vlm.pixels_from_image(pic).unsqueeze(0), ["what is it?"])
    blip = arch == "blip-2"  # its processor puts the query tokens before a prompt without the image token
    theirs = vlm.processor(text=[vlm.prompt("what is it?", text_only=blip)], images=[pic], return_tensors="pt")
    assert int((theirs["input_ids"] == vlm.image_token_id).sum()) == vlm.num_image_tokens == int(ours.image_mask.sum())
    if blip:  # image tokens first, before BOS where the tokenizer adds one (the test tokenizer does not)
        bos, img = vlm.tokenizer.bos_token_id, vlm.image_token_id
        assert ours.input_ids[0, :4].tolist() == [img] * 4
        assert vlm._image_first([bos] + [img] * 4 + [7]) == [img] * 4 + [bos, 7]
    else:
        assert theirs["input_ids"][0].tolist() == ours.input_ids[0].tolist()
    inputs = vlm.model_inputs(ours)
    for key in set(inputs) - {"input_ids", "attention_mask"}:
        assert torch.allclose(inputs[key].float(), theirs[key].float(), atol=1e-5), key
    # teacher forcing and greedy generation read the same prompt
    x = torch.stack([vlm.pixels_from_image(_picture(16, s)) for s in (1, 2)])
    qs = ["what colour?", "is it red?"]
    b = vlm.batch(x, qs, ["red", "no"])
    assert torch.isfinite(vlm.answer_loss(b))
    ids = vlm.generate_ids(x, qs, max_new_tokens=2)
    with torch.no_grad():
        first = vlm.logits(b).argmax(-1)
    for i in range(2):
        assert first[i, int(b.answer_mask[i].nonzero()[0]) - 1] == ids[i, 0]
    if vlm.adapter.text_only:
        assert len(vlm.generate(None, qs, max_new_tokens=2)) == 2
    else:
        with pytest.raises(ValueError, match="answers only with a picture"):
            vlm.batch(None, qs)


def test_bad_architectures_and_sizes_are_one_clear_error(saved, tmp_path, monkeypatch, one_thread):
    from transformers import CLIPVisionModel

    CLIPVisionModel(_clip_vision()).save_pretrained(tmp_path / "c")
    with pytest.raises(UserError, match="'clip_vision_model' model; the vlm family loads blip-2, idefics3, llava"):
        VisionLanguageModel.from_config(str(tmp_path / "c"))
    with pytest.raises(UserError, match="takes 16 px pictures"):
        VisionLanguageModel.from_config(saved("llava"), image_size=32)
    with pytest.raises(UserError, match="not a positive multiple of 8"):
        VisionLanguageModel.from_config(saved("qwen2_vl"), image_size=20)
    big = VisionLanguageModel.from_config(saved("qwen2_vl"), image_size=32)
    assert big.num_image_tokens == 16 and big.batch(torch.zeros(1, 3, 32, 32), ["q"]).image_mask.sum() == 16
    monkeypatch.setitem(ADAPTERS, "llava", dataclasses.replace(ADAPTERS["llava"], projector="model.mm_projector"))
    with pytest.raises(UserError, match="no projector at 'model.mm_projector'"):
        VisionLanguageModel.from_config(saved("llava"))


STRATEGIES = {"zeroshot": {}, "lora": {"r": 2}, "replay": {"r": 2, "memory_size": 4}, "lwf": {"r": 2},
              "cl_moe": {"num_experts": 2, "r": 2}}


def test_every_vlm_strategy_is_covered():
    assert set(STRATEGIES) == set(FAMILY.strategies)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("arch", ARCHS)
def test_every_strategy_trains_and_evaluates(arch, strategy, saved, tmp_path):
    cfg = validate({
        "name": "a", "seed": 0,
        "stream": {"kind": "vqa", "dataset": "synthetic_vqa", "question_types": ["color", "type"],
                   "questions_per_type": {"train": 4, "test": 2}},
        "backbone": {"family": "vlm", "name": saved(arch)},
        "strategy": {"name": strategy, **STRATEGIES[strategy]},
        "training": {"iterations": 1, "batch_size": 2, "optimizer": {"lr": 1e-2}},
        "evaluation": {"batch_size": 4, "max_new_tokens": 2},
        "runtime": {"device": "cpu", "threads": 1},
    })
    out = run(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    res = json.loads((out / "results.json").read_text())
    assert len(res["matrix"]) == 2 and all(0 <= a <= 1 for row in res["matrix"] for a in row)
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert strategy == "zeroshot" or (losses and all(np.isfinite(losses)))
    if strategy == "cl_moe":  # the frozen features reached the task prototypes while generating
        counts = [c["counts"] for c in res["extra"]["cl_moe"]["task_inference"]["1"].values()]
        assert sum(n for c in counts for t, n in c.items() if t != "none") > 0


def _records(vlm, n: int) -> list[EditRecord]:
    g = torch.Generator().manual_seed(5)
    s = vlm.image_size

    def img():
        return torch.randn(3, s, s, generator=g)
    words = ["red", "blue", "green", "round", "two", "yes"]
    return [EditRecord(src=f"what is thing {i}?", alt=words[i % len(words)], image=img(), rephrase=f"thing {i} is?",
                       image_rephrase=img(), m_loc=img(), m_loc_q="is it big?", m_loc_a="no") for i in range(n)]


@pytest.mark.parametrize("arch", ARCHS)
def test_editor_edits_and_answers(arch, saved, one_thread):
    vlm = VisionLanguageModel.from_config(saved(arch))
    recs = _records(vlm, 4)
    r = recs[0]
    lora = Editor(vlm, "lora", steps=20, lr=0.1)
    lora.edit(image=r.image, prompt=r.src, target=r.alt)
    assert lora.answer(r.image, r.src, max_new_tokens=4) == r.alt
    lora.reset()
    fresh = VisionLanguageModel.from_config(saved(arch))
    live = Editor(fresh, "liveedit", steps=2, batch_size=2, layer=0, hard_filter=False)
    live.fit(recs[1:])
    live.edit(image=r.image, prompt=r.src, target=r.alt)
    routed = []
    hook = fresh.decoder_layers[-1].register_forward_hook(lambda *_: routed.append(live.method._route is not None))
    answer = live.answer(r.image, r.src, max_new_tokens=2)
    hook.remove()
    assert isinstance(answer, str) and len(live.edits) == 1
    assert routed and all(routed)  # the edit's expert acts in the prefill and at every generation step
