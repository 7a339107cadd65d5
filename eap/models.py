"""Loading models ready for edge work (TransformerLens 4 ``TransformerBridge``).

``load_model`` accepts
  (a) the name of an embedded model (``toy-gpt2-2l``, ...; shipped in ``eap/embedded/``),
  (b) ``random:<shape>`` or ``random:<shape>@<seed>``: a randomly initialised GPT-2 of a named
      shape (``gpt2-small``, ``gpt2-medium``, ...), built offline, seedable, with the embedded
      word-level IOI tokenizer,
  (c) a local directory with a transformers model + tokenizer saved with ``save_pretrained``,
  (d) any HuggingFace name TransformerLens supports (downloads when online).

Every model comes back in compatibility mode with raw weights (``no_processing=True``: no
LayerNorm folding or centering, like the seed's ``fold_ln=False``), with split q/k/v inputs,
per-head results and ``hook_mlp_in`` switched on, parameters frozen, in eval mode.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

import torch

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
DEFAULT_MODEL = "toy-gpt2-4l"

#: Named shapes for randomly initialised GPT-2 models (GPT-2 naming: n_layer, n_embd, n_head).
RANDOM_SHAPES: dict[str, dict[str, int]] = {
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, vocab_size=50257, n_positions=1024),
    "gpt2-tiny": dict(n_layer=2, n_embd=32, n_head=4, vocab_size=512, n_positions=64),
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded (unknown name offline, incomplete directory, ...)."""


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
    bridge.enable_compatibility_mode(no_processing=True)
    bridge.set_use_split_qkv_input(True)
    bridge.set_use_attn_result(True)
    bridge.set_use_hook_mlp_in(True)
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
    shape: str | dict[str, int] = "gpt2-small",
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    arch: str = "gpt2",
) -> Any:
    """A randomly initialised model of a named shape (see ``RANDOM_SHAPES``) or of a dict of
    GPT-2-style fields (``n_layer``, ``n_embd``, ``n_head``, ``n_inner``, ``n_positions``,
    ``vocab_size``), built offline. Same seed -> same weights. The tokenizer is the embedded
    word-level IOI tokenizer, so ``eap.tasks.ioi`` works on it.

    ``arch='gpt2'`` (default) builds a GPT-2; ``arch='gpt-neox'`` builds a Pythia-style model of
    the same shape (parallel attention/MLP, rotary positions), for architecture coverage."""
    if isinstance(shape, str):
        if shape not in RANDOM_SHAPES:
            raise ModelLoadError(f"unknown random shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
        fields = dict(RANDOM_SHAPES[shape])
    else:
        fields = dict(shape)
    fields.setdefault("n_inner", 4 * fields["n_embd"])
    if fields["n_inner"] == fields["n_embd"]:
        raise ModelLoadError("square MLPs (n_inner == n_embd) are corrupted by TransformerLens 4.3; use another width")
    tokenizer = _word_tokenizer()
    fields["vocab_size"] = max(fields.get("vocab_size", 0), len(tokenizer))
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "gpt2":
        from transformers import GPT2Config as Config, GPT2LMHeadModel as Model

        config = Config(**fields, **special)
    elif arch == "gpt-neox":
        from transformers import GPTNeoXConfig as Config, GPTNeoXForCausalLM as Model

        config = Config(
            vocab_size=fields["vocab_size"], hidden_size=fields["n_embd"], num_hidden_layers=fields["n_layer"],
            num_attention_heads=fields["n_head"], intermediate_size=fields["n_inner"],
            max_position_embeddings=fields.get("n_positions", 2048), use_parallel_residual=True, **special,
        )
    else:
        raise ModelLoadError(f"unknown architecture {arch!r}; use 'gpt2' or 'gpt-neox'")
    config.pad_token_id = tokenizer.pad_token_id
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf_model = Model(config)
    hf_model = hf_model.to(dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bridge = _boot(tmp, device, dtype, hf_model=hf_model)
    bridge.to(device)
    return bridge


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
        return random_model(shape, int(seed or 0), device, dtype)
    if name in embedded_names():
        path = EMBEDDED_DIR / name
        _check_local_dir(path)
        return _boot(str(path), device, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        _check_local_dir(path)
        return _boot(str(path.resolve()), device, dtype)
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
        return _boot(name, device, dtype)
    except OSError as exc:  # a miss in the cache while offline, a typo online, ...
        raise ModelLoadError(
            f"could not load {name!r} from HuggingFace: {exc}. Embedded models: {', '.join(embedded_names())}"
        ) from exc


def describe(model: Any) -> dict[str, Any]:
    """Shape facts of a model, for reports."""
    cfg = model.cfg
    return {
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_mlp": getattr(cfg, "d_mlp", None),
        "d_vocab": cfg.d_vocab,
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": str(model_device(model)),
        "dtype": str(model_dtype(model)).replace("torch.", ""),
    }
