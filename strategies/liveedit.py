"""LiveEdit (Chen et al., "Lifelong Knowledge Editing for Vision Language Models with Low-Rank
Mixture-of-Experts", CVPR 2025; official code ``qizhou000/LiveEdit``): lifelong knowledge editing of
a frozen VLM by generated low-rank experts, a vision-sentinel hard filter and soft text routing.

- A forward hook on one decoder block (``layer``, default the block at 2/3 of the depth, the
  reference's 21 of 32) adds ``sum_m w_m * ReLU(LN(h) C_m^T) R_m`` to its output at every position; the backbone never
  changes, and with no edit stored (or none routed) the block's output is returned untouched.
- An edit is one frozen pass to that block on the edit (image, prompt + target), then two generators
  (learned-query cross-attention over the vision, prompt and answer spans) give ``C, R [rank, d]`` and
  the edit-side extractor the routing keys psi (text) and phi (text-conditioned visual).
- Routing of an input (its own pass to the block; input-side extractor): keep expert m iff
  ``sim(phi_in, phi_m) > sim(phi_in, phi_sentinel)`` (the learned pseudo-image under the same
  question), then ``w = softmax(s) * sigmoid(s)`` over the kept experts with ``s = sim(psi_in, psi_m)``.
  Inputs without an image bypass the experts. The store is one stacked bank built in
  :meth:`Method.set_edits`; routing is one batched similarity against all of it.
- Generation: routing is decided on the prompt pass and reused on every cached step, so the
  residual applies to every generated token (the reference applies it on the first forward only).
- :meth:`Method.fit` meta-trains generators, extractors and the residual's LayerNorm on train
  records with the reference's losses and expert masks (``liveedit.py:251-465``), resuming the
  frozen backbone *after* the hooked block (the reference runs that block twice in training).
  The Editor refuses to edit until the method is fitted or has loaded fitted weights (``fitted``;
  :mod:`lifelong_moe.editing.fitted`, ``lifelong-moe fit liveedit``).
See ``docs/liveedit.md`` for every deviation from the reference."""
from __future__ import annotations

import time
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from lifelong_moe.config import Strict
from lifelong_moe.editing import frozen_states
from lifelong_moe.editing.bank import EditBank
from lifelong_moe.editing.liveedit_modules import (FeatureExtractor, LowRankGenerator, apply_experts,
                                                   expert_residual, gather_experts, paired_similarity,
                                                   slot_similarity, soft_weights)
from lifelong_moe.editing.types import EditRecord
from lifelong_moe.errors import UserError
from lifelong_moe.backbones.vlm import IGNORE

__all__ = ["Params", "Method", "default_layer", "width_matched_lora_scale"]

EDIT_KEYS = ("c", "r", "text_key", "vision_key")
# the settings that determine the fitted weights (architecture and meta-training): the key of a fitted
# artefact (lifelong_moe/editing/fitted.py); the others act at edit / answer time only
WEIGHT_KEYS = ("layer", "rank", "module_dim", "heads", "slots", "lora_scale", "steps", "lr", "lr_cut_steps",
               "batch_size", "seed")


REFERENCE_WIDTH, REFERENCE_LORA_SCALE = 4096, 5.0


class Params(Strict):
    """LiveEdit's settings. The reference's sizes (``configs/liveedit/*.yaml``) are for 7B models
    (d_m 1024, 8 heads); the defaults here suit the tiny VLM (d 128)."""

    layer: int | None = Field(None, description="hooked decoder block; None = the block at 2/3 of the depth "
                              "(ceil(2 depth / 3) - 1: 21 of 32 as the reference, 2 of 4)")
    rank: int = Field(4, ge=1, description="rank r of each expert (C, R in R^{r x d})")
    module_dim: int = Field(64, ge=1, description="width d_m of queries and routing features")
    heads: int = Field(4, ge=1, description="attention heads of generators and extractors")
    slots: int = Field(4, ge=1, description="learned query slots of the routing features (eqe_n)")
    lora_scale: float | Literal["width_matched"] = Field(
        REFERENCE_LORA_SCALE, description="generated experts are scaled by 1/(lora_scale*sqrt(r)); 5 as the reference "
        "(scale 0.1); 'width_matched' = 5 sqrt(d / 4096), the reference's residual size relative to the hidden "
        "state at any width (0.88 for the tiny VLM)")
    steps: int = Field(1000, ge=0, description="meta-training steps")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of meta-training")
    lr_cut_steps: list[int] = Field(default_factory=list, description="steps after which lr is multiplied by 0.1")
    batch_size: int = Field(8, ge=2, description="edits per meta-training batch")
    hard_filter: bool = Field(True, description="vision-sentinel hard filter (False: every expert passes)")
    max_experts: int | None = Field(8, ge=1, description="keep at most this many experts per input (the "
                                    "largest soft weights among those passing the filter): a cost bound, "
                                    "not in the paper; None = all that pass, as the reference")
    every_generation_step: bool = Field(True, description="apply the residual on every cached generation "
                                        "step (False: the reference's first forward only)")
    cache_train_states: bool = Field(True, description="run the frozen backbone once per train record and keep "
                                     "its hooked-block states (memory: records x 4 x length x d floats, printed "
                                     "before it starts); False reruns it every step (large backbones)")
    cache_limit_gb: float = Field(4.0, gt=0, description="largest frozen-state cache meta-training keeps (GiB, "
                                  "estimated from the first records); a larger one is not built and the frozen "
                                  "backbone reruns every step")
    seed: int = Field(0, description="initialisation of the trainable modules")
    fitted: str = Field("auto", min_length=1, description="where the Editor gets the meta-trained weights: 'auto' "
                        "(the shipped ones when fitted on this backbone with these settings; else the edit runner "
                        "meta-trains), 'none' (meta-train: Editor.fit), or the path of fitted weights "
                        "(`lifelong-moe fit liveedit`); not part of the stored config")

    @field_validator("lora_scale")
    @classmethod
    def _positive(cls, v):
        if v != "width_matched" and not v > 0:
            raise ValueError("lora_scale must be > 0 or 'width_matched'")
        return v


def width_matched_lora_scale(d: int) -> float:
    """``5 sqrt(d / 4096)``: the reference's ``lora_scale`` 5 at the hidden width of its 7B LLMs, and at
    any other width d the one that keeps the residual's size relative to the hidden state. C and R
    are attention averages of LayerNormed d-vectors (norm ~ sqrt(d)), so ``ReLU(LN(h) C^T) R`` grows
    like ``d^1.5 s^2`` against ``|h| ~ sqrt(d)``; equal ``d s^2`` means ``s ~ 1 / sqrt(d)``. 0.88 for
    the tiny VLM (d = 128): its experts get scale 0.57 instead of 0.1 (``lora_scale: width_matched``;
    docs/liveedit.md, measured)."""
    return REFERENCE_LORA_SCALE * (d / REFERENCE_WIDTH) ** 0.5


def default_layer(depth: int) -> int:
    """Index of the block at 2/3 of the depth, ceil(2 depth / 3) - 1: 21 of 32 as the reference hooks
    for its three 32-layer LLMs (``configs/liveedit/*.yaml``: ``edit_layer_i: 21``), 2 of 4 for the tiny
    VLM (so one block still follows the edited one, as eleven do in the reference)."""
    return max(0, -(-2 * depth // 3) - 1)


def _progress_line(step: int, steps: int, history: list[dict], window: int, seconds: float) -> str:
    """``meta-training step 2000/40000: rel 0.41 gen 0.62 ... (140 s, about 2660 s left)``, the losses
    averaged over the last ``window`` steps."""
    recent = history[-window:]
    losses = " ".join(f"{k} {np.mean([h[k] for h in recent]):.3g}" for k in recent[-1])
    return (f"meta-training step {step}/{steps}: {losses} ({seconds:.0f} s, "
            f"about {seconds / step * (steps - step):.0f} s left)")


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at the hooked block."""


class _Nets(nn.Module):
    def __init__(self, p: Params, d: int, n_vision: int):
        super().__init__()
        self.edit_extractor = FeatureExtractor(d, p.module_dim, p.slots, p.heads)
        self.input_extractor = FeatureExtractor(d, p.module_dim, p.slots, p.heads, sentinel_tokens=n_vision)
        scale = width_matched_lora_scale(d) if p.lora_scale == "width_matched" else p.lora_scale
        self.gen_c = LowRankGenerator(d, p.module_dim, p.rank, p.heads, scale)
        self.gen_r = LowRankGenerator(d, p.module_dim, p.rank, p.heads, scale)
        self.residual_norm = nn.LayerNorm(d)  # the reference's "instant_reps_norm"


class Method:
    """LiveEdit as an :class:`~lifelong_moe.editing.types.EditMethod`."""

    name = "liveedit"
    supports_delete = True
    needs_fit = True  # the Editor refuses to edit until fitted (fit) or given fitted weights (load_state_dict)

    def __init__(self, params: Params | None = None):
        self.params = params or Params()
        self.is_fitted = False
        self.vlm = None
        self.nets: _Nets | None = None
        self.layer: int | None = None
        self._pending_state: dict | None = None
        self._hooks: list = []
        self._bank: dict[str, torch.Tensor] | None = None  # views of the stored rows of _edits (None: empty)
        self._edits: EditBank | None = None
        self._capture: dict | None = None   # set while a pass stops at the hooked block
        self._step: dict = {}               # the current model call: ids, attention, cached step or not
        self._route = None                  # the last prompt pass's gathered experts (C, w R: [B, K*r, d])

    # ------------------------------------------------------------------ lifecycle
    def attach(self, vlm) -> None:
        if self.vlm is not None:
            self.detach()
        layers = vlm.decoder_layers
        depth = len(layers)
        layer = default_layer(depth) if self.params.layer is None else self.params.layer
        if not 0 <= layer < depth:
            raise UserError(f"liveedit.layer: {layer} is not a decoder block of {vlm.name or 'the VLM'} "
                            f"(0..{depth - 1})")
        self.vlm, self.layer = vlm, layer
        self._edits, self._bank = EditBank(EDIT_KEYS, vlm.device), None
        d = vlm.hidden_size
        sentinel = None if self.nets is None else self.nets.input_extractor.sentinel
        if sentinel is not None and tuple(sentinel.shape[1:]) == (vlm.num_image_tokens, d):
            self.nets.to(vlm.device)  # re-attached: keep the learned weights
        else:
            self._init_nets(d, vlm.num_image_tokens, self.params.seed)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
            self._pending_state = None
        call = vlm.call_module  # the model (BLIP-2: its language model, which its generate() calls)
        self._hooks = [call.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
                       call.register_forward_hook(self._after_model_call),
                       layers[layer].register_forward_pre_hook(self._on_block_input, with_kwargs=True),
                       layers[layer].register_forward_hook(self._on_block_output)]

    def _init_nets(self, d: int, n_vision: int, seed: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.nets = _Nets(self.params, d, n_vision).to(self.vlm.device).eval()
        self.is_fitted = False

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self.vlm, self._bank, self._route = [], None, None, None

    def config(self) -> dict:
        """Params fields (what ``Editor.load`` validates and rebuilds from), ``layer`` resolved once attached;
        not ``fitted`` (where the weights came from: a store holds the weights themselves)."""
        return {"name": self.name, **self.params.model_dump(exclude={"fitted"}),
                "layer": self.params.layer if self.layer is None else self.layer}

    def fitted_key(self) -> dict:
        """The settings that shape the fitted weights (:data:`WEIGHT_KEYS`, ``layer`` resolved): a fitted
        artefact is used only where they are equal."""
        c = self.config()
        return {k: c[k] for k in WEIGHT_KEYS}

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._require()
        return {k: v.detach().cpu().clone() for k, v in self.nets.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.nets is None:  # before attach: loaded when the modules exist
            self._pending_state = dict(state)
            return
        try:
            self.nets.load_state_dict(dict(state), strict=True)
        except RuntimeError as e:
            raise UserError(f"liveedit: saved weights do not fit this configuration or backbone: "
                            f"{str(e).splitlines()[0]}") from None
        self.is_fitted = True

    def _require(self):
        if self.vlm is None:
            raise RuntimeError("liveedit: attach(vlm) first")

    # ------------------------------------------------------------------ hooks
    def _on_model_call(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        cached = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        self._step = {"ids": ids, "attention": kwargs.get("attention_mask"), "cached": cached}

    def _after_model_call(self, module, args, output):
        self._step = {}  # a block run outside a model call (e.g. the LLM alone) is never edited

    def _on_block_input(self, module, args, kwargs):
        if self._capture is not None:
            self._capture["kwargs"] = dict(kwargs)

    def _on_block_output(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if self._capture is not None:
            self._capture["hidden"] = hidden
            raise _Stop
        if self._bank is None or not self._step:
            return output
        if self._step.get("cached"):
            if not self.params.every_generation_step or self._route is None:
                return output
        else:
            masks = self._masks(hidden.shape[:2])
            if masks is None:
                self._route = None
                return output
            with torch.no_grad():
                weights, idx = self._sparse(self.routing_from(hidden, *masks)[1])
                self._route = gather_experts(self._bank["c"], self._bank["r"], weights, idx) if idx.shape[1] else None
        if self._route is None or self._route[0].shape[0] != hidden.shape[0]:
            return output
        with torch.no_grad():
            delta = apply_experts(self.nets.residual_norm(hidden.float()), *self._route)
        new = hidden + delta.to(hidden.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def _masks(self, shape) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(image_mask, prompt_mask)`` of the current call, or None when no row has an image.
        From the VLM's running batch when it is this call's; otherwise every attended non-image token
        counts as prompt (the reference's behaviour without ``query_range``)."""
        ids = self._step.get("ids")
        batch = getattr(self.vlm, "current_batch", None)
        if ids is None and batch is not None and tuple(batch.input_ids.shape) == tuple(shape):
            ids = batch.input_ids  # a call on embeddings (BLIP-2's language model): the running batch's ids
        if ids is None or tuple(ids.shape) != tuple(shape):
            return None
        if batch is not None and batch.input_ids.shape == ids.shape and torch.equal(batch.input_ids, ids):
            image, prompt = batch.image_mask, batch.prompt_mask
        else:
            attention = self._step.get("attention")
            valid = torch.ones_like(ids, dtype=torch.bool) if attention is None else attention.bool()
            image = valid & (ids == self.vlm.image_token_id)
            prompt = valid & ~image
        return (image, prompt) if image.any() else None

    @staticmethod
    def _sparse(weights: torch.Tensor):
        """Each row's kept experts: ``(weights [B, K], indices [B, K])`` with K the most any row keeps
        (rows with fewer padded by weight 0)."""
        k = int(weights.ne(0).sum(1).max()) if weights.numel() else 0
        w, idx = weights.topk(k, dim=1)
        return w, idx

    # ------------------------------------------------------------------ routing
    def routing_from(self, hidden: torch.Tensor, image: torch.Tensor, prompt: torch.Tensor):
        """``(keep [B, M] bool, weights [B, M])`` of inputs whose hooked-block output is ``hidden``
        against the whole bank: three batched similarities (visual, sentinel, text). Rows without an
        image keep nothing."""
        bank = self._bank
        ext = self.nets.input_extractor
        h = hidden.float()
        psi = ext.text(h, prompt)
        phi = ext.vision(h, prompt, h, image)
        if self.params.hard_filter:
            threshold = paired_similarity(phi, ext.sentinel_vision(h, prompt))
            keep = slot_similarity(phi, bank["vision_key"]) > threshold[:, None]
        else:
            keep = torch.ones(h.shape[0], bank["c"].shape[0], dtype=torch.bool, device=h.device)
        keep &= image.any(1, keepdim=True)
        scores = slot_similarity(psi, bank["text_key"])
        cap = self.params.max_experts
        if cap is not None and cap < keep.shape[1]:  # a cost bound, not in the reference: the best-scored
            top = scores.masked_fill(~keep, float("-inf")).topk(cap, dim=1).indices  # kept experts only
            keep = keep & torch.zeros_like(keep).scatter_(1, top, True)
        return keep, soft_weights(scores, keep)

    @torch.no_grad()
    def routing(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep, weights)`` ``[B, M]`` of a :class:`~lifelong_moe.backbones.vlm.VlmBatch` over the stored edits."""
        self._require()
        if self._bank is None:
            z = torch.zeros(len(batch), 0, device=self.vlm.device)
            return z.bool(), z
        hidden, _ = self._to_block(batch)
        return self.routing_from(hidden, batch.image_mask, batch.prompt_mask)

    # ------------------------------------------------------------------ edits
    def set_edits(self, edits: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Stack the stored edits into one bank (C, R ``[M, r, d]``; keys ``[M, slots, d_m]``)."""
        self._require()
        self._check_edits(edits)
        self._edits.rebuild(list(edits.values()))
        self._route, self._bank = None, self._edits.view()

    def add_edits(self, edits: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Append new edits to the bank (the Editor's path for additions: O(new), not O(store))."""
        self._require()
        self._check_edits(edits)
        self._edits.extend(list(edits.values()))
        self._route, self._bank = None, self._edits.view()

    def _check_edits(self, edits: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        want = self._edit_shapes()
        for eid, e in edits.items():
            bad = [k for k in EDIT_KEYS if k not in e or tuple(e[k].shape) != want[k]]
            if bad:
                raise UserError(f"liveedit: stored edit {eid!r} does not fit this configuration ({bad[0]}: "
                                f"expected shape {list(want[bad[0]])}); it was made with other settings or backbone")

    def _edit_shapes(self) -> dict[str, tuple[int, ...]]:
        p, d = self.params, self.nets.residual_norm.normalized_shape[0]
        return {"c": (p.rank, d), "r": (p.rank, d), "text_key": (p.slots, p.module_dim),
                "vision_key": (p.slots, p.module_dim)}

    @torch.no_grad()
    def make_edit(self, record: EditRecord) -> dict[str, torch.Tensor]:
        """One frozen pass to the hooked block on (image, src + alt), then the generators and the
        edit-side extractor: ``{"c", "r": [r, d], "text_key", "vision_key": [slots, d_m]}`` on CPU."""
        self._require()
        if record.image is None:
            raise UserError("liveedit: an edit needs an image (its visual key routes it)")
        batch = self.vlm.batch(record.image.unsqueeze(0), [record.src], [record.alt])
        hidden, _ = self._to_block(batch)
        out = self._edit_tensors(hidden.float(), batch)
        return {k: v[0].cpu() for k, v in out.items()}

    def _edit_tensors(self, h: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        span = batch.image_mask | batch.prompt_mask | batch.answer_mask
        ext = self.nets.edit_extractor
        return {"c": self.nets.gen_c(h, span), "r": self.nets.gen_r(h, span),
                "text_key": ext.text(h, batch.prompt_mask),
                "vision_key": ext.vision(h, batch.prompt_mask, h, batch.image_mask)}

    # ------------------------------------------------------------------ partial forwards
    @torch.no_grad()
    def _to_block(self, batch) -> tuple[torch.Tensor, dict]:
        """The frozen backbone up to the hooked block's output (no residual): ``(hidden, the block's
        call kwargs)`` to resume from."""
        self._capture = {}
        try:
            self.vlm.model(**self.vlm.model_inputs(batch), use_cache=False)
        except _Stop:
            pass
        finally:
            captured, self._capture = self._capture, None
        return captured["hidden"], captured["kwargs"]

    def _resume(self, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Logits from the hooked block's (edited) output: the blocks after it, the final norm and the
        LM head (so the hooked block runs once, unlike the reference's training forward)."""
        for block in self.vlm.decoder_layers[self.layer + 1:]:
            out = block(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.vlm.model.get_output_embeddings()(self.vlm.final_norm(hidden))

    # ------------------------------------------------------------------ meta-training
    def fit(self, train: Sequence[EditRecord], *, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> dict:
        """Meta-train on ``train`` (records with image, rephrase, image_rephrase and m_loc) with the
        reference's losses (``liveedit.py:354-465``): CE on reliability and generality, KL(post||pre)
        on image locality, the soft-routing relative + absolute losses and the hard-routing
        neighbour + sentinel losses, all weighted 1. Starts from freshly initialised modules (``seed``
        and ``Params.seed``), so a fit is reproducible; returns statistics. ``progress`` gets a line
        every twentieth of the steps: the mean losses since the last line and the time left."""
        self._require()
        p = self.params
        usable = [r for r in train if r.image is not None and r.image_rephrase is not None and r.m_loc is not None]
        if len(usable) < p.batch_size:
            raise UserError(f"liveedit.fit: needs at least batch_size={p.batch_size} train records with image, "
                            f"image_rephrase and m_loc; got {len(usable)}")
        self._init_nets(self.nets.residual_norm.normalized_shape[0], self.vlm.num_image_tokens, p.seed + seed)
        rng = np.random.default_rng([seed, 0x11FE])
        opt = torch.optim.Adam(self.nets.parameters(), lr=p.lr)
        bank, self._bank = self._bank, None
        start, history = time.perf_counter(), []
        try:
            # cached states are re-padded with text positions: not where the pictures move them (M-RoPE)
            cached = p.cache_train_states and self.vlm.adapter.padding_positions
            cache = self._frozen_cache(usable, progress=progress) if cached else None
            cache_seconds = time.perf_counter() - start
            self.nets.train()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for step in range(p.steps):
                    for g in opt.param_groups:
                        g["lr"] = p.lr * 0.1 ** sum(step >= s for s in p.lr_cut_steps)
                    pick = rng.choice(len(usable), p.batch_size, replace=False)
                    frozen = self._from_cache(cache, pick) if cache else self._frozen([usable[i] for i in pick])
                    losses = self._meta_losses(frozen, rng)
                    loss = sum(losses.values())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    history.append({k: float(v.detach()) for k, v in losses.items()})
                    if progress and ((step + 1) % max(1, p.steps // 20) == 0 or step + 1 == p.steps):
                        progress(_progress_line(step + 1, p.steps, history, max(1, p.steps // 20),
                                                time.perf_counter() - start - cache_seconds))
        finally:
            self.nets.eval()
            self._bank = bank
        self.is_fitted = True
        last = history[-min(20, len(history)):] if history else []
        return {"steps": p.steps, "train_records": len(usable), "seconds": round(time.perf_counter() - start, 2),
                "frozen_pass_seconds": round(cache_seconds, 2),
                "final_losses": {k: round(float(np.mean([h[k] for h in last])), 4) for k in (last[0] if last else {})}}

    # the four inputs of every train record, in this order (reference organize_batch_data)
    _KINDS = ("rel", "text_gen", "image_gen", "image_loc")

    def _frozen(self, recs: list[EditRecord]) -> dict:
        """One frozen pass to the hooked block over the records' four inputs (rows: all rel, then
        text-gen, image-gen, image-loc): hidden states, the blocks' call kwargs, spans, labels, and
        the pre-edit log-probabilities of the image-loc rows."""
        b = len(recs)
        images = torch.stack([r.image for r in recs] * 2 + [r.image_rephrase for r in recs] + [r.m_loc for r in recs])
        questions = ([r.src for r in recs] + [r.rephrase or r.src for r in recs] + [r.src for r in recs]
                     + [r.m_loc_q for r in recs])
        batch = self.vlm.batch(images, questions, [r.alt for r in recs] * 3 + [r.m_loc_a for r in recs])
        hidden, kwargs = self._to_block(batch)
        with torch.no_grad():
            pre_loc = self._resume(hidden[3 * b:], frozen_states.slice_block_kwargs(kwargs, slice(3 * b, 4 * b)))
        return {"hidden": hidden, "kwargs": kwargs, "image": batch.image_mask, "prompt": batch.prompt_mask,
                "answer": batch.answer_mask, "labels": batch.labels, "attention": batch.attention_mask,
                "pre_loc": pre_loc.float().log_softmax(-1)}

    @torch.no_grad()
    def _frozen_cache(self, recs: list[EditRecord], chunk: int = 32,
                      progress: Callable[[str], None] | None = None) -> list[list[dict]] | None:
        """The frozen pass of every record once, trimmed per record and input kind
        (``cache_train_states``; :mod:`lifelong_moe.editing.frozen_states`). Its size is estimated
        from the first ``chunk`` records and said first; None (no cache) above ``cache_limit_gb``."""
        cache = frozen_states.trim(self._frozen(recs[:chunk]))
        per = sum(map(frozen_states.bytes_per_record, cache)) / len(cache)
        total, limit = per * len(recs), self.params.cache_limit_gb * 2 ** 30
        size = f"{per / 2 ** 10:.0f} KiB per record x {len(recs)} records = {total / 2 ** 20:.1f} MiB"
        if total > limit:
            if progress:
                progress(f"meta-training without a frozen-state cache: it would take {size} (cache_limit_gb "
                         f"{self.params.cache_limit_gb:g}); the frozen backbone runs at every step")
            return None
        if progress:
            progress(f"meta-training cache: {size} (hooked-block states, spans and labels of the 4 inputs, "
                     "pre-edit log-probabilities at the locality answer's tokens)")
        return cache + [rows for i in range(chunk, len(recs), chunk)
                        for rows in frozen_states.trim(self._frozen(recs[i:i + chunk]))]

    def _from_cache(self, cache: list[list[dict]], pick) -> dict:
        """A training batch like :meth:`_frozen`'s, from cached rows."""
        return frozen_states.pad(cache, pick, self.vlm.device,
                                 lambda h, a: frozen_states.decoder_block_kwargs(self.vlm, self.layer, h, a))

    def _meta_losses(self, f: dict, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """The reference's training losses (``liveedit.py:354-465``) on one frozen batch."""
        dev = self.vlm.device
        hidden = f["hidden"]
        h = hidden.float()
        b = h.shape[0] // 4
        pre_loc = f["pre_loc"]
        rel = slice(0, b)
        # experts of each edit, and routing features (edit side: the edit and the loc item)
        span = f["image"] | f["prompt"] | f["answer"]
        c, r = self.nets.gen_c(h[rel], span[rel]), self.nets.gen_r(h[rel], span[rel])
        ee, ie = self.nets.edit_extractor, self.nets.input_extractor
        pm, im = f["prompt"], f["image"]
        psi_edit, phi_edit = ee.text(h, pm), ee.vision(h, pm, h, im)      # rows: every input as an edit
        psi_in, phi_in = ie.text(h, pm), ie.vision(h, pm, h, im)
        # expert masks that simulate a growing store (liveedit.py:279-292): own expert(s) + a random
        # prefix of the other in-batch experts; locality inputs a random prefix only
        mask = torch.zeros(4 * b, b, dtype=torch.bool)
        order = rng.permutation(b)
        for kind in range(4):
            for j in range(b):
                row = kind * b + j
                if kind < 3:
                    others = [k for k in order if k != j]
                    mask[row, others[:rng.integers(0, b)]] = True
                    mask[row, j] = True
                else:
                    mask[row, order[:rng.integers(0, b + 1)]] = True
        mask = mask.to(dev)
        weights = soft_weights(slot_similarity(psi_in, psi_edit[rel]), mask)
        delta = expert_residual(self.nets.residual_norm(h), c, r, weights)
        logits = self._resume((h + delta).to(hidden.dtype), f["kwargs"]).float()
        lg, y = logits[:, :-1], f["labels"][:, 1:]
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=IGNORE,
                             reduction="none").view(y.shape)
        on = (y != IGNORE).float()
        per_sample = (ce * on).sum(1) / on.sum(1).clamp_min(1)
        post_loc = lg[3 * b:].log_softmax(-1)
        kl = (post_loc.exp() * (post_loc - pre_loc[:, :-1])).sum(-1)
        loc_on = on[3 * b:]
        losses = {"rel": per_sample[rel].mean(), "gen": per_sample[b:2 * b].mean() + per_sample[2 * b:3 * b].mean(),
                  "loc": ((kl * loc_on).sum(1) / loc_on.sum(1).clamp_min(1)).mean()}
        # routing pairs as the reference draws them (liveedit.py:321-349). Row kinds: 0 rel, 1 text gen,
        # 2 image gen, 3 loc; "gen" is one of the two at random.
        idx = torch.arange(b, device=dev)

        def rel_or_gen(n: np.ndarray) -> np.ndarray:  # 0 -> rel, 1 -> a generality item
            return np.where(n == 0, 0, rng.integers(1, 3, b))

        def pairs(in_kind: np.ndarray, edit_kind: np.ndarray):
            return (torch.as_tensor(in_kind * b, device=dev) + idx, torch.as_tensor(edit_kind * b, device=dev) + idx)

        # neighbour pairs: input rel, gen or loc of sample j (a third each); edit side rel or gen again for a
        # rel / gen input (the two are neighbours), the same loc item for a loc input
        n1 = rng.integers(0, 3, b)
        rows, edit_rows = pairs(np.where(n1 == 2, 3, rel_or_gen(np.minimum(n1, 1))),
                                np.where(n1 == 2, 3, rel_or_gen(rng.integers(0, 2, b))))
        # soft routing (liveedit.py:424-438): relative (softmax over the batch's edits) and absolute (sigmoid,
        # one cyclic negative) text-routing losses on the neighbour pairs
        s = slot_similarity(psi_in[rows], psi_edit[edit_rows])
        losses["route_rel"] = F.cross_entropy(s, idx)
        losses["route_abs"] = -(F.logsigmoid(s[idx, idx]) + F.logsigmoid(-s[idx, (idx - 1) % b])).mean()

        def hard_routing(rows, edit_rows) -> torch.Tensor:
            """[b, b + 1] visual similarities of input j to edit k, and to j's sentinel (last column)."""
            v = slot_similarity(phi_in[rows], phi_edit[edit_rows])
            sentinel = paired_similarity(phi_in[rows], ie.sentinel_vision(h[rows], pm[rows]))
            return torch.cat([v, sentinel[:, None]], 1)

        # hard routing (liveedit.py:439-458), two softmaxes over b edits + the sentinel: on the neighbour
        # pairs the own edit must beat every other edit and the sentinel; on unrelated pairs (a rel / gen
        # input against the loc items, or a loc input against rel / gen items) the sentinel must win
        losses["hard_neighbour"] = F.cross_entropy(hard_routing(rows, edit_rows), idx)
        n = rng.integers(0, 2, b)
        rows, edit_rows = pairs(np.where(n == 0, rel_or_gen(rng.integers(0, 2, b)), 3),
                                np.where(n == 0, 3, rel_or_gen(rng.integers(0, 2, b))))
        losses["hard_sentinel"] = F.cross_entropy(hard_routing(rows, edit_rows), torch.full_like(idx, b))
        return losses
