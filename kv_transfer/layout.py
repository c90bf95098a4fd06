"""Block layout descriptor: what one KV block looks like in memory, exchanged in the handshake.

The engine's KV cache is one tensor per layer shaped `(2, num_blocks, block_size, num_kv_heads,
head_dim)` (vLLM's non-MLA FlashAttention layout). One block of one layer is therefore two
contiguous byte ranges, K at `[0, block]` and V at `[1, block]`, each `block_size * num_kv_heads *
head_dim * itemsize` bytes. Two engines can exchange blocks only if their layouts are
`compatible` (the number of blocks each side holds is not part of the layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Element sizes of the dtypes a KV cache may use, by their torch name without the "torch." prefix.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}

KV = 2  # K and V halves; fixed by the FlashAttention layout


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Shape of one KV block across all layers. Plain data; no torch dependency."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"BlockLayout.{name}: must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(
                f"BlockLayout.dtype: unknown dtype {self.dtype!r}; valid: {sorted(DTYPE_SIZES)}"
            )

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def half_bytes(self) -> int:
        """Bytes of the K (or V) half of one block in one layer: one contiguous range."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block_per_layer(self) -> int:
        return KV * self.half_bytes

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block occupies over all layers (what a transfer moves per block)."""
        return self.num_layers * self.bytes_per_block_per_layer

    def tensor_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        """Shape of one layer's KV tensor holding `num_blocks` blocks."""
        return (KV, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def compatible(self, other: BlockLayout) -> str | None:
        """None when blocks can be copied byte for byte between the two; else the reason."""
        diffs = [
            f"{name}: {getattr(self, name)!r} != {getattr(other, name)!r}"
            for name in ("num_layers", "num_kv_heads", "head_dim", "dtype", "block_size")
            if getattr(self, name) != getattr(other, name)
        ]
        return "layout mismatch: " + ", ".join(diffs) if diffs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "block_size": self.block_size,
        }

    @classmethod
    def from_dict(cls, data: Any) -> BlockLayout:
        """Parse a handshake dict strictly: exact keys, exact types. Raises ValueError."""
        if not isinstance(data, dict):
            raise ValueError(f"BlockLayout: expected a dict, got {type(data).__name__}")
        expected = {"num_layers", "num_kv_heads", "head_dim", "dtype", "block_size"}
        if set(data) != expected:
            raise ValueError(f"BlockLayout: keys {sorted(map(str, data))} != {sorted(expected)}")
        if not isinstance(data["dtype"], str):
            raise ValueError("BlockLayout.dtype: must be a str")
        return cls(
            num_layers=data["num_layers"],
            num_kv_heads=data["num_kv_heads"],
            head_dim=data["head_dim"],
            dtype=data["dtype"],
            block_size=data["block_size"],
        )
