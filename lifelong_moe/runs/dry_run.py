"""``lifelong-moe run CONFIG --dry-run`` / ``edit CONFIG --dry-run``: plan a run before running it.

Steps, in the order they can fail (every failure is one :class:`~lifelong_moe.errors.UserError`):

1. the config is validated (it already is when it reaches here) and so is every data file, before
   any model is built: a VQA stream's question types are loaded through the stream builder's own
   loader (:func:`lifelong_moe.streams.builder.load_qa`: every record validated, every kept image's
   header read, no pixels decoded); an edit config's record files are read as JSON lists and their
   image root checked. ``check_data=False`` (``--skip-data``) plans without the data (the data files
   are then only listed).
2. the model's transformers config: from a local directory or the local Hugging Face cache
   (``local_files_only``), else from :data:`PUBLISHED`, the published configs of
   ``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2-VL-7B-Instruct`` and ``Salesforce/blip2-opt-2.7b``
   written as config objects. Nothing is ever downloaded.
3. the model is built from its config on the ``meta`` device (no weights) in ``backbone.dtype``
   through its architecture adapter's class (:mod:`lifelong_moe.backbones.vlm_adapters`), wrapped in
   :class:`~lifelong_moe.backbones.vlm.VisionLanguageModel` with a stand-in tokenizer (only the ids
   the wrapper needs: image token, EOS, padding); inputs are made of fake token ids of the planned
   length (no tokenizer is needed).
4. the strategy (``run``) or editing method (``edit``) is injected exactly as the run does it:
   the strategy class built with the config (its ``setup``: peft LoRA, CL-MoE's experts and hooks,
   trainable parameters cast to fp32), or the method attached to the VLM.
5. one training step (forward + backward; LiveEdit: one meta-training step, its real losses) at
   ``training.batch_size`` (LiveEdit: ``method.batch_size`` edits x 4 inputs), and one generation step
   at ``evaluation.batch_size``: the prompt's prefill with a KV cache, then one cached decoding step
   (two forward passes: ``generate`` itself needs the values of tensors). Both run on *fake* tensors
   (``torch._subclasses.FakeTensorMode``: meta storage, CPU dispatch, so ``torch.autocast`` applies as
   in the run): shapes and dtypes are checked by every kernel's meta function at 7B, in seconds.
6. the plan: parameters (total, frozen, trainable) and their bytes, gradients and optimizer state
   (Adam/AdamW: 2 states per trainable parameter, SGD with momentum: 1, in the trainable dtype: fp32),
   activations, KV cache, and the per-device total of each step.

Activation memory is *counted*, not modelled: every tensor autograd saves for the backward pass during
the training forward goes through ``torch.autograd.graph.saved_tensors_hooks``; their distinct storages
(parameters excluded) are summed. Attention runs through a stand-in for a fused kernel (flash /
memory-efficient SDPA, what a GPU run uses) that saves what those save: q, k, v, the output and the
log-sum-exp, not the ``L x L`` attention matrix. The count is what autograd holds at the end of the
forward, the dominant term of the peak; the allocator's fragmentation, CUDA context (~0.5 GiB) and
temporary buffers inside kernels are not included, nor are live non-saved tensors (LiveEdit's frozen
states of the batch).

Where a model reads tensor *values* to make shapes, the dry run supplies them (:func:`value_patches`:
Qwen2-VL's image grid and M-RoPE positions; transformers' own value checks are off, as under
``torch.compile``), and LiveEdit's routing is traced at its largest case (every input keeps
``max_experts`` stored edits). The traced step is the base strategy's answer loss (replay: with its
replayed samples in the same pass); LwF's teacher pass is not traced (a note says so). The model
built for a plan is spent afterwards (its parameters are fake tensors).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import UserError

TEXT_TOKENS = 64  # planned prompt text (instruction + question) + answer tokens, besides the image tokens
FUSED_ATTENTION = "lmoe_dry_run_fused"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# the image token of each architecture's prompt template (the stand-in tokenizer names it)
IMAGE_TOKENS = {"llava": "<image>", "llava_next": "<image>", "qwen2_vl": "<|image_pad|>", "blip-2": "<image>",
                "idefics3": "<image>"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------ published configs
def _llava_15_7b():
    """``llava-hf/llava-1.5-7b-hf``'s config.json: CLIP ViT-L/14-336 + Vicuna-7B (LLaMA-7B) (7,063,427,072
    parameters)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=32001,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                       pad_token_id=32001, tie_word_embeddings=False, dtype="float16")


def _qwen2_vl_7b():
    """``Qwen/Qwen2-VL-7B-Instruct``'s config.json: a 675M ViT (patch 14, 2x2 merge) + Qwen2-7B (28 layers,
    GQA 28/4 heads) (8,291,375,616 parameters)."""
    from transformers import Qwen2VLConfig

    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=151643,
                eos_token_id=151645, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, in_chans=3, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, bos_token_id=151643,
                         eos_token_id=151645, tie_word_embeddings=False, dtype="bfloat16")


def _blip2_opt_27b():
    """``Salesforce/blip2-opt-2.7b``'s config.json: EVA ViT-g/14 (39 layers) + Q-Former (32 queries) + OPT-2.7b
    (3,744,761,856 parameters)."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                               image_size=224, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True)
    qformer = Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, vocab_size=30522, cross_attention_frequency=2,
                                 encoder_hidden_size=1408)
    text = OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50304,
                     max_position_embeddings=2048, word_embed_proj_dim=2560, do_layer_norm_before=True,
                     bos_token_id=2, eos_token_id=50118, pad_token_id=1, activation_function="relu")
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                       num_query_tokens=32, image_token_index=50265, dtype="float32")


PUBLISHED = {"llava-hf/llava-1.5-7b-hf": _llava_15_7b, "Qwen/Qwen2-VL-7B-Instruct": _qwen2_vl_7b,
             "Salesforce/blip2-opt-2.7b": _blip2_opt_27b}


def model_config(name: str):
    """``(transformers config, where it came from)``: a local directory, the local HF cache, or
    :data:`PUBLISHED`; never downloads. UserError when none has it."""
    from transformers import AutoConfig

    from ..backbones.vlm import _quiet_transformers
    from ..backbones.vlm_tiny import shipped_vlm_names

    if name in shipped_vlm_names():
        raise UserError(f"--dry-run plans Hugging Face models (a hub id or a local directory); {name} is the shipped "
                        "tiny VLM, which runs on the CPU in minutes: run it")
    local = Path(name).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(f"backbone.name: {name} is a directory but has no config.json")
    with _quiet_transformers():
        try:
            cfg = AutoConfig.from_pretrained(str(local) if local.is_dir() else name, local_files_only=True)
            return cfg, (f"{local}/config.json" if local.is_dir() else "the local Hugging Face cache")
        except Exception:  # noqa: BLE001 - not cached / no such directory: the published table
            pass
    if name in PUBLISHED:
        return PUBLISHED[name](), "the published config (lifelong_moe/runs/dry_run.py; not in the local cache)"
    raise UserError(f"backbone.name: no config for {name!r} in a local directory or the local Hugging Face cache, "
                    f"and it is not one of the published configs --dry-run knows ({', '.join(PUBLISHED)}); "
                    f"download its config.json once (huggingface-cli download {name} config.json)")


# ------------------------------------------------------------------------------ the meta model
class _Tokenizer:
    """The ids :class:`VisionLanguageModel` reads from a tokenizer, nothing more (no text is tokenised)."""

    def __init__(self, config, image_token: str):
        text = getattr(config, "text_config", config)

        def first(key):
            return next((int(v) for v in (getattr(text, key, None), getattr(config, key, None)) if isinstance(v, int)),
                        None)

        self.bos_token_id, self.eos_token_id, self.pad_token_id = first("bos_token_id"), first("eos_token_id"), \
            first("pad_token_id")
        self.unk_token_id = None
        self.eos_token_id = 2 if self.eos_token_id is None else self.eos_token_id
        self._image = (int(config.image_token_id), image_token)

    def convert_ids_to_tokens(self, i: int) -> str:
        return self._image[1] if int(i) == self._image[0] else f"<id {i}>"


def _attn_name(name: str) -> str:
    """Register the fused-attention stand-in with transformers once; its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, _fused_attention)
    return name


class _FusedSDPA(torch.autograd.Function):
    """Scaled dot-product attention that saves for backward what a fused kernel saves (q, k, v, output,
    log-sum-exp ``[B, H, Lq]`` fp32), not the attention matrix the math path keeps."""

    @staticmethod
    def forward(ctx, q, k, v, module, mask, dropout, scaling, is_causal, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                                        **kwargs)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None, None, None, None, None


def _fused_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    return _FusedSDPA.apply(query, key, value, module, attention_mask, dropout, scaling, is_causal, kwargs), None


def meta_vlm(backbone, dtype: torch.dtype):
    """``(VisionLanguageModel on the meta device, config source)`` of a ``backbone`` section."""
    import transformers

    from ..backbones.vlm import VisionLanguageModel, _quiet_transformers
    from ..backbones.vlm_adapters import adapter_for

    config, source = model_config(backbone.name)
    adapter = adapter_for(config.model_type, backbone.name)
    cls = getattr(transformers, adapter.model_class)
    build = getattr(cls, "from_config", None) or cls._from_config
    with _quiet_transformers(), torch.device("meta"):
        model = build(config, dtype=dtype, attn_implementation=_attn_name(FUSED_ATTENTION))
    processor = SimpleNamespace(tokenizer=_Tokenizer(config, IMAGE_TOKENS.get(config.model_type, "<image>")),
                                image_processor=SimpleNamespace(image_mean=CLIP_MEAN, image_std=CLIP_STD, size=None))
    try:
        vlm = VisionLanguageModel(model, processor, backbone.prompt_template, backbone.name, backbone.image_size)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - an adapter that needs the real processor (it counts image tokens)
        raise UserError(f"--dry-run cannot plan {backbone.name!r} ({config.model_type}) without its processor: "
                        f"{type(e).__name__}: {e}") from e
    return vlm, source


@contextlib.contextmanager
def tracing(name: str):
    """A failure while tracing the steps as one UserError naming the model and the error."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a shape or dtype mismatch, or an op that needs values
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"dry run of {name}: a traced step failed ({type(e).__name__}: {first}): the shapes or dtypes "
                        "of this configuration do not line up, or the architecture reads tensor values the dry "
                        "run does not supply (value_patches in lifelong_moe/runs/dry_run.py)") from e


# ------------------------------------------------------------------------------ fake tensors
@contextlib.contextmanager
def fake_tensors(module: torch.nn.Module):
    """Every parameter and buffer of ``module`` as a fake CPU tensor over its meta storage (the
    Parameter objects are replaced, ``requires_grad`` kept, tied ones stay tied), and a
    ``FakeTensorMode`` in which new tensors are fake too: kernels check shapes and dtypes, nothing is
    computed, and ``torch.autocast("cpu")`` applies. transformers' value checks (``torch_compilable_check``)
    are off inside, as under tracing (they read values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    conv, cpu, memo = mode.fake_tensor_converter, torch.device("cpu"), {}

    def fake(t):
        if id(t) not in memo:
            memo[id(t)] = conv.from_meta_and_device(mode, t.data if t.device.type == "meta" else t.data.to("meta"), cpu)
        return memo[id(t)]

    params = {}
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None:
                if id(p) not in params:
                    params[id(p)] = torch.nn.Parameter(fake(p), requires_grad=p.requires_grad)
                m._parameters[n] = params[id(p)]
        for n, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[n] = fake(b)
    from torch.overrides import TorchFunctionMode

    class EinsumAutocast(TorchFunctionMode):
        """``einsum`` under autocast casts its operands, as real tensors get through its ``bmm``
        (on fake tensors the composite reaches ``bmm`` past autocast)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.einsum and torch.is_autocast_enabled("cpu"):
                dt = torch.get_autocast_dtype("cpu")
                args = (args[0], *(a.to(dt) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                   for a in args[1:]))
            return func(*args, **(kwargs or {}))

    before = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        with mode, EinsumAutocast():
            yield mode
    finally:
        if before is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = before


@contextlib.contextmanager
def value_patches(vlm):
    """Where an architecture computes shapes from tensor *values*, give it the values the run would:
    Qwen2-VL's vision positions and attention lengths come from ``image_grid_thw`` (computed here from the
    picture size, as real tensors), and its M-RoPE text positions are data (zeros of their shape ``[3, B,
    L]`` stand in: values, not shapes, differ). Nothing to do for the other architectures."""
    if vlm.model.config.model_type != "qwen2_vl":
        yield
        return
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from transformers.models.qwen2_vl import modeling_qwen2_vl as Q

    vc = vlm.model.config.vision_config
    side = vlm.image_size // vc.patch_size
    originals = {k: getattr(Q, k) for k in ("get_vision_position_ids", "get_vision_attention_seqlens")}

    def real(name):
        def fn(grid_thw, *args, **kwargs):
            with unset_fake_temporarily():
                grid = torch.tensor([[1, side, side]] * grid_thw.shape[0])
                return originals[name](grid, *args, **kwargs)
        return fn

    inner = vlm.model.model

    def positions(input_ids=None, inputs_embeds=None, **_):
        b, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        return torch.zeros(3, b, length, dtype=torch.long)

    # its vision attention splits the packed images by lengths read as values, unless a flash kernel takes
    # them packed: the fused stand-in (memory as flash's) under a flash-like name takes that path
    vision = vlm.model.model.visual.config
    attn = vision._attn_implementation
    per_image = side * side // vc.spatial_merge_size ** 2

    def image_features(pixel_values, image_grid_thw=None, **kwargs):  # get_image_features, sizes known
        out = inner.visual(pixel_values.type(inner.visual.dtype), grid_thw=image_grid_thw, **kwargs)
        out.pooler_output = torch.split(out.pooler_output, [per_image] * image_grid_thw.shape[0])
        return out

    for k in originals:
        setattr(Q, k, real(k))
    inner.compute_3d_position_ids = positions
    inner.get_image_features = image_features
    vision._attn_implementation = _attn_name(FUSED_ATTENTION + "_flash")
    try:
        yield
    finally:
        for k, f in originals.items():
            setattr(Q, k, f)
        del inner.compute_3d_position_ids, inner.get_image_features
        vision._attn_implementation = attn


class SavedTensors:
    """Bytes autograd saves for backward while active (distinct storages; ``exclude``: parameters)."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.skip = {self._key(t) for t in exclude}
        self.seen: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # alive, so that storage keys are not reused

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def pack(self, t):
        key = self._key(t)
        if key not in self.skip and key not in self.seen:
            self.seen[key] = t.untyped_storage().nbytes()
            self.keep.append(t)
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def fake_batch(vlm, batch_size: int, text_tokens: int, answer_tokens: int, *, with_answers: bool = True):
    """A :class:`VlmBatch` of fake tensors: per question the image tokens, ``text_tokens`` prompt tokens
    and (``with_answers``) ``answer_tokens`` answer tokens plus EOS; no padding."""
    from ..backbones.vlm import VlmBatch

    n_img = vlm.num_image_tokens
    length = n_img + text_tokens + ((answer_tokens + 1) if with_answers else 0)
    s = vlm.image_size
    ids = torch.zeros(batch_size, length, dtype=torch.long)
    mask = torch.zeros(batch_size, length, dtype=torch.bool)
    return VlmBatch(ids, torch.ones(batch_size, length, dtype=torch.long), torch.zeros(batch_size, 3, s, s,
                    dtype=vlm.dtype), torch.zeros(batch_size, length, dtype=torch.long), mask, mask.clone(),
                    mask.clone())


# ------------------------------------------------------------------------------ the plan
GIB = 2 ** 30
FITS = 78  # GiB usable on an 80 GB GPU (A100 / H100); the plan says when a step needs more


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:9.2f} GiB"


@dataclass
class Plan:
    """What ``--dry-run`` found; :meth:`format` is what it prints."""

    name: str
    model: str
    config_source: str
    dtype: str
    precision: str
    method: str
    params_total: int = 0
    params_trainable: int = 0
    weight_bytes: int = 0
    trainable_bytes: int = 0
    optimizer: str = ""
    optimizer_bytes: int = 0
    train_shape: str = ""
    activation_bytes: int | None = None
    generate_shape: str = ""
    kv_cache_bytes: int | None = None
    generate_bytes: int | None = None
    data: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def frozen(self) -> int:
        return self.params_total - self.params_trainable

    @property
    def train_total(self) -> int | None:
        if self.activation_bytes is None:
            return None
        return self.weight_bytes + self.trainable_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def generate_total(self) -> int | None:
        return None if self.generate_bytes is None else self.weight_bytes + self.generate_bytes

    def format(self) -> str:
        rows = [
            ("parameters", f"{self.params_total:,}", _gib(self.weight_bytes),
             f"all weights as built ({self.dtype} frozen, fp32 trainable)"),
            ("  frozen", f"{self.frozen:,}", "", ""),
            ("  trainable", f"{self.params_trainable:,}", f"{_gib(self.trainable_bytes)}",
             f"gradients ({100 * self.params_trainable / max(1, self.params_total):.2f}% of the parameters)"),
            ("optimizer state", "", _gib(self.optimizer_bytes), self.optimizer),
            ("activations", "", _gib(self.activation_bytes), f"saved for backward, training step {self.train_shape}"),
            ("per device, training", "", _gib(self.train_total), "weights + gradients + optimizer + activations"),
            ("KV cache", "", _gib(self.kv_cache_bytes), f"generation {self.generate_shape}"),
            ("per device, generation", "", _gib(self.generate_total), "weights + KV cache + last logits"),
        ]
        w = max(len(r[0]) for r in rows)
        lines = [f"dry run of {self.name}: {self.method} on {self.model}",
                 f"  model config: {self.config_source}",
                 f"  built on the meta device in {self.dtype}, computing under {self.precision}; "
                 f"{self.seconds:.1f} s, nothing loaded or downloaded"]
        lines += [f"  data: {d}" for d in self.data]
        lines.append("")
        lines += [f"  {a:<{w}}  {b:>15}  {c:>13}  {d}".rstrip() for a, b, c, d in rows]
        if self.notes:
            lines.append("")
            lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _precision(cfg) -> tuple[str, str]:
    """``(backbone dtype, autocast precision)``, as the config resolved them."""
    return getattr(cfg.backbone, "dtype", None) or "fp32", cfg.runtime.precision


def _autocast(precision: str):
    return contextlib.nullcontext() if precision == "fp32" else torch.autocast("cpu", dtype=DTYPES[precision])


def _optimizer_bytes(params: list[torch.Tensor], name: str, momentum: float = 0.0) -> tuple[int, str]:
    per = {"adamw": 2, "adam": 2, "sgd": 1 if momentum else 0}[name]
    n = sum(p.numel() * p.element_size() for p in params)
    label = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}[name]
    return per * n, f"{label}: {per} state(s) per trainable parameter, in its dtype"


def _generation_step(vlm, batch_size: int, text_tokens: int, precision: str) -> tuple[int, int, str]:
    """Prefill with a KV cache, then one cached decoding step (what ``generate`` does per token); returns
    (KV cache bytes, KV cache + last logits bytes, shape)."""
    batch = fake_batch(vlm, batch_size, text_tokens, 0, with_answers=False)
    with torch.no_grad(), _autocast(precision), vlm.running(batch):
        out = vlm.model(**vlm.model_inputs(batch), use_cache=True)
        lm_out = getattr(out, "language_model_outputs", None) or out  # BLIP-2: its language model's output
        cache = lm_out.past_key_values
        step = torch.zeros(batch_size, 1, dtype=torch.long)
        att = torch.ones(batch_size, cache.get_seq_length() + 1, dtype=torch.long)
        # a decoding step calls what generate() calls per token (the model; BLIP-2: its language model)
        nxt = vlm.call_module(input_ids=step, attention_mask=att, past_key_values=cache, use_cache=True)
    cache = nxt.past_key_values
    kv = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                kv += t.numel() * t.element_size()
    logits = lm_out.logits[:, -1:]
    shape = f"batch {batch_size} x ({vlm.num_image_tokens} image + {text_tokens} text tokens) + 1 cached step"
    return kv, kv + logits.numel() * 4, shape


def _count(plan: Plan, model: torch.nn.Module, extra: torch.nn.Module | None = None) -> list[torch.Tensor]:
    seen, trainable = {}, []
    for mod in (model, extra):
        if mod is None:
            continue
        for p in mod.parameters():
            if id(p) in seen:
                continue
            seen[id(p)] = p
            if p.requires_grad:
                trainable.append(p)
    plan.params_total = sum(p.numel() for p in seen.values())
    plan.params_trainable = sum(p.numel() for p in trainable)
    plan.weight_bytes = sum(p.numel() * p.element_size() for p in seen.values())
    plan.trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return trainable


def check_stream_data(stream, seed: int) -> list[str]:
    """Every question type of a VQA stream loaded by the stream builder's loader (records validated,
    kept images' headers read); one line per type. UserError naming the missing or bad file."""
    from ..streams.builder import load_qa, vqa_order

    if stream.kind != "vqa":
        raise UserError(f"--dry-run plans VLM runs on vqa streams; this stream is {stream.kind!r}")
    lines = []
    try:
        for qtype in vqa_order(stream):
            data = load_qa(stream, qtype, seed)
            where = data.meta.get("train_file")
            lines.append(f"{data.name}: {len(data.train_records)} train / {len(data.test_records)} test questions"
                         + (f" ({where})" if where else ""))
    except (ValueError, FileNotFoundError, UserError) as e:
        raise UserError(f"stream: {e} (--dry-run --skip-data plans without the data)") from None
    return lines


def _stream_files(stream) -> list[str]:
    from ..streams.builder import vqa_order

    dataset = stream.dataset if isinstance(stream.dataset, str) else stream.dataset.dataset
    if dataset != "vqacl":
        return [f"{dataset}: generated, no files"]
    part = stream.partition_dir or f"{stream.root}/Partition_Q"
    return [f"not checked (--skip-data): images under {stream.root}, partition files {part}/karpathy_{{train,test}}"
            f"_q_<type>.json for {', '.join(vqa_order(stream))}"]


def plan_run(cfg, *, check_data: bool = True, text_tokens: int = TEXT_TOKENS) -> Plan:
    """The plan of one run configuration (see the module docstring)."""
    from ..registry import strategy_class

    t0 = time.perf_counter()
    if cfg.backbone.family != "vlm":
        raise UserError(f"--dry-run plans VLM runs (backbone.family: vlm); this config's family is "
                        f"{cfg.backbone.family!r}")
    data = check_stream_data(cfg.stream, cfg.seed) if check_data else _stream_files(cfg.stream)
    dtype, precision = _precision(cfg)
    vlm, source = meta_vlm(cfg.backbone, DTYPES[dtype])
    plan = Plan(cfg.name, cfg.backbone.name, source, dtype, precision, f"strategy {cfg.strategy.name}", data=data)
    cls = strategy_class(cfg.strategy.name, cfg.backbone.family)
    from ..streams.builder import vqa_order
    from ..data import QATask

    tasks = [QATask(i, q, q, (), ()) for i, q in enumerate(vqa_order(cfg.stream))]
    strategy = cls(model=vlm, cfg=cfg, params=cfg.strategy_params(), tasks=tasks, device=torch.device("meta"),
                   precision=precision, progress=False)
    trainable = _count(plan, vlm)
    opt = cfg.training.optimizer
    plan.optimizer_bytes, plan.optimizer = _optimizer_bytes(trainable, opt.name, opt.momentum)
    b = cfg.training.batch_size + int(getattr(cfg.strategy_params(), "replay_batch_size", 0) or 0)  # replay: one pass
    answer = cfg.evaluation.max_new_tokens
    if cfg.strategy.name == "lwf":
        plan.notes.append("the traced step is the answer loss; LwF's teacher pass (no grad) adds its logits, "
                          "batch x length x vocabulary in fp32, for the step")
    plan.train_shape = (f"batch {b} x ({vlm.num_image_tokens} image + {text_tokens} text + {answer} answer + EOS "
                        "tokens)")
    with tracing(cfg.backbone.name), fake_tensors(vlm), value_patches(vlm):
        params = list(vlm.parameters())
        if strategy.trains and trainable:
            batch = fake_batch(vlm, b, text_tokens, answer)
            vlm.train()
            with SavedTensors(params) as saved:
                with _autocast(precision):
                    logits = vlm.logits(batch)
                loss = vlm.answer_loss(batch, logits)
            loss.backward()
            missing = [n for n, p in vlm.named_parameters() if p.requires_grad and p.grad is None]
            if missing:
                raise UserError(f"dry run: no gradient reached {len(missing)} trainable tensor(s), e.g. {missing[0]}")
            plan.activation_bytes = saved.nbytes
            vlm.eval()
        else:
            plan.activation_bytes = 0
            plan.notes.append(f"{cfg.strategy.name} does not train: no training step")
        kv, gen, plan.generate_shape = _generation_step(vlm, cfg.evaluation.batch_size, text_tokens, precision)
        plan.kv_cache_bytes, plan.generate_bytes = kv, gen
    plan.notes.append(f"one device; under torchrun training.batch_size is the global batch: each of N GPUs trains "
                      f"{cfg.training.batch_size} / N (plan that with training.batch_size={cfg.training.batch_size}/N)")
    _finish(plan, "training.batch_size")
    plan.seconds = time.perf_counter() - t0
    return plan


def _finish(plan: Plan, batch_key: str) -> None:
    plan.notes.append("generation is traced as its prefill and one cached decoding step (generate() reads tensor "
                      "values, which fake tensors have not)")
    if plan.train_total is not None and plan.train_total > FITS * GIB:
        plan.notes.append(f"the training step needs more than an 80 GB GPU holds ({FITS} GiB): lower {batch_key} "
                          "(activations grow with it)")
    if plan.generate_total is not None and plan.generate_total > FITS * GIB:
        plan.notes.append(f"the generation step needs more than an 80 GB GPU holds ({FITS} GiB): lower "
                          "evaluation.batch_size")


def check_edit_data(d) -> list[str]:
    """An edit config's record files read as JSON lists, its image root checked; one line per file."""
    from ..editing.records import read_record_file

    if d.source == "synthetic":
        return ["synthetic: generated, no files"]
    if d.image_root is not None and not Path(d.image_root).expanduser().is_dir():
        raise UserError(f"data.image_root: {d.image_root} is not a directory (--dry-run --skip-data plans without "
                        "the data)")
    lines = []
    for key in ("train_path", "eval_path"):
        path = getattr(d, key)
        if path:
            try:
                recs = read_record_file(Path(path).expanduser())
            except UserError as e:
                raise UserError(f"data.{key}: {e} (--dry-run --skip-data plans without the data)") from None
            lines.append(f"{key} {path}: {len(recs)} records")
    return lines


def _edit_files(d) -> list[str]:
    if d.source == "synthetic":
        return ["synthetic: generated, no files"]
    files = [p for p in (d.train_path, d.eval_path) if p]
    return [f"not checked (--skip-data): {', '.join(files)}" + (f", images under {d.image_root}" if d.image_root
                                                                else "")]


def plan_edit(cfg, *, check_data: bool = True, text_tokens: int = TEXT_TOKENS) -> Plan:
    """The plan of one edit configuration: LiveEdit's meta-training step (the method's own losses on
    ``batch_size`` edits x 4 inputs), and a generation step with the largest edit count stored."""
    from ..editing.registry import build_method
    from ..editing.types import EditRecord

    t0 = time.perf_counter()
    data = check_edit_data(cfg.data) if check_data else _edit_files(cfg.data)
    dtype, precision = _precision(cfg)
    vlm, source = meta_vlm(cfg.backbone, DTYPES[dtype])
    plan = Plan(cfg.name, cfg.backbone.name, source, dtype, precision, f"editing method {cfg.method.name}", data=data)
    from ..editing import fitted as F

    method = build_method(cfg.method.name, F.without_fitted(cfg.method_params()))
    method.attach(vlm)
    nets = getattr(method, "nets", None)
    if nets is not None:
        nets.requires_grad_(True)
    trainable = _count(plan, vlm, nets)
    plan.optimizer_bytes, plan.optimizer = _optimizer_bytes(trainable, "adam")
    p = method.params
    answer = cfg.evaluation.max_new_tokens
    with tracing(cfg.backbone.name), fake_tensors(vlm if nets is None else torch.nn.ModuleList([vlm, nets])), \
            value_patches(vlm):
        if hasattr(method, "_frozen") and hasattr(method, "_meta_losses"):
            import numpy as np

            b = p.batch_size
            plan.train_shape = (f"{b} edits x 4 inputs x ({vlm.num_image_tokens} image + {text_tokens} text + "
                                f"{answer} answer + EOS tokens)")
            vlm.batch = lambda images, questions, answers=None, padding_side="right": fake_batch(
                vlm, len(questions), text_tokens, answer, with_answers=answers is not None)
            s = vlm.image_size
            img = torch.zeros(3, s, s)
            recs = [EditRecord(src="q", alt="a", rephrase="q", m_loc_q="q", m_loc_a="a", image=img, image_rephrase=img,
                               m_loc=img) for _ in range(b)]
            nets.train()
            with SavedTensors(list(vlm.parameters()) + list(nets.parameters())) as saved:
                with _autocast(precision):
                    frozen = method._frozen(recs)
                    losses = method._meta_losses(frozen, np.random.default_rng(0))
                loss = sum(losses.values())
            loss.backward()
            plan.activation_bytes = saved.nbytes
            nets.eval()
            del vlm.batch
        else:
            plan.activation_bytes = 0
            plan.notes.append(f"{cfg.method.name} is not meta-trained: no training step (its edits train "
                              "inside edit())")
        stored = _store_edits(method, max(cfg.evaluation.edit_counts))
        with _worst_case_routing(method, plan):
            kv, gen, plan.generate_shape = _generation_step(vlm, cfg.evaluation.batch_size, text_tokens, precision)
        plan.kv_cache_bytes, plan.generate_bytes = kv, gen + stored
        if stored:
            plan.generate_shape += f", {max(cfg.evaluation.edit_counts)} edits stored ({_gib(stored).strip()})"
    _finish(plan, "method.batch_size")
    plan.seconds = time.perf_counter() - t0
    return plan


@contextlib.contextmanager
def _worst_case_routing(method, plan: Plan):
    """LiveEdit's routing reads values (which rows have an image, how many experts pass the filter):
    on fake tensors every input has its image and keeps ``max_experts`` experts (all when None), the
    most it can, so the step's shapes are the largest the run can see."""
    if not (hasattr(method, "_masks") and hasattr(method, "_sparse")):
        yield
        return
    cap = getattr(method.params, "max_experts", None)

    def masks(shape):
        batch = method.vlm.current_batch
        return None if batch is None else (batch.image_mask, batch.prompt_mask)

    def sparse(weights):
        return weights.topk(weights.shape[1] if cap is None else min(cap, weights.shape[1]), dim=1)

    method._masks, method._sparse = masks, sparse
    plan.notes.append(f"{method.name} routing traced with every input keeping "
                      f"{'every stored edit' if cap is None else f'max_experts={cap} experts'} (its largest case)")
    try:
        yield
    finally:
        del method._masks, method._sparse


def _store_edits(method, n: int) -> int:
    """Store ``n`` fake edits in a method that keeps a bank (LiveEdit); their bytes (0 for other methods)."""
    shapes = getattr(method, "_edit_shapes", None)
    if shapes is None or not hasattr(method, "set_edits"):
        return 0
    bank = getattr(method, "_edits", None)
    if bank is not None and hasattr(bank, "device"):
        bank.device = method.vlm.device  # made at attach on the meta device; the fake tensors' device now
    one = {k: torch.zeros(*s) for k, s in shapes().items()}
    method.set_edits({str(i): one for i in range(n)})
    return n * sum(t.numel() * t.element_size() for t in one.values())


def dry_run(kind: str, configs: list, *, check_data: bool = True, log=print) -> list[Plan]:
    """Plan every configuration (``kind``: ``run`` or ``edit``) and print each plan."""
    plans = []
    for cfg in configs:
        plan = (plan_run if kind == "run" else plan_edit)(cfg, check_data=check_data)
        log(plan.format())
        log("")
        plans.append(plan)
    return plans
