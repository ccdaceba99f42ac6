"""Hand-made MMEdit records over the synthetic world for the editing tests (the tiny VLM's
vocabulary): a colour question about a scene with a counterfactual colour as the edit, a re-phrased
question, the scene rendered again, a text-only question and a location question on another scene."""
from __future__ import annotations

import numpy as np
import torch

from lifelong_moe.editing import EditRecord
from lifelong_moe.streams.synthetic_render import render
from lifelong_moe.streams.vqa_synthetic import answer_space, make_questions, sample_for

# A tiny `lifelong-moe edit` config over write_record_file(<data>, 12); fill {data} with str.format.
TINY_EDIT_CONFIG = """
name: tiny_edit
backbone: {{name: lmoe-tiny-llava}}
method: {{name: retrieval, threshold: 0.999}}
data: {{source: json, eval_path: {data}/eval.json, eval: 12}}
evaluation: {{edit_counts: [1, 4, 8], max_chunks: 2, matrix_chunks: 4, max_new_tokens: 3}}
runtime: {{device: cpu, threads: 1}}
"""


LOC_QUESTIONS = [("how many corners does a triangle have ?", "three"), ("is there a red object ?", "no")]


def pixels(vlm, images: np.ndarray) -> torch.Tensor:
    """uint8 ``[n, 3, 32, 32]`` -> the VLM's normalised pixel values."""
    x = torch.as_tensor(images).float() / 255.0
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (vlm.mean, vlm.std))
    return (x - mean) / std


def world_records(vlm, n: int, seed: int = 0, text_loc: bool = False) -> list[EditRecord]:
    rng = np.random.default_rng(seed)
    scenes = sample_for("color", n, rng)
    img = pixels(vlm, render(scenes, rng, glyph_split="test"))
    img2 = pixels(vlm, render(scenes, rng, glyph_split="test"))
    q, truth = make_questions(scenes, "color", rng)
    q2, _ = make_questions(scenes, "color", rng)
    loc_scenes = sample_for("location", n, rng)
    loc_img = pixels(vlm, render(loc_scenes, rng, glyph_split="test"))
    lq, la = make_questions(loc_scenes, "location", rng)
    colors = answer_space("color")
    out = []
    for i in range(n):
        alt = colors[(colors.index(truth[i]) + 1 + int(rng.integers(len(colors) - 1))) % len(colors)]
        tq, ta = LOC_QUESTIONS[i % len(LOC_QUESTIONS)] if text_loc else ("", "")
        out.append(EditRecord(src=q[i], alt=alt, image=img[i], pred=truth[i], rephrase=q2[i], image_rephrase=img2[i],
                              loc=tq, loc_ans=ta, m_loc=loc_img[i], m_loc_q=lq[i], m_loc_a=la[i]))
    return out


def write_record_file(root, n: int, seed: int = 0, name: str = "eval.json") -> list[dict]:
    """An E-VQA-style JSON file of ``n`` records with PNG images under ``root/images`` (paths relative
    to ``root``, as EasyEdit's files name COCO images under an image root); returns the records."""
    import json
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = sample_for("color", n, rng)
    imgs, imgs2 = render(scenes, rng, glyph_split="test"), render(scenes, rng, glyph_split="test")
    q, truth = make_questions(scenes, "color", rng)
    q2, _ = make_questions(scenes, "color", rng)
    loc_scenes = sample_for("location", n, rng)
    loc_imgs = render(loc_scenes, rng, glyph_split="test")
    lq, la = make_questions(loc_scenes, "location", rng)
    colors = answer_space("color")
    records = []
    for i in range(n):
        paths = []
        for kind, arr in (("img", imgs), ("rephrase", imgs2), ("loc", loc_imgs)):
            rel = f"images/{kind}_{seed}_{i}.png"
            Image.fromarray(np.ascontiguousarray(arr[i].transpose(1, 2, 0))).save(root / rel)
            paths.append(rel)
        alt = colors[(colors.index(truth[i]) + 1 + i) % len(colors)]
        records.append({"src": q[i], "pred": truth[i], "rephrase": q2[i], "alt": alt, "image": paths[0],
                        "image_rephrase": paths[1], "loc": "", "loc_ans": "", "m_loc": paths[2], "m_loc_q": lq[i],
                        "m_loc_a": la[i]})
    (root / name).write_text(json.dumps(records))
    return records
