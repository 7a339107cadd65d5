"""Loading models ready for edge work (TransformerLens 4 ``TransformerBridge``).

``load_model`` accepts
  (a) the name of an embedded model (``toy-gpt2-2l``, ...; shipped in ``eap/embedded/``),
  (b) ``random:<shape>`` or ``random:<shape>@<seed>``: a randomly initialised model of a named
      shape (``gpt2-small``, ``llama-3.2-1b``, ``qwen2.5-0.5b``, ``pythia-160m``, ``gemma-2-2b``,
      ``qwen3-0.6b``, ``phi-3-mini``, ``gemma-2b``, ``gpt-j-6b``,
      and a ``-tiny`` variant of each family; see ``RANDOM_SHAPES``), built offline, seedable,
      with the embedded word-level IOI tokenizer,
  (c) a local directory with a transformers model + tokenizer saved with ``save_pretrained``,
  (d) any HuggingFace name TransformerLens supports (downloads when online).

Every model comes back in compatibility mode with raw weights (``no_processing=True``: no
LayerNorm folding or centering, like the seed's ``fold_ln=False``), with split q/k/v inputs,
per-head results and ``hook_mlp_in`` switched on, parameters frozen, in eval mode.
Grouped-query models (Llama, Qwen2, Mistral, Gemma-2) come back *ungrouped*: every query head
has its own copy of its group's key/value projection (``eap.arch.ungroup_kv_heads``; the same
function), so q, k and v inputs exist per query head as in MIB and EAP-IG.

``origin_of(model)`` says how a model of ``load_model`` or ``random_model`` was made (a
:class:`ModelOrigin`), so that another process (a Ray worker of ``validation.executor``) can make
the same model itself instead of receiving its weights.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
DEFAULT_MODEL = "toy-gpt2-4l"

_LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)

#: Named shapes of randomly initialised models: (family, HuggingFace config fields). The full-size
#: entries are the layer/width/head/KV-head/MLP numbers and the rope/norm facts of the published
#: configs (HF ``config.json``); the ``-tiny`` entries keep each family's features (GQA, rope
#: scaling, biases, partial rotary, softcaps, sliding windows) at test size. The vocabulary size of
#: the real config is kept (the unembedding costs what it really costs); only the first ids are
#: used, by the embedded word-level IOI tokenizer.
RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024)),
    "gpt2-large": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024)),
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64)),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": ("llama", dict(
        num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
        max_position_embeddings=131072, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
        vocab_size=128256)),
    "llama-tiny": ("llama", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=64, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE, original_max_position_embeddings=16), max_position_embeddings=64,
        tie_word_embeddings=True, vocab_size=64)),
    # Qwen/Qwen2.5-0.5B (q/k/v biases are part of the Qwen2 architecture)
    "qwen2.5-0.5b": ("qwen2", dict(
        num_hidden_layers=24, hidden_size=896, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        sliding_window=32768, max_window_layers=24, use_sliding_window=False, tie_word_embeddings=True,
        vocab_size=151936)),
    "qwen-tiny": ("qwen2", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=64,
        use_sliding_window=False, tie_word_embeddings=True, vocab_size=64)),
    # EleutherAI/pythia-160m (parallel attention/MLP, rotary on a quarter of each head)
    "pythia-160m": ("gpt-neox", dict(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
        rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5, use_parallel_residual=True,
        max_position_embeddings=2048, tie_word_embeddings=False, vocab_size=50304)),
    "pythia-tiny": ("gpt-neox", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128, hidden_act="gelu",
        rotary_pct=0.5, rotary_emb_base=10000, layer_norm_eps=1e-5, use_parallel_residual=True,
        max_position_embeddings=64, tie_word_embeddings=False, vocab_size=64)),
    # google/gemma-2-2b (norms with 1 + w, post-norms, softcaps, sliding window on every other layer)
    "gemma-2-2b": ("gemma2", dict(
        num_hidden_layers=26, hidden_size=2304, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        intermediate_size=9216, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096, max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=256000)),
    "gemma-2-tiny": ("gemma2", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4,
        max_position_embeddings=64, tie_word_embeddings=True, vocab_size=64)),
    # Qwen/Qwen3-0.6B (per-head q/k RMSNorm before rotary, head_dim 128 != hidden / heads)
    "qwen3-0.6b": ("qwen3", dict(
        num_hidden_layers=28, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=40960, attention_bias=False, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=True, vocab_size=151936)),
    "qwen3-tiny": ("qwen3", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=64,
        use_sliding_window=False, tie_word_embeddings=True, vocab_size=64)),
    # microsoft/Phi-3-mini-4k-instruct (fused qkv_proj and gate_up_proj, sliding window 2047 on every layer)
    "phi-3-mini": ("phi3", dict(
        num_hidden_layers=32, hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
        tie_word_embeddings=False, vocab_size=32064)),
    "phi-3-tiny": ("phi3", dict(  # grouped (as Phi-3-medium) to exercise the fused ungrouping
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        hidden_act="silu", rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
        original_max_position_embeddings=64, sliding_window=5, tie_word_embeddings=False, vocab_size=64)),
    # google/gemma-2b (Gemma v1: multi-query attention, 1 + w norms, embedding x sqrt(d), GeGLU)
    "gemma-2b": ("gemma", dict(
        num_hidden_layers=18, hidden_size=2048, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        intermediate_size=16384, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=256000)),
    "gemma-tiny": ("gemma", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        intermediate_size=64, hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
        max_position_embeddings=64, tie_word_embeddings=True, vocab_size=64)),
    # EleutherAI/gpt-j-6b (parallel attention and MLP under one LayerNorm, interleaved rotary on 64 of 256)
    "gpt-j-6b": ("gptj", dict(
        n_layer=28, n_embd=4096, n_head=16, rotary_dim=64, n_inner=None, n_positions=2048,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False, vocab_size=50400)),
    "gpt-j-tiny": ("gptj", dict(
        n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_positions=64, activation_function="gelu_new",
        layer_norm_epsilon=1e-5, tie_word_embeddings=False, vocab_size=64)),
    # google/gemma-3-1b-pt (text): per-head q/k norms, post-norms, 5 local layers (window 512, rope 1e4) per global
    # layer (rope 1e6), MQA, no softcaps
    "gemma-3-1b": ("gemma3", dict(
        num_hidden_layers=26, hidden_size=1152, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        intermediate_size=6912, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        rms_norm_eps=1e-6, sliding_window=512, sliding_window_pattern=6, max_position_embeddings=32768,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        tie_word_embeddings=True, vocab_size=262144)),
    "gemma-3-tiny": ("gemma3", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=16, rms_norm_eps=1e-6,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
        tie_word_embeddings=True, vocab_size=64)),
    # allenai/OLMo-2-0425-1B (no pre-norms, post-norms, q/k RMSNorm over all heads, untied unembedding)
    "olmo-2-1b": ("olmo2", dict(
        num_hidden_layers=16, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=8192, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=500000.0,
        max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False, vocab_size=100352)),
    "olmo-2-tiny": ("olmo2", dict(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, intermediate_size=64,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=500000.0, max_position_embeddings=64,
        tie_word_embeddings=False, vocab_size=64)),
}

#: GPT-2-style shape names accepted in a dict shape for any family (translated to its config fields).
_GPT2_STYLE = ("n_layer", "n_embd", "n_head", "n_inner", "n_positions")


class ModelLoadError(RuntimeError):
    """A model could not be loaded (unknown name offline, incomplete directory, ...)."""


@dataclass(frozen=True)
class ModelOrigin:
    """How a model was made: ``load_model(name)`` (an embedded name, ``random:<shape>@<seed>``, an
    absolute directory path or a HuggingFace name), or ``random_model(shape, seed, arch=arch)``.
    :meth:`make` makes the same model again (same weights) on another device or in another process."""

    name: str | None = None
    shape: Any = None
    seed: int = 0
    arch: str | None = None

    def make(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
        if self.name is not None:
            return load_model(self.name, device, dtype)
        return random_model(self.shape, self.seed, device, dtype, self.arch)

    def __str__(self) -> str:
        return self.name if self.name is not None else f"random_model({self.shape!r}, seed={self.seed}, arch={self.arch!r})"


_ORIGINS: "weakref.WeakKeyDictionary[Any, ModelOrigin]" = weakref.WeakKeyDictionary()


def origin_of(model: Any) -> ModelOrigin | None:
    """How ``model`` was made by :func:`load_model` / :func:`random_model`; None for other models."""
    try:
        return _ORIGINS.get(model)
    except TypeError:  # not weak-referenceable
        return None


def embedded_names() -> list[str]:
    """Names of the models shipped with eap-bench."""
    if not EMBEDDED_DIR.is_dir():
        return []
    return sorted(p.name for p in EMBEDDED_DIR.iterdir() if (p / "config.json").is_file())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def prepare_for_edges(bridge: Any) -> Any:
    """Compatibility mode with raw weights, edge hooks on, frozen, eval mode."""
    from eap.hooks import mark_without_edge_hooks

    bridge.enable_compatibility_mode(no_processing=True)
    missing = []
    for switch in (bridge.set_use_split_qkv_input, bridge.set_use_attn_result):
        try:
            switch(True)
        except NotImplementedError as exc:  # TransformerLens 4 has no such hooks for this family (GPT-J)
            missing.append(str(exc).split(".")[0])
    if missing:
        mark_without_edge_hooks(bridge, "; ".join(missing))
    bridge.set_use_hook_mlp_in(True)
    if getattr(getattr(bridge.original_model, "config", None), "attn_only", False):
        # eap-bench's attention-only models: MLPs removed (zero output weights), config says so;
        # TransformerLens keeps the MLP hooks, the edge graph has no MLP nodes.
        bridge.cfg.attn_only = True
    for p in bridge.parameters():
        p.requires_grad_(False)
    bridge.eval()
    return bridge


def _boot(source: str, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    with _quiet():
        bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype, **kwargs)
    return prepare_for_edges(bridge)


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars while booting."""
    old = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present
        verbosity = None
    try:
        yield
    finally:
        if verbosity is not None:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        if old is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = old


def _check_local_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a saved transformers model: config.json is missing")
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise ModelLoadError(
            f"{path} has no tokenizer (expected tokenizer.json, vocab.json or tokenizer.model): "
            "save one next to the model with tokenizer.save_pretrained(path)"
        )


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def random_model(
    shape: str | dict[str, Any] = "gpt2-small",
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    arch: str | None = None,
) -> Any:
    """A randomly initialised model of a named shape (see ``RANDOM_SHAPES``) or of a dict of
    config fields, built offline. Same seed -> same weights (whatever ``dtype``: weights are
    drawn in float32, then cast). The tokenizer is the embedded word-level IOI tokenizer, so
    ``eap.tasks.ioi`` works on it.

    ``arch`` names the family of a dict shape: 'gpt2' (default), 'gpt-neox', 'llama', 'mistral',
    'qwen2' or 'gemma2' (see ``eap.arch``). A dict may use the family's HuggingFace field names or
    GPT-2-style ones (``n_layer``, ``n_embd``, ``n_head``, ``n_inner``, ``n_positions``,
    ``vocab_size``). Grouped-query models are ungrouped as by ``load_model``.

    ``attn_only=True`` in a dict shape builds an attention-only model: the MLPs are removed (their
    output weights and biases are zero, so they add exactly nothing) and the config says
    ``attn_only``, so the edge graph has no MLP nodes. (TransformerLens 4.3's own attention-only
    models have no per-head q/k/v inputs.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eap.arch import family_named

    if isinstance(shape, str):
        if shape not in RANDOM_SHAPES:
            raise ModelLoadError(f"unknown random shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
        family_name, fields = RANDOM_SHAPES[shape]
        if arch is not None and family_named(arch).name != family_named(family_name).name:
            raise ModelLoadError(f"random shape {shape!r} is a {family_name} model, not {arch!r}")
        fields = dict(fields)
    else:
        family_name, fields = arch or "gpt2", dict(shape)
    attn_only = bool(fields.pop("attn_only", False))
    try:
        fam = family_named(family_name)
    except KeyError as exc:
        raise ModelLoadError(str(exc.args[0])) from exc
    gpt2_style = {"n_layer": fam.n_layers, "n_embd": fam.d_model, "n_head": fam.n_heads, "n_inner": fam.d_mlp,
                  "n_positions": fam.n_ctx}
    fields = {gpt2_style.get(k, k): v for k, v in fields.items()}
    if fields.get(fam.d_mlp) is None:
        fields[fam.d_mlp] = 4 * fields[fam.d_model]
    if fields[fam.d_mlp] == fields[fam.d_model]:
        raise ModelLoadError("square MLPs (d_mlp == d_model) are corrupted by TransformerLens 4.3; use another width")
    tokenizer = _word_tokenizer()
    fields["vocab_size"] = max(fields.get("vocab_size", 0), len(tokenizer))
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(fam.model_types[0], **fields, **special)
    if not getattr(config, "architectures", None):  # TransformerLens picks its adapter by this name (OLMo-2)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[fam.model_types[0]]]
    if attn_only:
        config.attn_only = True
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(seed)
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    bridge = wrap_hf_model(hf_model, tokenizer, device, dtype)
    if attn_only:
        with torch.no_grad():
            for block in bridge.blocks:  # the bridge's W_out / b_out are views of the HF weights
                block.mlp.W_out.zero_()
                if getattr(block.mlp, "b_out", None) is not None:
                    block.mlp.b_out.zero_()
    bridge = bridge.to(device)
    _ORIGINS[bridge] = ModelOrigin(shape=shape if isinstance(shape, str) else dict(shape), seed=int(seed), arch=arch)
    return bridge


def _ready_hf_model(hf_model: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Ungroup grouped-query attention (``eap.arch.ungroup_kv_heads``), cast the parameters (not
    the buffers: rotary frequencies stay float32, as HF keeps them) and move to ``device``."""
    from eap.arch import ungroup_kv_heads

    ungroup_kv_heads(hf_model)
    for p in hf_model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return hf_model.to(device).eval()


def _boot_pretrained(source: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Boot a saved model (directory or hub name); grouped-query models are loaded here and
    ungrouped first (the edge graph has q/k/v receivers per query head)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from eap.arch import UnsupportedModel, family_of

    with _quiet():
        config = AutoConfig.from_pretrained(source)
    kwargs: dict[str, Any] = {}
    tokenizer = _saved_generic_tokenizer(source)
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    try:
        fam = family_of(str(getattr(config, "model_type", "")))
    except UnsupportedModel:
        fam = None
    grouped = (
        fam is not None and fam.n_kv_heads is not None
        and (getattr(config, fam.n_kv_heads, None) or 0) not in (0, getattr(config, fam.n_heads))
    )
    if not grouped:
        return _boot(source, device, dtype, **kwargs)
    with _quiet():
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager")
    return _boot(source, device, dtype, hf_model=_ready_hf_model(hf_model, device, dtype), **kwargs).to(device)


def _saved_generic_tokenizer(source: str) -> Any:
    """A directory's tokenizer saved as a generic fast tokenizer (like the embedded word-level
    one), loaded as such: ``AutoTokenizer`` would swap in the family's own class for some
    families (Qwen2), which re-splits the text differently. None for anything else."""
    path = Path(source) / "tokenizer_config.json"
    if not path.is_file():
        return None
    import json

    from transformers import PreTrainedTokenizerFast

    if json.loads(path.read_text()).get("tokenizer_class") not in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return None
    return PreTrainedTokenizerFast.from_pretrained(source, add_bos_token=True)  # as TransformerLens sets it up


def _word_tokenizer():
    from eap.tasks.ioi import word_level_tokenizer

    return word_level_tokenizer()


def load_model(
    name_or_path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """Load a model ready for edge work (see module docstring for what names mean).

    ``device=None`` means CUDA when available, else CPU; ``dtype=None`` means float32.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    name = str(name_or_path)
    if name.startswith("random:"):
        shape, _, seed = name[len("random:") :].partition("@")
        model = random_model(shape, int(seed or 0), device, dtype)
        _ORIGINS[model] = ModelOrigin(name=name)
        return model
    if name in embedded_names():
        path = EMBEDDED_DIR / name
        _check_local_dir(path)
        model = _boot_pretrained(str(path), device, dtype)
        _ORIGINS[model] = ModelOrigin(name=name)
        return model
    path = Path(name).expanduser()
    if path.is_dir():
        _check_local_dir(path)
        model = _boot_pretrained(str(path.resolve()), device, dtype)
        _ORIGINS[model] = ModelOrigin(name=str(path.resolve()))
        return model
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name} is not a model directory")
    if not _is_cached(name) and not _hub_reachable():
        raise ModelLoadError(
            f"unknown model {name!r}: not an embedded model, not a local directory, not in the "
            f"HuggingFace cache, and the hub is unreachable (offline). Embedded models: "
            f"{', '.join(embedded_names()) or '(none)'}; random shapes: "
            f"{', '.join('random:' + s for s in RANDOM_SHAPES)}"
        )
    try:
        model = _boot_pretrained(name, device, dtype)
    except OSError as exc:  # a miss in the cache while offline, a typo online, ...
        raise ModelLoadError(
            f"could not load {name!r} from HuggingFace: {exc}. Embedded models: {', '.join(embedded_names())}"
        ) from exc
    _ORIGINS[model] = ModelOrigin(name=name)
    return model


def wrap_hf_model(hf_model: Any, tokenizer: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """A model ready for edge work around a transformers model in memory and its tokenizer (the
    weights are used as they are; grouped-query attention is ungrouped)."""
    device = torch.device(device)
    hf_model = _ready_hf_model(hf_model, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return _boot(tmp, device, dtype, hf_model=hf_model, tokenizer=_saved_generic_tokenizer(tmp))


def portable(model: Any) -> dict[str, Any]:
    """What another process needs to make the same model with :func:`from_portable`: the
    transformers config, the transformers weights (CPU copies) and the tokenizer. Plain picklable
    objects, unlike the bridge itself (a bridge that has run carries TransformerLens state whose
    unpickled copy computes other last bits)."""
    hf_model, tokenizer = getattr(model, "original_model", None), getattr(model, "tokenizer", None)
    if hf_model is None or tokenizer is None:
        raise ModelLoadError(f"cannot send a {type(model).__name__} to another process: it needs a transformers "
                             "model (original_model) and a tokenizer, like the models of eap.load_model")
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():  # the names of the transformers model's own weights
        names = set(AutoModelForCausalLM.from_config(hf_model.config).state_dict())
    state = {}
    for key, value in hf_model.state_dict().items():
        # the bridge wraps transformers modules: their weights appear under '._original_component'
        plain = key.replace("._original_component", "")
        if plain in names and plain not in state:
            state[plain] = value.detach().cpu()
    missing = sorted(names - set(state))
    if missing:
        raise ModelLoadError(f"cannot find the transformers weights {missing[:5]} in the model")
    return {"config": hf_model.config, "state": state, "tokenizer": tokenizer}


def from_portable(data: dict[str, Any], device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Any:
    """The model :func:`portable` described, on ``device`` in ``dtype`` (default: the weights')."""
    from transformers import AutoModelForCausalLM

    state = data["state"]
    dtype = dtype or next(iter(state.values())).dtype
    device = torch.device(device) if device is not None else default_device()
    with _quiet():
        hf_model = AutoModelForCausalLM.from_config(data["config"], dtype=dtype)
    hf_model.load_state_dict(state, strict=True)
    return wrap_hf_model(hf_model, data["tokenizer"], device, dtype).to(device)


def describe(model: Any) -> dict[str, Any]:
    """Shape facts of a model, for reports (``n_key_value_heads``: before ungrouping)."""
    from eap.arch import UnsupportedModel, arch_spec

    cfg = model.cfg
    try:
        spec = arch_spec(model)
        family, kv = spec.family, spec.grouped_kv_heads or spec.n_kv_heads
    except (UnsupportedModel, AttributeError, TypeError, ValueError):
        family, kv = getattr(cfg, "architecture", None), getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    return {
        "family": family,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": kv,
        "d_model": cfg.d_model,
        "d_mlp": getattr(cfg, "d_mlp", None),
        "d_vocab": cfg.d_vocab,
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": str(model_device(model)),
        "dtype": str(model_dtype(model)).replace("torch.", ""),
    }
