"""Evaluation on VQA streams: one row of the matrix = a strategy's answers on every question type.

Per test experience three answer metrics are computed at once (each is recorded; one fills the
matrix, ``evaluation.answer_metric``):

- ``exact_match``: the greedy answer (``generate``, KV cache) equals the reference answer after VQA v2
  answer normalisation;
- ``vqa_accuracy``: VQA soft accuracy against the human answers (min(1, #matching humans / 3),
  averaged over the 10 leave-one-out subsets as the official evaluation does; with one reference
  answer it is exact match);
- ``token_accuracy``: teacher-forced, the fraction of answer tokens the model ranks first.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..runtime import distributed
from ..config import EvaluationConfig
from .vqa_metrics import vqa_scores

ANSWER_METRICS = ("exact_match", "vqa_accuracy", "token_accuracy")
EXAMPLES = 5  # greedy answers kept per test set and row, for a look at what the model says


class VqaEvaluator:
    def __init__(self, stream, cfg: EvaluationConfig, progress: bool = True):
        self.stream, self.cfg, self.progress = stream, cfg, progress
        self.primary = cfg.answer_metric if cfg.answer_metric != "auto" else self._auto_metric(stream)
        self.metric_kind = {"exact_match": "exact_match_accuracy"}.get(self.primary, self.primary)
        self.zero_shot: dict[str, list[float]] = {}
        self.matrices: dict[str, list[list[float]]] = {m: [] for m in ANSWER_METRICS}
        self.examples: dict[str, list[dict]] = {}
        self._static: dict[tuple, dict] = {}

    @staticmethod
    def _auto_metric(stream) -> str:
        multi = any(len(r.answers) >= 10 for t in stream.tasks for r in t.test_records[:50])
        return "vqa_accuracy" if multi else "exact_match"

    def scores(self, strategy, col: int) -> dict[str, float]:
        """Every answer metric on test set ``col``; a strategy that does not train is scored once."""
        if not strategy.trains:
            key = (id(strategy), col)
            if key not in self._static:
                self._static[key] = self._scores(strategy, col)
            return self._static[key]
        return self._scores(strategy, col)

    def _scores(self, strategy, col: int) -> dict:
        task = self.stream.tasks[col]
        records = task.test_records
        data = distributed.shard(self.stream.test_stream[col].dataset)  # torchrun: this rank's part
        loader = DataLoader(data, batch_size=self.cfg.batch_size, shuffle=False)
        sums = dict.fromkeys(ANSWER_METRICS, 0.0)
        examples = []
        for x, idx, *_ in tqdm(loader, desc=f"eval {task.name}", leave=False, disable=not self.progress):
            recs = [records[int(i)] for i in idx]
            questions = [r.question for r in recs]
            preds = strategy.answer(x, questions, task)
            tok = strategy.token_accuracy(x, questions, [r.answer for r in recs], task)
            sums["token_accuracy"] += float(tok.sum())
            for p, r in zip(preds, recs):
                for k, v in vqa_scores(p, r.answer, r.answers).items():  # target; human answers
                    sums[k] += v
            examples += [{"question": r.question, "answer": r.answer, "predicted": p}
                         for p, r in zip(preds, recs)][: EXAMPLES - len(examples)]
        if distributed.active():  # the ranks' sums; the first examples in test-set order, as in one process
            keys = sorted(sums)
            sums = dict(zip(keys, distributed.sum_(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                                device=strategy.device)).tolist()))
            examples = sum(distributed.gather_json(examples, strategy.device), [])[:EXAMPLES]
        n = max(1, len(records))
        return {"metrics": {k: v / n for k, v in sums.items()}, "examples": examples}

    @torch.no_grad()
    def row(self, strategy, row: int) -> list[float]:
        out = [self.scores(strategy, j) for j in range(len(self.stream.tasks))]
        distributed.reduce_eval_records(strategy)
        for m in ANSWER_METRICS:
            values = [o["metrics"][m] for o in out]
            if row < 0:
                self.zero_shot[m] = values
            else:
                del self.matrices[m][row:]
                self.matrices[m].append(values)
        self.examples["zero_shot" if row < 0 else str(row)] = [
            {"task": t.name, "examples": o["examples"]} for t, o in zip(self.stream.tasks, out)]
        return [o["metrics"][self.primary] for o in out]

    def extra_results(self) -> dict:
        return {"answer_metrics": {"primary": self.primary, "zero_shot": self.zero_shot, "matrix": self.matrices},
                "answer_examples": self.examples}

    def restore(self, record: dict) -> None:
        """Continue the secondary matrices of a resumed run."""
        saved = (record.get("extra") or {}).get("answer_metrics") or {}
        self.zero_shot = dict(saved.get("zero_shot") or {})
        done = len(record.get("matrix") or [])
        self.matrices = {m: list((saved.get("matrix") or {}).get(m, []))[:done] for m in ANSWER_METRICS}
        self.examples = dict((record.get("extra") or {}).get("answer_examples") or {})
