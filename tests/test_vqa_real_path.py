"""The documented path for real users, offline: a LLaVA directory written by ``save_pretrained`` and
VQA v2 records in the VQACL partition format, run through the same runner as everything else."""
import json

import numpy as np
import pytest

from lifelong_moe.config import validate
from lifelong_moe.runs.runner import run

from test_vlm import _save_random_llava
from test_vqa_data import _human, _write_image


def _partition(root, qtype, n_train=4, n_test=3):
    """VQACL-style files for ``qtype``: ``karpathy_{train,test}_q_<type>.json`` plus COCO-named images."""
    for split, n, coco in (("train", n_train, "train2014"), ("test", n_test, "val2014")):
        records = []
        for i in range(n):
            img = f"COCO_{coco}_{1000 * (qtype == 'count') + i:012d}"
            _write_image(root / coco / f"{img}.jpg", (40 * i % 255, 90, 200), (20, 18))
            answer = ["red", "two", "yes"][i % 3]
            records.append({"img_id": img, "sent": f"What {qtype} is it {i}?", "question_type": f"what {qtype}",
                            "answers": _human(*[answer] * 7, "no", "red", "two"), "label": {answer: 1.0}})
        path = root / "Partition_Q" / f"karpathy_{split}_q_{qtype}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records))


@pytest.mark.slow
def test_saved_llava_and_vqacl_files_run_end_to_end(tmp_path):
    _save_random_llava(tmp_path / "llava")
    for qtype in ("color", "count"):
        _partition(tmp_path / "coco", qtype)
    cfg = validate({
        "name": "real", "seed": 0,
        "stream": {"kind": "vqa", "dataset": "vqacl", "root": str(tmp_path / "coco"), "question_types": ["color", "count"]},
        "backbone": {"family": "vlm", "name": str(tmp_path / "llava")},
        "strategy": {"name": "lora", "r": 2},
        "training": {"iterations": 2, "batch_size": 2},
        "evaluation": {"batch_size": 4, "max_new_tokens": 3},
    })
    out = run(cfg, tmp_path / "run", progress=False, log=lambda *_: None)
    rec = json.loads((out / "results.json").read_text())
    assert rec["status"] == "complete" and rec["stream_kind"] == "vqa"
    assert rec["metric_kind"] == "vqa_accuracy"  # ten human answers per record: VQA soft accuracy fills the matrix
    assert [t["question_type"] for t in rec["tasks"]] == ["color", "count"]
    assert [t["test_questions"] for t in rec["tasks"]] == [3, 3]
    A = np.asarray(rec["matrix"], dtype=float)
    assert A.shape == (2, 2) and np.all((A >= 0) & (A <= 1))
    am = rec["extra"]["answer_metrics"]
    assert am["primary"] == "vqa_accuracy" and np.asarray(am["matrix"]["vqa_accuracy"]).tolist() == A.tolist()
    assert set(am["matrix"]) == {"exact_match", "vqa_accuracy", "token_accuracy"}
    assert len(am["zero_shot"]["token_accuracy"]) == 2
    assert rec["metrics"]["vqacl_ap"]["value"] is not None
    assert [s["step"] for s in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2, 1, 2]
