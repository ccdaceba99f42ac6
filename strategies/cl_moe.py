"""CL-MoE (Huai et al., CVPR 2025): dual-router LoRA experts and dynamic momentum merging, on the frozen
VLM's language model (continual VQA). Experts, routers, prototypes and the merge are the shared
modules of ``lifelong_moe.moe``; this file is the algorithm.

Per task t (Alg. of the paper; the release's ``Train.sh``):

1. theta_{t-1} <- the experts as they stand (snapshot).
2. Train experts and instance routers on task t (answer cross-entropy, no auxiliary loss): every
   targeted linear computes ``W0 x + (alpha/r) sum_i G^I(x)_i B_i A_i Drop(x)`` (RMoE, instance level;
   dense softmax by default, the release's choice, or top-k). With ``train_projector`` (default, the
   release) the vision-language projector trains too, with the same optimizer and learning rate. The
   result is phi_t.
3. Statistics pass over task t's training data (no grad): per layer, how often each expert is in the
   top-``usage_top_k`` of the instance router; the ``task_experts`` most used define task t's
   expert set and its task gate G^T(t) (their normalised frequencies). In the same pass, frozen
   features of each input give task t's prototype, centre and radius (Sec. 4.2, Eq. 7-8): the frozen
   vision tower's output (the projector's input) mean-pooled over the image's patches, and the frozen
   word embeddings mean-pooled over the question tokens, each half L2-normalised.
4. MMoE (t > 0): theta_t = lambda_i theta_{t-1} + (1 - lambda_i) phi_t per expert, lambda_i from the
   expert's role: task t's set against task t-1's (``previous_experts: last_task``, the release's
   ``params.py``) or against the union of all earlier tasks' sets (``all_earlier``). Routers and the
   projector keep phi_t (the release merges only the experts' A and B).

At test time (``task_router: paper``) the prototypes infer each input's task t^ inside the forward
pass (hooks on the projector and on the first decoder layer: no extra pass), and every layer mixes
``beta G^I(x) + (1 - beta) G^T(t^)``; an input outside every prototype's radius uses G^I alone.
Switches (YAML ``strategy:``):

- ``task_router: paper | reference | off``: ``reference`` is the release (task gates computed from the
  statistics and recorded, no test-time mixing, no prototypes); ``off`` computes no task gates.
  ``reference`` and ``off`` give the same answers.
- ``merge: paper | reference_uniform | off``: ``paper`` uses the role -> lambda map ``lambdas``
  (default: the release's ``params.py`` values), ``reference_uniform`` lambda = 0.7 for every expert
  (what the release reduces to once its key bug is fixed), ``off`` keeps phi_t (no MMoE).
- ``previous_experts: last_task | all_earlier``: which earlier tasks' expert sets make an expert
  ``previous`` (the release: task t-1's only).
- ``train_projector: true | false`` (VLM only): train the projector with the experts (the release) or
  keep it frozen.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, field_validator
from torch.utils.data import DataLoader

from lifelong_moe.config import Strict
from lifelong_moe.errors import UserError
from lifelong_moe.moe import TaskPrototypes, expert_roles, inject_lora_experts, momentum_merge
from lifelong_moe.moe.lora_experts import task_gate, top_set
from lifelong_moe.moe.momentum import REFERENCE_LAMBDAS, ROLES, UNIFORM_LAMBDAS, snapshot
from lifelong_moe.moe.settings import CL_MOE, check_at_most_experts, check_rank_split

from .vlm_base import StrategyParams, VlmStrategy
from .vlm_lora import LLM_LINEARS


class Lambdas(Strict):
    """Momentum lambda per expert role (weight of theta_{t-1}); defaults: the release's params.py."""

    new: float = Field(REFERENCE_LAMBDAS["new"], ge=0, le=1)
    previous: float = Field(REFERENCE_LAMBDAS["previous"], ge=0, le=1)
    both: float = Field(REFERENCE_LAMBDAS["both"], ge=0, le=1)
    neither: float = Field(REFERENCE_LAMBDAS["neither"], ge=0, le=1)


class ClMoEParams(StrategyParams):
    """Family-independent CL-MoE settings (defaults: the release, ``--lora_r 32 --lora_alpha 64
    --expert_num 4``, dropout 0.05, A ~ N(0, 0.01), dense instance routing; beta 0.5; written once in
    :mod:`lifelong_moe.moe.settings`, and not MoE-Adapters' because the papers differ). The counts of
    experts and the rank split are checked when the run starts (:meth:`ClMoEMethod.setup_cl_moe`)."""

    name: Literal["cl_moe"] = "cl_moe"
    num_experts: int = Field(CL_MOE.num_experts, gt=0)
    r: int = Field(CL_MOE.r, gt=0)  # total rank, split evenly over the experts
    alpha: float = Field(CL_MOE.alpha, gt=0)  # scaling alpha / r (total r)
    dropout: float = Field(CL_MOE.dropout, ge=0, lt=1)  # on the experts' input only
    init_std: float = Field(CL_MOE.init_std, gt=0)
    top_k: Optional[int] = Field(CL_MOE.top_k, gt=0)  # instance router: None = dense softmax (release)
    task_router: Literal["paper", "reference", "off"] = "paper"
    beta: float = Field(CL_MOE.beta, ge=0, le=1)  # weight of the instance gate at test time
    usage_top_k: int = Field(2, gt=0)  # instance selections counted per token (release: top-2)
    task_experts: int = Field(2, gt=0)  # experts kept per task (task gate, merge roles)
    radius_quantile: float = Field(1.0, gt=0, le=1)  # of training distances to the centre
    prototype_rule: Literal["nearest", "normalized"] = "nearest"
    merge: Literal["paper", "reference_uniform", "off"] = "paper"
    lambdas: Lambdas = Lambdas()
    # an expert is "previous" if in task t-1's set (release, params.py:28-32) / any earlier task's set
    previous_experts: Literal["last_task", "all_earlier"] = CL_MOE.previous_experts

    @field_validator("task_router", "merge", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML reads a bare `off` as false


class Params(ClMoEParams):
    targets: list[Literal[LLM_LINEARS]] = Field(default_factory=lambda: list(LLM_LINEARS), min_length=1)
    # the release trains LLaVA's mm_projector with the experts (same AdamW group and lr, see docs)
    train_projector: bool = CL_MOE.train_projector


ROLE_CODE = {r: i for i, r in enumerate(ROLES)}


class ClMoEMethod:
    """CL-MoE's task-boundary algorithm, shared by the VLM and CLIP strategies. Families implement
    ``inject(model) -> LoRAMoE``, ``statistics_pass(dataset)`` (one no-grad pass over the task's
    training data with ``moe.state.record`` on, appending each batch's frozen features to
    ``self._feats`` when prototypes are kept) and ``layer_key(name)`` (short layer names for records)."""

    moe = None
    prototypes: TaskPrototypes | None = None

    def inject_experts(self, root, target_regex: str):
        """The release's LoRA experts (this strategy's params) on the linears of ``root`` matching
        ``target_regex``; each family's ``inject`` picks the root and the targets."""
        p = self.params
        return inject_lora_experts(root, target_regex, num_experts=p.num_experts, r=p.r, alpha=p.alpha,
                                   dropout=p.dropout, top_k=p.top_k, init_std=p.init_std, beta=p.beta)

    # ---------------------------------------------------------------- setup
    def setup_cl_moe(self, model, feature_dim: int) -> None:
        p = self.params
        check_rank_split(p.r, p.num_experts, prefix="strategy.", error=UserError)
        check_at_most_experts(p.num_experts, {k: getattr(p, k) for k in ("top_k", "usage_top_k", "task_experts")},
                              prefix="strategy.", error=UserError)
        self.moe = self.inject(model)
        self.moe.state.beta = p.beta
        self.moe.state.record_k = p.usage_top_k
        self.prototypes = TaskPrototypes(feature_dim, p.radius_quantile, p.prototype_rule) \
            if p.task_router == "paper" else None
        self._theta_prev = None
        self._feats: list[torch.Tensor] = []
        self._eval_task: int | None = None
        self.trained_count = 0
        self.usage_log: dict[int, dict[str, torch.Tensor]] = {}  # task -> layer -> counts [E]
        self.merge_log: dict[int, dict] = {}  # task -> {"lambdas": {layer: [E]}, "roles": {layer: [E]}, "merged"}
        self.inference: dict[tuple[int, int], torch.Tensor] = {}  # (row, test task) -> counts [1 + n]

    def lambdas(self) -> dict[str, float]:
        if self.params.merge == "reference_uniform":
            return dict(UNIFORM_LAMBDAS)
        return self.params.lambdas.model_dump()

    # ---------------------------------------------------------------- task boundary
    def _before_training_exp(self, **kwargs):
        self.begin_cl_moe_task()
        super()._before_training_exp(**kwargs)  # the family's strategy (next in the MRO)

    def _after_training_exp(self, **kwargs):
        self.end_cl_moe_task(self.experience.task_info.index, self.experience.dataset)
        super()._after_training_exp(**kwargs)

    def begin_cl_moe_task(self) -> None:
        """Step 1: keep theta_{t-1}; training runs on the instance router alone."""
        self._theta_prev = snapshot(self.moe.expert_pools()) if self.params.merge != "off" else None
        self.moe.state.task_ids = None
        self.moe.state.active = True

    @torch.no_grad()
    def end_cl_moe_task(self, index: int, dataset) -> None:
        """Steps 3 and 4 after training task ``index`` on ``dataset``."""
        p, moe = self.params, self.moe
        moe.reset_usage()
        self._feats = []
        self.statistics_pass(dataset)
        usage = moe.usage()
        self.usage_log[index] = usage
        if p.task_router != "off":
            for name, m in moe.layers.items():
                m.add_task_gate(task_gate(usage[name], p.task_experts))
        if self.prototypes is not None:
            self.prototypes.add(torch.cat(self._feats))
        self._feats = []
        if p.merge != "off" and self.trained_count > 0:
            self.merge_experts(index)
        self._theta_prev = None
        self.trained_count += 1

    def merge_experts(self, index: int) -> None:
        """Step 4 (MMoE): per layer and expert, lambda from the expert's role, task ``index``'s set
        against the previous task's (``last_task``, the release's ``params.py:28-32``) or against the
        union of every earlier task's (``all_earlier``)."""
        p, lam_of = self.params, self.lambdas()
        earlier = [self.usage_log[t] for t in sorted(self.usage_log) if t < index]
        if p.previous_experts == "last_task":
            earlier = earlier[-1:]
        lambdas, roles = {}, {}
        for name, counts in self.usage_log[index].items():
            new = top_set(counts, p.task_experts)
            previous = set().union(*(top_set(u[name], p.task_experts) for u in earlier))
            roles[name] = expert_roles(new, previous, len(counts))
            lambdas[name] = torch.tensor([lam_of[r] for r in roles[name]], dtype=torch.float64)
        merged = momentum_merge(self.moe.expert_pools(), self._theta_prev, lambdas)
        self.merge_log[index] = {"lambdas": lambdas, "roles": {n: torch.tensor([ROLE_CODE[r] for r in rs])
                                                               for n, rs in roles.items()},
                                 "merged": merged}

    # ---------------------------------------------------------------- test-time task inference
    def infer_task(self, feats: torch.Tensor) -> None:
        """Prototype inference for the inputs now in the forward pass; sets every layer's task ids."""
        ids = self.prototypes.infer(feats)
        if self._eval_task is not None:
            key = (self.trained_count - 1, self._eval_task)
            n = len(self.tasks) + 1
            self.inference[key] = self.inference.get(key, torch.zeros(n, dtype=torch.long)) + \
                torch.bincount(ids + 1, minlength=n)
            self._eval_task = None  # count each test batch once
        self.moe.state.task_ids = ids.to(feats.device)

    def reduce_eval_records(self) -> None:
        """torchrun: this row's inferred-task counts summed over the ranks' test shards."""
        from lifelong_moe.runtime import distributed

        distributed.reduce_row_counts(self.inference, self.trained_count - 1, len(self.tasks), len(self.tasks) + 1,
                                      self.device)

    def mixes_tasks(self) -> bool:
        return self.prototypes is not None and len(self.prototypes) > 0 and self.moe.state.beta < 1

    # ---------------------------------------------------------------- results
    def layer_key(self, name: str) -> str:
        return name

    def switches(self) -> dict:
        p = self.params
        return {"task_router": p.task_router, "merge": p.merge, "previous_experts": p.previous_experts,
                "beta": p.beta, "top_k": p.top_k, "num_experts": p.num_experts, "r": p.r, "lambdas": self.lambdas()}

    def extra_results(self) -> dict:
        names = [t.name for t in self.tasks]
        key = self.layer_key
        p = self.params
        inference: dict = {}
        for (row, col), c in sorted(self.inference.items()):
            total = int(c.sum())
            trained = col <= row
            inference.setdefault(str(row), {})[names[col]] = {
                "accuracy": int(c[col + 1]) / max(1, total) if trained else None,
                "fallback_rate": int(c[0]) / max(1, total), "samples": total,
                "counts": {("none" if j == 0 else names[j - 1]): int(v) for j, v in enumerate(c) if v}}
        gates = {}
        if p.task_router != "off":
            for t in sorted(self.usage_log):
                gates[names[t]] = {key(n): m.task_gates[t].tolist() for n, m in self.moe.layers.items()}
        return {"cl_moe": {
            "switches": self.switches(),
            "usage": {names[t]: {key(n): v.tolist() for n, v in u.items()} for t, u in sorted(self.usage_log.items())},
            "task_gates": gates,
            "prototypes": {names[i]: s for i, s in enumerate(self.prototypes.summary())} if self.prototypes else {},
            "task_inference": inference,
            "merge": {names[t]: {"merged_tensors": m["merged"],
                                 "roles": {key(n): [ROLES[int(c)] for c in r] for n, r in m["roles"].items()},
                                 "lambdas": {key(n): v.tolist() for n, v in m["lambdas"].items()}}
                      for t, m in sorted(self.merge_log.items())},
            "params": self.parameter_counts(),
        }}

    # ---------------------------------------------------------------- state (tensors only)
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors (experts, routers) and CL-MoE's task gates, prototypes and logs."""
        return {**super().state_dict(), **self.cl_moe_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict({k: v for k, v in state.items() if not k.startswith("clmoe.")})
        self.load_cl_moe_state(state)

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        counts["experts"] = sum(m.experts.A.numel() + m.experts.B.numel() for m in self.moe.layers.values())
        counts["routers"] = sum(m.router.weight.numel() for m in self.moe.layers.values())
        return counts

    def cl_moe_state(self) -> dict[str, torch.Tensor]:
        st = {f"clmoe.gates.{n}": m.task_gates.clone() for n, m in self.moe.layers.items()}
        if self.prototypes is not None:
            st.update({f"clmoe.proto.{k}": v.clone() for k, v in self.prototypes.state_dict().items()})
        st["clmoe.trained_count"] = torch.tensor([self.trained_count])
        for t, u in self.usage_log.items():
            st.update({f"clmoe.usage.{t}.{n}": v.clone() for n, v in u.items()})
        for t, m in self.merge_log.items():
            st[f"clmoe.merged.{t}"] = torch.tensor([m["merged"]])
            st.update({f"clmoe.lambda.{t}.{n}": v.clone() for n, v in m["lambdas"].items()})
            st.update({f"clmoe.role.{t}.{n}": v.clone() for n, v in m["roles"].items()})
        st.update({f"clmoe.infer.{r}.{c}": v.clone() for (r, c), v in self.inference.items()})
        return st

    def load_cl_moe_state(self, state: dict[str, torch.Tensor]) -> None:
        for n, m in self.moe.layers.items():
            m.task_gates, m._mix_key = state[f"clmoe.gates.{n}"].clone().to(m.task_gates.device), None
        if self.prototypes is not None:
            self.prototypes.load_state_dict({k[len("clmoe.proto."):]: v for k, v in state.items()
                                             if k.startswith("clmoe.proto.")})
        self.trained_count = int(state["clmoe.trained_count"][0])
        self.usage_log, self.merge_log, self.inference = {}, {}, {}
        for k, v in state.items():
            kind, _, rest = k[len("clmoe."):].partition(".")
            if kind in ("usage", "lambda", "role"):
                t, _, n = rest.partition(".")
                if kind == "usage":
                    self.usage_log.setdefault(int(t), {})[n] = v.clone()
                else:
                    entry = self.merge_log.setdefault(int(t), {"lambdas": {}, "roles": {}, "merged": 0})
                    entry["lambdas" if kind == "lambda" else "roles"][n] = v.clone()
            elif kind == "merged":
                self.merge_log.setdefault(int(rest), {"lambdas": {}, "roles": {}})["merged"] = int(v[0])
            elif kind == "infer":
                r, c = rest.split(".")
                self.inference[(int(r), int(c))] = v.clone()


class FirstLayerProbe:
    """Frozen features of the inputs in the forward pass, for the task prototypes: the frozen vision
    tower's output (the projector's input, read by :meth:`read_vision`, a pre-hook on the projector)
    mean-pooled over each image's patches (all the rows of one image: LLaVA-NeXT's tiles, Qwen2-VL's
    flattened patches), and the first decoder layer's input (the frozen word
    embeddings) mean-pooled over the question tokens; each half L2-normalised. Both are frozen whether
    or not the projector trains. When masks are pending for a pass of matching shape, the features go
    to ``callback`` before any adapted layer runs; decoding steps (one new token) find nothing pending."""

    def __init__(self, callback, image_token_id: int, vision_dim: int, running=lambda: None):
        self.callback, self.image_token_id, self.vision_dim = callback, image_token_id, vision_dim
        self.running = running  # the VLM's running batch: masks where no call saw input_ids (BLIP-2's generate)
        self.pending: tuple[torch.Tensor, torch.Tensor] | str | None = None
        self.vision: torch.Tensor | None = None  # the projector's input [..., vision_dim] in the pending pass

    def expect(self, image_mask: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> None:
        """Pool the next pass over these token masks; without masks, over the prompt the next
        multi-token pass's ``input_ids`` / ``attention_mask`` hold (generation's prefill)."""
        self.pending = "inputs" if image_mask is None else (image_mask, text_mask)
        self.vision = None

    def read_inputs(self, module, args, kwargs):
        """Forward pre-hook on the transformers model: masks from the prompt being prefilled."""
        ids, att = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if self.pending == "inputs" and ids is not None and ids.shape[1] > 1:
            valid = att.bool() if att is not None else torch.ones_like(ids, dtype=torch.bool)
            image = (ids == self.image_token_id) & valid
            self.pending = (image, valid & ~image)
        return None

    def read_vision(self, module, args, kwargs):
        """Forward pre-hook on the projector: its input (``[images, patches, vision_dim]`` for LLaVA) is
        the frozen vision tower's output, kept until the first decoder layer pools it per question
        (generation may encode the images before the prefill's forward pass, while the masks are still
        to be read)."""
        if self.pending is not None:
            x = args[0] if args else next(iter(kwargs.values()))
            if x.shape[-1] != self.vision_dim:
                raise ValueError(f"task prototypes expect projector input [..., {self.vision_dim}], "
                                 f"got {list(x.shape)}")
            self.vision = x.detach()
        return None

    @staticmethod
    def pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, D]: the mean of ``h`` over the tokens of ``mask``, L2-normalised."""
        m = mask.to(h.device, torch.float32).unsqueeze(-1)
        return torch.nn.functional.normalize((h.float() * m).sum(1) / m.sum(1).clamp_min(1), dim=-1)

    def __call__(self, module, args, kwargs):
        if self.pending is None:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        batch = self.running() if self.pending == "inputs" else None
        if batch is not None and tuple(batch.input_ids.shape) == tuple(h.shape[:2]):
            self.pending = (batch.image_mask, batch.prompt_mask)
        if not isinstance(self.pending, tuple):
            return None
        image_mask, text_mask = self.pending
        if tuple(h.shape[:2]) != tuple(image_mask.shape):
            return None
        self.pending, vision, self.vision = None, self.vision, None
        if vision is None:  # text-only prompts: no image, a zero image half
            vision = torch.zeros(h.shape[0], self.vision_dim)
        elif vision[..., 0].numel() % h.shape[0]:
            raise ValueError(f"task prototypes take one image per question: projector input "
                             f"{list(vision.shape)} for {h.shape[0]} questions")
        else:  # each question's rows are contiguous: [B, rows, d] -> mean over rows
            vision = torch.nn.functional.normalize(vision.float().reshape(h.shape[0], -1, self.vision_dim).mean(1),
                                                   dim=-1)
        self.callback(torch.cat([vision.to(h.device), self.pool(h, text_mask)], dim=-1))
        return None


def find_projector(model) -> torch.nn.Module:
    """The VLM's vision-language projector (at its architecture adapter's path)."""
    try:
        return model.projector
    except AttributeError:
        raise UserError(f"CL-MoE: no vision-language projector at {model.adapter.projector!r} in the VLM") from None


class Strategy(ClMoEMethod, VlmStrategy):
    Params = Params
    cost_hint = 1.3  # a statistics pass per task

    def setup(self, model) -> None:
        self._net = model  # Avalanche sets self.model only after setup
        self._projector = find_projector(model)
        vision_dim = model.vision_dim
        self.setup_cl_moe(model, vision_dim + model.hidden_size)
        self._projector.requires_grad_(self.params.train_projector)  # the release trains it
        self._probe = FirstLayerProbe(self._on_features, model.image_token_id, vision_dim,
                                      lambda: model.current_batch)
        self._projector.register_forward_pre_hook(self._probe.read_vision, with_kwargs=True)
        model.decoder_layers[0].register_forward_pre_hook(self._probe, with_kwargs=True)
        model.model.register_forward_pre_hook(self._probe.read_inputs, with_kwargs=True)  # sees input_ids

    def inject(self, model):
        return self.inject_experts(model.model, model.lora_target_regex(tuple(self.params.targets)))

    def layer_key(self, name: str) -> str:
        """``model.language_model.layers.3.self_attn.q_proj`` -> ``3.q_proj``."""
        parts = name.split(".")
        i = parts.index("layers")
        return f"{parts[i + 1]}.{parts[-1]}"

    def switches(self) -> dict:
        return {**super().switches(), "train_projector": self.params.train_projector}

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        counts["projector"] = sum(p.numel() for p in self._projector.parameters() if p.requires_grad)
        return counts

    def _on_features(self, feats: torch.Tensor) -> None:
        if self.moe.state.record:
            self._feats.append(feats.cpu())
        elif self.mixes_tasks():
            self.infer_task(feats)

    # ---------------------------------------------------------------- training
    def statistics_pass(self, dataset) -> None:
        """Every training question of the task once, teacher-forced, no grad, eval mode: usage
        counted on all non-padding tokens, frozen features of image and question tokens."""
        state, was = self.moe.state, self.model.training
        self.model.eval()
        state.record, state.task_ids = True, None
        try:
            for x, idx, *_ in DataLoader(dataset, batch_size=self.cfg.evaluation.batch_size, shuffle=False):
                batch = self.qa_batch(x, [self.records[int(i)] for i in idx])
                state.token_mask = batch.attention_mask.bool()
                self._probe.expect(batch.image_mask, batch.prompt_mask)
                with self.autocast():
                    self.model.logits(batch)
        finally:
            state.record, state.token_mask, self._probe.pending = False, None, None
            self.model.train(was)

    # ---------------------------------------------------------------- inference
    @torch.no_grad()
    def answer(self, x, questions, task=None):
        """Greedy answers; with the task router, the prefill's input embeddings infer each task."""
        self.moe.state.task_ids = None
        if self.mixes_tasks():
            self._probe.expect()
            self._eval_task = task.index if task is not None else None
        try:
            return super().answer(x, questions, task)
        finally:
            self.moe.state.task_ids, self._probe.pending, self._eval_task = None, None, None

    @torch.no_grad()
    def token_accuracy(self, x, questions, answers, task=None):
        """Teacher-forced; the task is inferred from the image and question tokens only."""
        self.model.eval()
        self.moe.state.task_ids = None
        batch = self.model.batch(x.to(self.device), questions, answers)
        if self.mixes_tasks():
            self._probe.expect(batch.image_mask, batch.prompt_mask)
        try:
            with self.autocast():
                logits = self.model.logits(batch)
            return self.model.token_accuracy(batch, logits).cpu()
        finally:
            self.moe.state.task_ids, self._probe.pending = None, None
