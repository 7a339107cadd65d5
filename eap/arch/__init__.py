"""The architecture adapter: the one place that knows how a model family computes a block.

A *family* (GPT-2, GPT-NeoX/Pythia, GPT-J, Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma-2)
is a short declarative :class:`Family`: the names of its HuggingFace config fields and the facts
of its block (norm, positions, attention, MLP, block layout, read-out). Users describe families
eap-bench does not know with :func:`register_family` or an ``eap_bench.families`` entry point
(``eap.arch.family``); :meth:`Arch.verify` checks any description against the model's own
forward on first use. Generic code reads it:

* :func:`arch_spec` turns a HuggingFace config (a ``PretrainedConfig`` or a plain dict, no
  weights) or a loaded model into an :class:`ArchSpec` of plain numbers; :func:`graph_spec` turns
  that into the edge graph's :class:`~eap.graph.GraphSpec` (q/k/v receivers per *query* head).
* :func:`check_edges` refuses, with :class:`UnsupportedModel` naming the feature, models whose
  edge graph would be wrong (grouped k/v hooks, per-head outputs that a norm mixes, families not
  described here). Attribution and exact patching call it through ``eap.hooks.check_edge_hooks``.
* :class:`Readout` is the final norm + the selected columns of the unembedding (+ any final
  logit softcap), shared by ``eap.attribute.select_logits`` and validation's block runner.
* :class:`Arch` holds a model's weights (views of the bridge's own tensors, read once through
  the TransformerLens 4 bridge's public API: per-block ``W_Q``/``W_in``/..., the norm modules'
  ``weight``/``eps``, the HF rotary module and config via ``original_model`` /
  ``original_component``) and computes norms, rotary positions, attention (scaling, softcap,
  sliding windows), MLPs (plain or gated) and whole blocks (sequential, parallel, with
  post-norms) in plain torch, so exact patching can start anywhere in the residual stream.
  :meth:`Arch.verify` checks it against the bridge's own forward.

Grouped-query attention
-----------------------
Edge graphs follow MIB/EAP-IG: every query head has its own q, k and v receiver. ``eap.load_model``
*ungroups* a GQA model (:func:`ungroup_kv_heads`): each query head gets its own copy of its group's
key/value projection (``repeat_interleave`` of the weights), which computes the same function,
so the bridge's ``hook_k_input`` / ``hook_v_input`` have one slice per query head. Patching
``a3.h5<k>`` then means: the key input *seen by query head 5 only* is patched; the other heads
of its KV group still read the clean key input. Cost: the k/v projections become
``n_heads / n_kv_heads`` times larger (about +10% FLOPs on Llama-3.1-8B). Under a k norm over
all key heads (OLMo-2-32B) the norm's weight is repeated too, and a k receiver's statistics are
still those of the original key heads (:mod:`eap.arch.mixednorm`).

Numerics follow the bridge (which follows HF): RMSNorm statistics and (for Llama-like families)
the attention softmax are computed in float32 whatever the model dtype, then cast back.
The read-out is computed in float32 at least (a half-precision model's logits are not rounded
to half precision before the metric).
"""

from eap.arch.blocks import Arch, Layer
from eap.arch.errors import UnsupportedModel
from eap.arch.family import (
    ENTRY_POINT_GROUP, FAMILIES, GEMMA, GEMMA2, GEMMA3, GPT2, GPT_NEOX, GPTJ, LLAMA, MISTRAL, OLMO2, PHI3, QWEN2, QWEN3,
    Family, family_named, family_of, load_entry_points, register_family, registered_families, unregister_family,
)
from eap.arch.norm import Norm, NormBackward
from eap.arch.readout import Readout
from eap.arch.rotary import apply_rotary
from eap.arch.spec import ArchSpec, arch_spec, check_edges, graph_spec
from eap.arch.ungroup import ungroup_kv_heads

__all__ = [
    "ENTRY_POINT_GROUP", "Arch", "ArchSpec", "FAMILIES", "Family", "GEMMA", "GEMMA2", "GEMMA3", "GPT2", "GPTJ", "GPT_NEOX",
    "LLAMA", "Layer", "MISTRAL", "Norm", "NormBackward", "OLMO2", "PHI3", "QWEN2", "QWEN3", "Readout", "UnsupportedModel",
    "apply_rotary", "arch_spec", "check_edges", "family_named", "family_of", "graph_spec", "load_entry_points", "register_family",
    "registered_families", "ungroup_kv_heads", "unregister_family",
]
