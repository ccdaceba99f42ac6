"""CL-MoE (Huai et al., CVPR 2025) on a frozen CLIP, for the classification streams (toy MTIL), so it
sits in the same table as MoE-Adapters. The algorithm is :mod:`.cl_moe`'s, unchanged; only where the
experts go and what the frozen features are differ:

- LoRA experts with an instance router on the MLP linears (``c_fc``, ``c_proj``) of every block of
  the chosen towers (open_clip's attention reads its weights directly, so its projections cannot
  take a LoRA branch without merging into the frozen weight; see strategies/lora.py).
- Prototype features: the frozen CLIP image embedding (experts bypassed), one extra image-tower pass
  per test batch, as MoE-Adapters' DDAS features.
- Test-time task mixing applies to the image tower (one task per image); the class prompts are
  encoded by the text tower with its instance routers alone (a prompt belongs to no test sample).
- Usage statistics count every token the adapted towers process (image tokens of the task's
  training images; the class prompts' tokens once per task).
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
from pydantic import Field
from torch.utils.data import DataLoader

from .base import ClipStrategy
from .cl_moe import ClMoEMethod, ClMoEParams
from .lora import target_regex


class Params(ClMoEParams):
    towers: list[Literal["image", "text"]] = Field(default_factory=lambda: ["image", "text"], min_length=1)
    targets: list[Literal["c_fc", "c_proj"]] = Field(default_factory=lambda: ["c_fc", "c_proj"], min_length=1)


class Strategy(ClMoEMethod, ClipStrategy):
    Params = Params
    cost_hint = 1.5  # statistics pass, frozen image pass at test

    def setup(self, model) -> None:
        self._net = model  # Avalanche sets self.model only after setup
        probe = torch.zeros(1, 3, model.image_size, model.image_size)
        with torch.no_grad():
            dim = model.encode_image(probe).shape[1]
        self.setup_cl_moe(model, dim)
        model.clear_text_cache()

    def inject(self, model):
        return self.inject_experts(model.clip, target_regex(self.params.towers, self.params.targets))

    def layer_key(self, name: str) -> str:
        """``visual.transformer.resblocks.3.mlp.c_fc`` -> ``image.3.c_fc`` (``text.`` for the text tower)."""
        parts = name.split(".")
        i = parts.index("resblocks")
        return f"{'image' if parts[0] == 'visual' else 'text'}.{parts[i + 1]}.{parts[-1]}"

    @contextlib.contextmanager
    def _bypass(self):
        st = self.moe.state
        st.active = False
        try:
            yield
        finally:
            st.active = True

    @torch.no_grad()
    def frozen_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's normalised image embedding (experts bypassed), computed in the run's
        precision, returned in fp32 (the prototypes' distances are thresholded)."""
        with self._bypass(), self.autocast():
            return self._net.encode_image(x).float()

    # ---------------------------------------------------------------- training
    def end_cl_moe_task(self, index: int, dataset) -> None:
        super().end_cl_moe_task(index, dataset)
        self.model.clear_text_cache()  # the merge changed the experts

    def statistics_pass(self, dataset) -> None:
        state, was = self.moe.state, self.model.training
        self.model.eval()
        self.model.clear_text_cache()
        state.record, state.task_ids = True, None
        try:
            for x, *_ in DataLoader(dataset, batch_size=self.cfg.evaluation.batch_size, shuffle=False):
                x = x.to(self.device)
                if self.prototypes is not None:
                    self._feats.append(self.frozen_features(x).cpu())
                with self.autocast():
                    self.model(x, self.head)
        finally:
            state.record = False
            self.model.clear_text_cache()
            self.model.train(was)

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor, task, classes) -> torch.Tensor:
        self.model.eval()
        x = x.to(self.device)
        head = self.head_for(task, classes, self.cfg.evaluation.prompt)
        st = self.moe.state
        st.task_ids = None
        with self.autocast():
            text = self.model.text_features(head)  # instance routers only
        if self.mixes_tasks():
            self._eval_task = task.index
            self.infer_task(self.frozen_features(x))
        try:
            with self.autocast():
                return self.model.logit_scale * self.model.encode_image(x) @ text.t()
        finally:
            st.task_ids, self._eval_task = None, None
