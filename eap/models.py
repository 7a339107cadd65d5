"""Loading models ready for edge work (TransformerLens 4 ``TransformerBridge``).

``load_model`` accepts
  (a) the name of an embedded model (``toy-gpt2-2l``, ...; shipped in ``eap/embedded/``),
  (b) ``random:<shape>`` or ``random:<shape>@<seed>``: a randomly initialised model of a named
      shape (``gpt2-small``, ``llama-3.2-1b``, ``qwen2.5-0.5b``, ``pythia-160m``, ``gemma-2-2b``,
      ``qwen3-0.6b``, ``phi-3-mini``, ``gemma-2b``, ``gpt-j-6b``,
      and a ``-tiny`` variant of each family; see ``RANDOM_SHAPES``), built offline, seedable,
      with the embedded word-level IOI tokenizer,
  (c) a local directory with a transformers model saved with ``save_pretrained``, and its
      tokenizer if it has one (without one, ``model.tokenizer`` is None: build tasks from token
      ids with ``eap.Task``; the built-in tasks, which need text, raise a ``TaskError``),
  (d) any HuggingFace name TransformerLens supports (downloads when online).

Every model comes back in compatibility mode with raw weights (``no_processing=True``: no
LayerNorm folding or centering, like the seed's ``fold_ln=False``), with split q/k/v inputs,
per-head results and ``hook_mlp_in`` switched on, parameters frozen, in eval mode.
Grouped-query models (Llama, Qwen2, Mistral, Gemma-2) come back *ungrouped*: every query head
has its own copy of its group's key/value projection (``eap.arch.ungroup_kv_heads``; the same
function), so q, k and v inputs exist per query head as in MIB and EAP-IG. (``load_model``
ungroups the transformers model it makes itself; ``wrap_hf_model`` ungroups the one you pass, in
place.) Loading is quiet: transformers' and TransformerLens' messages are silenced for the
duration of the call only.

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

from eap.random_shapes import RANDOM_SHAPES  # the table of named random shapes (eap/random_shapes.py)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
DEFAULT_MODEL = "toy-gpt2-4l"

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


def _to(bridge: Any, device: torch.device) -> Any:
    """``bridge.to(device)`` without TransformerLens' "Moving model to device" print."""
    return bridge.to(device, print_details=False)


def _boot(source: str, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    with _quiet():
        bridge = TransformerBridge.boot_transformers(source, device=device, dtype=dtype, **kwargs)
    return prepare_for_edges(bridge)


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and the hub's progress bars and warnings, and TransformerLens'
    prints, for the duration of one of eap's own calls; the process's settings are restored
    exactly as they were (nothing here touches ``os.environ``)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_bar, hub_bars_off = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if hf_bar:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


def _check_local_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a saved transformers model: config.json is missing")


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def _without_tokenizer(source: str) -> bool:
    """A local model directory that holds no tokenizer (see :data:`TOKENIZER_FILES`)."""
    path = Path(source)
    return path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES)


def _drop_tokenizer(bridge: Any) -> Any:
    """``bridge.tokenizer = None``: TransformerLens would otherwise make up an empty tokenizer, on
    which built-in tasks would tokenize every word to nothing. Tasks that need text then raise a
    ``TaskError`` saying a tokenizer is needed."""
    bridge.tokenizer = None
    return bridge


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
    except ValueError:  # not a valid repository id (huggingface_hub's HFValidationError)
        return False
    return isinstance(hit, str)


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
    bridge = _to(bridge, device)
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
        bridge = _boot(source, device, dtype, **kwargs)
    else:
        with _quiet():
            hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="eager")
        bridge = _to(_boot(source, device, dtype, hf_model=_ready_hf_model(hf_model, device, dtype), **kwargs), device)
    return _drop_tokenizer(bridge) if _without_tokenizer(source) else bridge


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

    ``device=None`` means CUDA when available, else CPU; ``dtype=None`` means float32. Quiet: the
    messages of transformers and TransformerLens are silenced for this call only. Grouped-query
    models are ungrouped in the transformers model loaded here (nothing you hold is changed; see
    :func:`wrap_hf_model` for a model you pass in). A directory without a tokenizer loads with
    ``model.tokenizer = None``.
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
    """A model ready for edge work around a transformers model in memory and its tokenizer (None:
    no tokenizer; tasks are then built from token ids). The weights are used as they are.

    Grouped-query attention is ungrouped *in place*: ``hf_model`` itself (the object you pass)
    gets per-query-head key/value projections and a config saying so (``eap_grouped_kv_heads``
    holds the original count). Pass a copy (``copy.deepcopy``) to keep yours grouped.
    ``load_model`` and ``random_model`` make their own transformers models, so nothing you hold is
    changed by them."""
    device = torch.device(device)
    hf_model = _ready_hf_model(hf_model, device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.config.save_pretrained(tmp)
        if tokenizer is None:
            return _drop_tokenizer(_boot(tmp, device, dtype, hf_model=hf_model))
        tokenizer.save_pretrained(tmp)
        return _boot(tmp, device, dtype, hf_model=hf_model, tokenizer=_saved_generic_tokenizer(tmp))


def portable(model: Any) -> dict[str, Any]:
    """What another process needs to make the same model with :func:`from_portable`: the
    transformers config, the transformers weights (CPU copies) and the tokenizer. Plain picklable
    objects, unlike the bridge itself (a bridge that has run carries TransformerLens state whose
    unpickled copy computes other last bits)."""
    hf_model, tokenizer = getattr(model, "original_model", None), getattr(model, "tokenizer", None)
    if hf_model is None:
        raise ModelLoadError(f"cannot send a {type(model).__name__} to another process: it needs a transformers "
                             "model (original_model), like the models of eap.load_model")
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():  # the names of the transformers model's own weights
        names = set(AutoModelForCausalLM.from_config(hf_model.config).state_dict())
    state = {}
    for key, value in _plain_state(hf_model):
        if key in names and key not in state:
            state[key] = value.detach().cpu()
    missing = sorted(names - set(state))
    if missing:
        raise ModelLoadError(f"cannot find the transformers weights {missing[:5]} in the model")
    return {"config": hf_model.config, "state": state, "tokenizer": tokenizer}


def _plain_state(module: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of a module's parameters and buffers under the transformers model's own
    names: a TransformerLens bridge component wraps a transformers module as its public
    ``original_component``, whose path segment is dropped here."""
    out = [(prefix + n, t) for n, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))]
    wrapped = getattr(module, "original_component", None)
    for name, child in module.named_children():
        path = prefix if (wrapped is not None and child is wrapped) else f"{prefix}{name}."
        out.extend(_plain_state(child, path))
    return out


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
    return _to(wrap_hf_model(hf_model, data["tokenizer"], device, dtype), device)


def describe(model: Any) -> dict[str, Any]:
    """Shape facts of a model, for reports.

    ``n_key_value_heads`` is the count before ungrouping. ``n_params`` is the checkpoint's
    parameter count (the transformers model as saved: grouped key/value projections, tied
    embeddings once); ``n_params_ungrouped`` what the model holds after ``load_model`` ungrouped
    its key/value heads (equal for models that were never grouped)."""
    from eap.arch import UnsupportedModel, arch_spec

    cfg = model.cfg
    try:
        spec = arch_spec(model)
        family, kv = spec.family, spec.grouped_kv_heads or spec.n_kv_heads
    except (UnsupportedModel, AttributeError, TypeError, ValueError):
        family, kv = getattr(cfg, "architecture", None), getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    n_params, n_ungrouped = checkpoint_params(model)
    return {
        "family": family,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": kv,
        "d_model": cfg.d_model,
        "d_mlp": getattr(cfg, "d_mlp", None),
        "d_vocab": cfg.d_vocab,
        "n_params": n_params,
        "n_params_ungrouped": n_ungrouped,
        "device": str(model_device(model)),
        "dtype": str(model_dtype(model)).replace("torch.", ""),
    }


def checkpoint_params(model: Any) -> tuple[int, int]:
    """(parameters of the checkpoint, parameters after ungrouping the key/value heads).

    Counted on a meta-device copy of the transformers model built from its config (no memory),
    with the key/value head count the checkpoint had (``eap_grouped_kv_heads``, recorded by
    ``eap.arch.ungroup_kv_heads``). A model without a transformers ``original_model``: the sum over
    ``model.parameters()``, twice."""
    hf_config = getattr(getattr(model, "original_model", None), "config", None)
    if hf_config is None:
        n = sum(p.numel() for p in model.parameters())
        return n, n
    import copy

    from transformers import AutoModelForCausalLM

    from eap.arch import UnsupportedModel, family_of

    def count(config: Any) -> int:
        with torch.device("meta"), _quiet():
            return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    ungrouped = count(hf_config)
    grouped = getattr(hf_config, "eap_grouped_kv_heads", None)
    if not grouped:
        return ungrouped, ungrouped
    try:
        fam = family_of(str(getattr(hf_config, "model_type", "")))
    except UnsupportedModel:
        return ungrouped, ungrouped
    original = copy.deepcopy(hf_config)
    setattr(original, fam.n_kv_heads, int(grouped))
    return count(original), ungrouped
