"""bagel_kernels: batch-invariant kernels for BAGEL, each beside its plain-torch reference."""
from ._dispatch import resolve_backend
from .options import KernelOptions, default_options
from .attention import check_block_tables, joint_attention, token_alignment, prefill_visible_end
from .attention_types import AttentionOutput, AttentionState, ContiguousKV, PagedKV
from .kv_layout import LAYOUTS, PagedKVView, allocate_kv_cache, normalize_kv_cache
from .linear import ROW_TILE, ExpertSegments, invariant_linear_reference
from .routed_linear import invariant_linear, routed_linear, routed_linear_reference
from .qk_norm_rope import qk_norm_rope
from .lse_merge import merge_attention_partials
from .norms import rms_norm_reference, routed_rms_norm, routed_rms_norm_fp8
from .rope import apply_rope_reference, rope_cos_sin
from .fp8_quant import QuantizedRows, quantize_channels, quantize_rows
from .routed_linear_fp8 import quantize_activation_rows, require_fp8_support, routed_gemm_fp8, routed_linear_fp8

__all__ = [
    "KernelOptions", "default_options", "resolve_backend", "joint_attention", "check_block_tables", "token_alignment", "prefill_visible_end", "AttentionOutput",
    "AttentionState", "ContiguousKV", "PagedKV", "LAYOUTS", "PagedKVView", "allocate_kv_cache",
    "normalize_kv_cache", "ROW_TILE", "ExpertSegments", "invariant_linear", "invariant_linear_reference",
    "routed_linear", "routed_linear_reference", "routed_rms_norm", "qk_norm_rope",
    "merge_attention_partials", "rms_norm_reference", "apply_rope_reference", "rope_cos_sin",
    "quantize_rows", "quantize_channels", "routed_gemm_fp8", "routed_linear_fp8", "quantize_activation_rows",
    "require_fp8_support", "routed_rms_norm_fp8", "QuantizedRows",
]
