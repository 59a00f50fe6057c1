"""Low-level ops shared by every model. Imports nothing else from the package."""
from big_vision_like.ops import cpu_gemm
from big_vision_like.ops.attention import IMPLEMENTATIONS, dot_product_attention

__all__ = ["IMPLEMENTATIONS", "cpu_gemm", "dot_product_attention"]
