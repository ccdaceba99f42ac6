"""MoE-Adapters with DDAS (Yu et al., CVPR 2024) on a frozen CLIP, both towers.

Every residual block of the chosen towers gets a pool of bottleneck experts parallel to its MLP,
fed the post-attention residual ``h``: ``x_out = h + MLP(LN_2(h)) + sum_i W_i^t E_i(h)`` with
``W^t = Softmax(TopK(R^t(c)))`` a fresh zero-initialised noisy top-k router per task (noise in
training only) and ``c`` the first token (CLS / SOT; EOT optional). After each task the ``freeze_top_k``
experts most used by it, per layer and tower, are frozen (cumulatively; they stay selectable).
Loss: cross-entropy (label smoothing from ``training.label_smoothing``) over CLIP logits with the
class prompts re-encoded by the adapted text tower at every step, plus ``aux_loss_weight`` times the
load-balancing loss (0: the reference computes and discards it).

At evaluation DDAS (``lifelong_moe.moe.ddas``) picks, per sample, a trained task's router or OOD
(the frozen zero-shot CLIP in both towers). The text head of each group of samples is the test
set's class prompts encoded with that group's router. With ``ddas.enabled: false`` the test set's
own task's router is used when trained (oracle task id), else zero-shot. See docs/moe_adapters.md.
"""
from __future__ import annotations

import contextlib
from typing import Literal, Optional, Union

import torch
from pydantic import Field, model_validator
from torch.utils.data import DataLoader, Subset

from lifelong_moe.runtime import distributed
from lifelong_moe.config import SourceSpec, Strict
from lifelong_moe.errors import UserError
from lifelong_moe.moe import inject_moe_adapters
from lifelong_moe.moe.ddas import DDAS, OOD, AlexNetFeatures, ClipFeatures, PixelFeatures, fit_autoencoder
from lifelong_moe.moe.settings import MOE_ADAPTERS, check_at_most_experts

from .base import ClipStrategy, StrategyParams

TOWERS = ("image", "text")


class ThresholdParams(Strict):
    mode: Literal["fixed", "calibrated"] = "calibrated"
    value: float = Field(0.0655, gt=0)  # fixed mode (reference full shot; few shot 0.06)
    quantile: float = Field(0.95, gt=0, le=1)  # calibrated mode: of held-out in-distribution errors
    holdout: float = Field(0.1, gt=0, lt=1)  # calibrated mode: fraction of each task's train data held out
    scope: Literal["global", "task"] = "global"  # calibrated: one tau (max over tasks) or each task its own


class DDASParams(Strict):
    enabled: bool = True
    features: Literal["clip", "alexnet", "pixels"] = "clip"
    alexnet_weights: Optional[str] = None  # local torchvision AlexNet state dict (never downloaded)
    threshold: ThresholdParams = ThresholdParams()
    decision: Literal["sample", "batch"] = "sample"  # batch: reference; assumes single-task test batches
    when: Literal["start", "end"] = "start"  # fit the task's autoencoder at the start or end of its experience
    iterations: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    lr_decay: float = Field(0.1, gt=0, le=1)
    lr_decay_epochs: int = Field(10, gt=0)
    hidden: int = Field(100, gt=0)
    feature_cache_mb: float = Field(1024, ge=0)  # cache a task's frozen AE features up to this size
    stacked: bool = False  # decide with one stacked forward of all autoencoders (same choices up to float rounding)
    # "general" images whose autoencoder routes to zero-shot (reference: TinyImageNet)
    reference_data: Union[Literal["none", "synthetic_pretrain"], SourceSpec] = "synthetic_pretrain"
    reference_samples: int = Field(1024, gt=0)  # synthetic_pretrain only
    reference_iterations: int = Field(1000, gt=0)


class Params(StrategyParams):
    name: Literal["moe_adapters"] = "moe_adapters"
    # the paper's defaults, not CL-MoE's (the papers differ): written once in lifelong_moe.moe.settings
    num_experts: int = Field(MOE_ADAPTERS.num_experts, gt=0)
    top_k: int = Field(MOE_ADAPTERS.top_k, gt=0)
    bottleneck: int = Field(MOE_ADAPTERS.bottleneck, gt=0)
    scale: float = MOE_ADAPTERS.scale
    dropout: float = Field(MOE_ADAPTERS.dropout, ge=0, lt=1)
    towers: list[Literal["image", "text"]] = Field(["image", "text"], min_length=1)
    route_token: Literal["first", "eot"] = "first"  # text tower; images always route on CLS
    noise: bool = True  # noisy gating in training (never in eval)
    aux_loss_weight: float = Field(0.0, ge=0)
    freeze_top_k: int = Field(2, ge=0)
    grow_per_task: int = Field(0, ge=0)
    router_per_task: bool = True  # false: one router shared by all tasks (CIL variant)
    ddas: DDASParams = DDASParams()

    @model_validator(mode="after")
    def _at_most_num_experts(self) -> "Params":
        # the config error names the section ("strategy: top_k=5 exceeds num_experts=4")
        check_at_most_experts(self.num_experts, {"top_k": self.top_k, "freeze_top_k": self.freeze_top_k})
        return self


def freeze_choice(usage: dict, k: int) -> dict:
    """Activate-freeze rule: per (tower, layer), the ``k`` experts with the highest usage count of
    the task just trained (ties: lower id; never-used experts are not frozen)."""
    out = {}
    for key, counts in usage.items():
        order = torch.sort(torch.as_tensor(counts), descending=True, stable=True).indices[:k]
        out[key] = sorted(int(i) for i in order if counts[i] > 0)
    return out


class Strategy(ClipStrategy):
    Params = Params
    cost_hint = 2.5  # text prompts re-encoded every step, DDAS autoencoders, per-route evaluation

    # ---------------------------------------------------------------- setup
    def setup(self, model) -> None:
        p = self.params
        self._net = model  # Avalanche sets self.model only after setup (top_k: checked by Params)
        self.moe = inject_moe_adapters(model, towers=p.towers, num_experts=p.num_experts, k=p.top_k,
                                       bottleneck=p.bottleneck, scale=p.scale, dropout=p.dropout,
                                       route_token=p.route_token)
        for m in self.moe.select():
            m.router.use_noise = p.noise
        model.clear_text_cache()
        n = len(self.tasks)
        self.task_routes = torch.full((n,), -1, dtype=torch.long)  # router of each trained task
        self.trained_count = 0
        self.usage_log: dict[int, dict] = {}  # task -> {(tower, layer): counts}
        self.frozen_log: dict[int, dict] = {}  # task -> {(tower, layer): frozen ids after it}
        self.trainable_log: dict[int, int] = {}
        self.records: dict[tuple[int, int], torch.Tensor] = {}  # (row, test task) -> counts [1 + n]
        self._text_feats: dict = {}
        self._route = 0
        self.ddas = self.extractor = None
        if p.ddas.enabled:
            self.extractor = self._make_extractor(model).to(self.device)
            probe = torch.zeros(1, 3, model.image_size, model.image_size, device=self.device)
            dim = self.extractor(probe).shape[1]
            self.ddas = DDAS(dim, p.ddas.hidden, num_tasks=n, stacked=p.ddas.stacked).to(self.device)

    def _make_extractor(self, model):
        d = self.params.ddas
        if d.features == "alexnet":
            if not d.alexnet_weights:
                raise UserError("strategy.ddas.alexnet_weights: required with features: alexnet "
                                "(a local torchvision AlexNet state dict; never downloaded)")
            try:
                return AlexNetFeatures(d.alexnet_weights)
            except (FileNotFoundError, RuntimeError) as e:
                raise UserError(f"strategy.ddas.alexnet_weights: {e}") from None
        if d.features == "pixels":
            return PixelFeatures()
        return ClipFeatures(self._frozen_image_features)

    @torch.no_grad()
    def _frozen_image_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's normalised image embedding (experts bypassed)."""
        self.moe.set_task(None, towers=("image",))
        return self._net.encode_image(x)

    # ---------------------------------------------------------------- training
    def _before_training_exp(self, **kwargs):
        task = self.experience.task_info
        p = self.params
        if p.grow_per_task and self.trained_count > 0:
            self.moe.grow(p.grow_per_task)
        if p.router_per_task or self.moe.num_tasks == 0:
            self.moe.add_task()
        self._route = self.moe.num_tasks - 1
        self.moe.reset_usage()
        self._text_feats.clear()
        if self.ddas is not None and p.ddas.when == "start":
            self._fit_ddas(task.index, self.experience.dataset)
        super()._before_training_exp(**kwargs)  # seeds, head, loader, optimiser (new router included)
        self.trainable_log[task.index] = sum(p.numel() for p in self.model.parameters() if p.requires_grad) \
            - self._frozen_shadow_numel()

    def _frozen_shadow_numel(self) -> int:
        """Elements of frozen expert rows: Parameters in storage, but never trained."""
        total = 0
        for m in self.moe.select():
            per = sum(getattr(m.experts, n)[0].numel() for n in m.experts._shapes)
            total += per * len(m.experts.frozen_ids())
        return total

    def forward(self):
        self.moe.set_task(self._route)  # eval may have left per-sample ids
        return super().forward()

    def criterion(self):
        loss = super().criterion()
        w = self.params.aux_loss_weight
        if w > 0 and self.is_training and self.target_map is not None:
            aux = self.moe.aux_loss()
            if aux is not None:
                loss = loss + w * aux
        return loss

    def _after_training_exp(self, **kwargs):
        task = self.experience.task_info
        p = self.params
        usage = self.moe.usage()
        if distributed.active():  # same counts, so the same freeze, on every rank, as in one process:
            image = distributed.sum_dict({k: v for k, v in usage.items() if k[0] == "image"}, self.device)  # shards
            text = {k: v for k, v in usage.items() if k[0] == "text"}  # every rank encodes the same prompts
            distributed.broadcast_tensors(list(text.values()))
            usage = {k: image.get(k, text.get(k)) for k in usage}
            for k, v in usage.items():
                self.moe[k].router.usage.copy_(v)
        self.usage_log[task.index] = usage
        if p.freeze_top_k:
            self.moe.freeze_experts(freeze_choice(usage, p.freeze_top_k))
        self.frozen_log[task.index] = self.moe.frozen_experts()
        self.task_routes[task.index] = self._route
        self.trained_count += 1
        self._text_feats.clear()
        if self.ddas is not None and p.ddas.when == "end":
            self._fit_ddas(task.index, self.experience.dataset)
        super()._after_training_exp(**kwargs)

    # ---------------------------------------------------------------- DDAS fitting
    @contextlib.contextmanager
    def _eval_mode(self):
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    @torch.no_grad()
    def _features(self, dataset, indices) -> torch.Tensor:
        """Frozen DDAS features of ``dataset[indices]``, extracted once (the image transform is
        deterministic, so every pass over the data would see the same features). Extracted in the
        run's precision, as at decision time; the autoencoders see them in fp32. Under torchrun each
        rank extracts a part and all ranks get every row."""
        def extract(rows: list[int]) -> torch.Tensor:
            feats = [torch.zeros(0, self.ddas.dim, device=self.device)]
            with self._eval_mode():
                for x, *_ in DataLoader(Subset(dataset, [indices[i] for i in rows]), batch_size=256):
                    with self.autocast():
                        feats.append(self.extractor(x.to(self.device)).float())
            return torch.cat(feats)

        return distributed.gather_rows(extract, len(indices), self.device)

    def _batches(self, dataset, indices, seed: int):
        """Endless shuffled batches of frozen features (a seeded permutation per epoch): extracted
        once and cached when they fit ``ddas.feature_cache_mb``, else re-extracted per batch."""
        d = self.params.ddas
        n, g = len(indices), torch.Generator().manual_seed(seed)
        if n * self.ddas.dim * 4 <= d.feature_cache_mb * 2 ** 20:
            cached = self._features(dataset, indices)
            fetch = cached.__getitem__
        else:
            fetch = lambda rows: self._features(dataset, [indices[i] for i in rows.tolist()])  # noqa: E731

        def gen():
            while True:
                for rows in torch.randperm(n, generator=g).split(d.batch_size):
                    yield fetch(rows)
        return gen(), -(-n // d.batch_size)

    def _fit(self, dataset, indices, iterations: int, seed: int):
        d = self.params.ddas
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []  # manual_seed seeds the GPU too
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            ae = self.ddas.new_autoencoder()
            batches, per_epoch = self._batches(dataset, indices, seed)
            fit_autoencoder(ae, batches, iterations=iterations, lr=d.lr, weight_decay=d.weight_decay,
                            steps_per_epoch=per_epoch, decay=d.lr_decay, decay_every=d.lr_decay_epochs)
        distributed.broadcast_module(ae)  # torchrun: rank 0's autoencoder, bit for bit, on every rank
        return ae

    def _fit_ddas(self, index: int, dataset) -> None:
        d, seed = self.params.ddas, self.cfg.seed * 1009 + 31 * index
        if self.ddas.reference is None and d.reference_data != "none":
            ref = self._reference_dataset()
            self.ddas.set_reference(self._fit(ref, list(range(len(ref))), d.reference_iterations, seed + 7))
        n = len(dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        held = []
        if d.threshold.mode == "calibrated" and n > 1:  # hold out in-distribution samples for tau
            cut = min(n - 1, max(1, round(n * d.threshold.holdout)))
            held, order = order[:cut], order[cut:]
        ae = self._fit(dataset, order, d.iterations, seed)
        self.ddas.set_task_ae(index, ae)
        if held:
            errs = torch.cat([ae.errors(self._features(dataset, chunk)).detach() for chunk in
                              (held[i:i + 1024] for i in range(0, len(held), 1024))])
            self.ddas.calibration[index] = torch.quantile(errs, d.threshold.quantile)

    def _reference_dataset(self):
        """The "general" images of the reference autoencoder (reference code: TinyImageNet)."""
        from lifelong_moe.streams.transforms import ImageTransform, prepare

        d, m = self.params.ddas, self.model
        transform = ImageTransform(m.image_size, m.mean.flatten().tolist(), m.std.flatten().tolist())
        if d.reference_data == "synthetic_pretrain":
            import numpy as np

            from lifelong_moe.streams.synthetic import caption_batch

            images, _ = caption_batch(d.reference_samples, np.random.default_rng(self.cfg.seed + 4242))
            x = torch.as_tensor(images).float().div_(255.0)
            return torch.utils.data.TensorDataset(transform.tensor(x))
        from lifelong_moe.streams.builder import data_root
        from lifelong_moe.streams.sources import load_source

        spec = d.reference_data
        data = load_source(spec.dataset, root=data_root(self.cfg.stream), download=self.cfg.stream.download,
                           seed=self.cfg.seed, path=spec.path, test_fraction=self.cfg.stream.test_fraction)
        return prepare(data.train, data.train_targets, transform)

    def threshold(self) -> float | dict[int, float] | None:
        d = self.params.ddas
        if d.threshold.mode == "fixed":
            return d.threshold.value
        if d.threshold.scope == "task":
            return self.ddas.task_thresholds(self.trained_tasks())
        return self.ddas.calibrated_threshold(self.trained_tasks())

    def trained_tasks(self) -> list[int]:
        return (self.task_routes >= 0).nonzero().flatten().tolist()

    # ---------------------------------------------------------------- inference
    def decisions(self, x: torch.Tensor, task) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample task index (-1: OOD) and, when computed, the frozen image embedding."""
        if self.ddas is None:  # oracle task id: the test set's own task if trained
            t = task.index if self.task_routes[task.index] >= 0 else OOD
            return torch.full((x.shape[0],), t, dtype=torch.long), None
        plain = self._frozen_image_features(x) if isinstance(self.extractor, ClipFeatures) else None
        feats = (ClipFeatures.squash(plain) if plain is not None else self.extractor(x)).float()
        with self.full_precision():  # autoencoders and thresholds in fp32, as fitted
            dec = self.ddas.decide(feats, self.trained_tasks(), self.threshold(), self.params.ddas.decision)
        return dec.cpu(), plain

    def class_features(self, head, route: int) -> torch.Tensor:
        """Class embeddings of ``head`` encoded with router ``route`` (-1: the frozen text tower),
        cached per router."""
        key = (route, head.key)
        if key in self._text_feats:
            return self._text_feats[key]
        self.moe.set_task(None if route < 0 else route, towers=("text",))
        feats = self.model.encode_head(head).float()
        if self.model.cache_text:
            self._text_feats[key] = feats
        return feats

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor, task, classes) -> torch.Tensor:
        with self.autocast():
            return self._eval_logits(x.to(self.device), task, classes)

    def _eval_logits(self, x: torch.Tensor, task, classes) -> torch.Tensor:
        self.model.eval()
        head = self.head_for(task, classes, self.cfg.evaluation.prompt)
        dec, plain = self.decisions(x, task)
        self._record(task.index, dec)
        routes = torch.where(dec >= 0, self.task_routes[dec.clamp(min=0)], torch.full_like(dec, -1))
        groups = routes.unique().tolist()
        img = self._image_features(x, routes, groups, plain)
        out = None
        for r in groups:  # each group: its own text head; rows selected from a full-batch product
            logits = self.model.logit_scale * img @ self.class_features(head, r).t()
            if len(groups) == 1:
                return logits
            out = logits if out is None else torch.where((routes == r).to(logits.device)[:, None], logits, out)
        return out

    def reduce_eval_records(self) -> None:
        """torchrun: this row's DDAS choice counts summed over the ranks' test shards."""
        distributed.reduce_row_counts(self.records, self.trained_count - 1, len(self.tasks), len(self.tasks) + 1,
                                      self.device)

    def _image_features(self, x: torch.Tensor, routes: torch.Tensor, groups: list[int],
                        plain: torch.Tensor | None) -> torch.Tensor:
        """Image embeddings for per-sample ``routes`` (-1: zero-shot). When DDAS ran on CLIP features
        (``plain``, the frozen pass), the rows it sends to zero-shot take their embedding from that
        pass and the MoE pass runs on the routed rows only (with the per-sample router path and the
        bypass mask's summation order, ``set_task(..., masked=True)``, so a routed row is computed as
        in one masked pass over the whole batch; CPU kernels may still round a sub-batch differently
        in the last bits). Otherwise one MoE pass over the batch with the zero-shot rows bypassed."""
        if len(groups) == 1 and (groups[0] >= 0 or plain is None):
            self.moe.set_task(groups[0], towers=("image",))
            return self.model.encode_image(x)
        if len(groups) == 1:
            return plain  # the frozen embedding, computed exactly as zero-shot CLIP does
        if -1 not in groups or plain is None:
            self.moe.set_task(routes.to(self.device), towers=("image",))
            return self.model.encode_image(x)
        keep = routes >= 0
        rows = keep.nonzero().flatten().to(self.device)
        self.moe.set_task(routes[keep].to(self.device), towers=("image",), masked=True)
        routed = self.model.encode_image(x.index_select(0, rows))
        return plain.clone().index_copy_(0, rows, routed.to(plain.dtype))

    def _record(self, col: int, dec: torch.Tensor) -> None:
        key = (self.trained_count - 1, col)
        counts = self.records.setdefault(key, torch.zeros(len(self.tasks) + 1, dtype=torch.long))
        counts += torch.bincount(dec + 1, minlength=len(self.tasks) + 1)

    # ---------------------------------------------------------------- results
    def extra_results(self) -> dict:
        names = [t.name for t in self.tasks]
        sel: dict = {}
        for (row, col), c in sorted(self.records.items()):
            total = int(c.sum())
            trained = 0 <= col <= row and bool(self.task_routes[col] >= 0)  # tasks train in order
            right = int(c[col + 1]) if trained else int(c[0])
            sel.setdefault(str(row), {})[names[col]] = {
                "accuracy": right / max(1, total), "ood_rate": int(c[0]) / max(1, total), "samples": total,
                "expected": names[col] if trained else "ood",
                "counts": {("ood" if j == 0 else names[j - 1]): int(v) for j, v in enumerate(c) if v}}

        def by_tower(d, fn):
            out = {t: {} for t in TOWERS if t in self.params.towers}
            for (tower, layer), v in sorted(d.items()):
                out[tower][str(layer)] = fn(v)
            return out

        thr = self.threshold() if self.ddas is not None else None
        thr = {names[t]: v for t, v in thr.items()} if isinstance(thr, dict) else thr
        return {"moe_adapters": {
            "ddas": {"enabled": self.ddas is not None, "decision": self.params.ddas.decision,
                     "threshold": thr, "threshold_mode": self.params.ddas.threshold.mode,
                     "selection": sel},
            "task_routes": {names[i]: int(r) for i, r in enumerate(self.task_routes) if r >= 0},
            "usage": {names[i]: by_tower(u, lambda v: v.tolist()) for i, u in sorted(self.usage_log.items())},
            "frozen_after_task": {names[i]: by_tower(f, list) for i, f in sorted(self.frozen_log.items())},
            "trainable_params_per_task": {names[i]: n for i, n in sorted(self.trainable_log.items())},
            "params": self.parameter_counts(),
        }}

    def parameter_counts(self) -> dict[str, int]:
        counts = super().parameter_counts()
        counts.update(moe_parameter_counts(self.moe, len(self.tasks) if self.params.router_per_task else 1))
        if self.ddas is not None:
            counts["ddas_autoencoder"] = 2 * self.ddas.dim * self.ddas.hidden + self.ddas.dim + self.ddas.hidden
            counts["paper_count"] = counts["moe_total"] + counts["ddas_autoencoder"]
        return counts

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """MoE branches (experts, frozen copies, every router, usage), DDAS autoencoders and
        calibration, task -> router map, logs and DDAS decision counts: tensors only."""
        st = {f"moe.{k}": v.detach().clone().contiguous() for k, v in self.model.clip.state_dict().items()
              if ".moe." in k}
        if self.ddas is not None:
            st.update({f"ddas.{k}": v.detach().clone().contiguous() for k, v in self.ddas.state_dict().items()})
        st["meta.task_routes"] = self.task_routes.clone()
        st["meta.trained_count"] = torch.tensor([self.trained_count])
        for (row, col), c in self.records.items():
            st[f"rec.{row}.{col}"] = c.clone()
        for i, u in self.usage_log.items():
            for (tower, layer), v in u.items():
                st[f"log.usage.{i}.{tower}.{layer}"] = v.clone()
        for i, f in self.frozen_log.items():
            for (tower, layer), ids in f.items():
                mask = torch.zeros(self.moe[(tower, layer)].experts.num_experts, dtype=torch.bool)
                mask[ids] = True
                st[f"log.frozen.{i}.{tower}.{layer}"] = mask
        for i, n in self.trainable_log.items():
            st[f"log.trainable.{i}"] = torch.tensor([n])
        return {k: v.cpu() for k, v in st.items()}  # device-independent checkpoints

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        moe = {k[4:]: v for k, v in state.items() if k.startswith("moe.")}
        if not moe:
            raise KeyError("checkpoint holds no MoE-Adapters state")
        result = self.model.clip.load_state_dict(moe, strict=False)
        missing = [k for k in result.missing_keys if ".moe." in k]
        if missing or result.unexpected_keys:
            raise KeyError(f"MoE state mismatch: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}")
        if self.ddas is not None:
            self.ddas.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("ddas.")})
        self.task_routes = state["meta.task_routes"].clone()
        self.trained_count = int(state["meta.trained_count"][0])
        self.records, self.usage_log, self.frozen_log, self.trainable_log = {}, {}, {}, {}
        for k, v in state.items():
            parts = k.split(".")
            if parts[0] == "rec":
                self.records[(int(parts[1]), int(parts[2]))] = v.clone()
            elif parts[:2] == ["log", "usage"]:
                self.usage_log.setdefault(int(parts[2]), {})[(parts[3], int(parts[4]))] = v.clone()
            elif parts[:2] == ["log", "frozen"]:
                self.frozen_log.setdefault(int(parts[2]), {})[(parts[3], int(parts[4]))] = \
                    v.nonzero().flatten().tolist()
            elif parts[:2] == ["log", "trainable"]:
                self.trainable_log[int(parts[2])] = int(v[0])
        self._text_feats.clear()
        self.model.clear_text_cache()


def moe_parameter_counts(handle, num_routers: int) -> dict[str, int]:
    """Experts of every block, one router (W_g^t and W_n^t) per block, and the MoE total with
    ``num_routers`` routers (the reference pre-allocates 11)."""
    experts = router = 0
    for m in handle.select():
        experts += sum(getattr(m.experts, n).numel() for n in m.experts._shapes)
        router += 2 * m.router.d_model * m.router.num_experts
    return {"moe_experts": experts, "moe_router_per_task": router, "moe_total": experts + num_routers * router}


def reference_parameter_count(name: str = "ViT-B-16", num_tasks: int = 11, ae_input_dim: int = 43264,
                              **params) -> dict[str, int]:
    """The paper's trainable-parameter figure for a backbone built from its open_clip config without
    weights: MoE params with ``num_tasks`` routers plus one DDAS autoencoder (AlexNet conv5 input by
    default). ViT-B-16 with the defaults gives 51.06M + 8.70M = 59.76M ("59.8M")."""
    import open_clip

    from lifelong_moe.backbones.clip import register_model_configs

    register_model_configs()
    p = Params(**params)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = open_clip.create_model(name, pretrained=None, device="meta")
        handle = inject_moe_adapters(model, towers=p.towers, num_experts=p.num_experts, k=p.top_k,
                                     bottleneck=p.bottleneck)
    counts = moe_parameter_counts(handle, num_tasks)
    counts["ddas_autoencoder"] = 2 * ae_input_dim * p.ddas.hidden + ae_input_dim + p.ddas.hidden
    counts["paper_count"] = counts["moe_total"] + counts["ddas_autoencoder"]
    counts["backbone"] = sum(p.numel() for n, p in model.named_parameters() if ".moe." not in n)
    return counts

