"""Edit metrics on a hand-made stand-in VLM whose beliefs are a table: exact token accuracies and
exact matches, locality measured against the cached pre-edit outputs (not the ground truth), records
without a field left out of that metric, and the window a chunk scores."""
from types import SimpleNamespace

import torch

from lifelong_moe.editing import EditRecord
from lifelong_moe.editing import metrics as M
from lifelong_moe.backbones.vlm import IGNORE

WORDS = ["<pad>", "</s>", "q1", "q2", "q3", "loc", "dark", "red", "blue", "green", "top", "left"]
ID = {w: i for i, w in enumerate(WORDS)}
EOS = ID["</s>"]


class TableVLM:
    """``beliefs[(has image, question)]`` is what the model answers; teacher forcing predicts those tokens
    (then EOS) at the answer positions, generation returns them."""

    def __init__(self, beliefs):
        self.beliefs = dict(beliefs)

    def _believed(self, image, q):
        return self.beliefs[(image is not None, q)].split()

    def batch(self, pixels, questions, answers=None, padding_side="right"):
        rows = [[ID[w] for w in q.split()] + [ID[w] for w in a.split()] + [EOS] for q, a in zip(questions, answers)]
        L = max(map(len, rows))
        labels = torch.full((len(rows), L), IGNORE)
        ids = torch.zeros((len(rows), L), dtype=torch.long)
        for i, (r, q) in enumerate(zip(rows, questions)):
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, len(q.split()):len(r)] = torch.tensor(r[len(q.split()):])
        return SimpleNamespace(labels=labels, ids=ids, pixels=pixels, questions=list(questions))

    def logits(self, batch):
        out = torch.zeros(*batch.ids.shape, len(WORDS))
        for i, q in enumerate(batch.questions):
            image = None if batch.pixels is None else batch.pixels[i]
            said = [ID[w] for w in self._believed(image, q)] + [EOS] * batch.ids.shape[1]
            start = len(q.split()) - 1
            for k in range(batch.ids.shape[1] - start):
                out[i, start + k, said[k]] = 1.0
        return out

    def generate(self, pixels, questions, max_new_tokens=8):
        return [" ".join(self._believed(None if pixels is None else pixels[i], q)) for i, q in enumerate(questions)]


IMG = torch.zeros(3, 2, 2)


def records():
    return [EditRecord(src="q1", alt="dark blue", image=IMG, rephrase="q2", image_rephrase=IMG, loc="loc",
                       loc_ans="green", m_loc=IMG, m_loc_q="q3", m_loc_a="top left"),
            EditRecord(src="q2", alt="red", image=IMG)]  # no rephrase, no locality fields


def test_token_accuracy_exact_match_and_locality_against_the_pre_edit_outputs():
    vlm = TableVLM({(True, "q1"): "dark red", (True, "q2"): "green", (False, "loc"): "blue",
                    (True, "q3"): "top top"})
    vlm._lmoe_text_only = True
    recs = records()
    pre = M.cache_pre_edit(vlm, recs)
    assert pre.texts == {"text_locality": {0: "blue"}, "image_locality": {0: "top top"}}
    # "the edit": q1 now gets "dark blue"; q2 is still wrong; q3's answer drifts in its second token
    vlm.beliefs.update({(True, "q1"): "dark blue", (True, "q3"): "top left"})
    s = M.score(vlm, recs, pre)
    assert s["reliability"]["per_record"] == [1.0, 0.0] and s["reliability"]["exact_match"] == 0.5
    assert s["text_generality"]["n"] == 1 and s["text_generality"]["token_acc"] == 0.0  # q2 -> "green" vs "dark blue"
    assert s["image_generality"]["token_acc"] == 1.0 and s["image_generality"]["exact_match"] == 1.0
    # locality: the reference is the pre-edit output ("blue"; "top top"), not loc_ans / m_loc_a
    assert s["text_locality"]["token_acc"] == 1.0 and s["text_locality"]["exact_match"] == 1.0
    assert s["image_locality"]["token_acc"] == 0.5 and s["image_locality"]["exact_match"] == 0.0
    flat = M.summary(s)
    assert flat["reliability.token_acc"] == 0.5 and flat["image_locality.exact_match"] == 0.0


def test_without_a_text_only_path_text_locality_is_left_out():
    vlm = TableVLM({(True, "q1"): "dark red", (True, "q2"): "green", (True, "q3"): "top left"})
    vlm._lmoe_text_only = False
    s = M.score(vlm, records(), M.cache_pre_edit(vlm, records()))
    assert s["text_locality"] == {"token_acc": None, "exact_match": None, "n": 0, "per_record": []}
    assert s["image_locality"]["token_acc"] == 1.0


def test_a_window_reindexes_the_pre_edit_cache_for_one_chunk():
    pre = M.PreEdit({"text_locality": {0: "a", 3: "b", 5: "c"}, "image_locality": {}}, {"text_locality": {4: "x"},
                                                                                         "image_locality": {}})
    w = pre.window(3, 5)
    assert w.tokens == {"text_locality": {0: "b"}, "image_locality": {}} and w.texts["text_locality"] == {1: "x"}
