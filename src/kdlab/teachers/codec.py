"""The compact storage codec of the offline teacher cache: sparse teacher rows as fixed-size bytes.

For every counted token position the cache keeps S distinct token ids (in [0, V)) with the
teacher's log-probabilities, plus `trailing` values not tied to a stored id (kdlab's cache: the
ground-truth token's log-probability when it is not among the ids, and the log of the remaining
"tail" mass). `Codec` turns such rows into one fixed-size row of uint8 per position and back,
vectorised in torch.

Bit layout of a row (fields concatenated, then zero bits up to a whole byte):

1. Ids, Elias–Fano, over the ids sorted ascending x_0 < … < x_{S−1}, with
   `l = max(0, floor(log2(V / S)))` low bits:
   a. low part, S·l bits: the l low bits of each x_i, i = 0 … S−1;
   b. high part, `S + ((V − 1) >> l) + 1` bits: a 1 at position `(x_i >> l) + i` for each i,
      0 elsewhere. Decoding reads the S one-positions pos_i in order: `x_i = ((pos_i − i) << l)
      | low_i`.
2. Values, (S + trailing)·b bits: the S log-probs in sorted-id order, then the trailing values,
   each as a b-bit level. Level 0 is probability 0 (log p = −inf, also for empty slots); levels
   1 … 2^b − 1 are uniform on [−R, 0]: level j ↔ −R + (j − 1)·δ, δ = R / (2^b − 2). A finite
   log p is clamped to [−R, 0] and rounded to the nearest level, so for log p in [−R, 0] the
   decoded value is within δ/2 (`max_log_error`) of the true one.

Bit order: LSB-first throughout. Bit k of a row is bit `k % 8` of byte `k // 8`, and a w-bit
number v occupies w consecutive row bits with its least significant bit first.

Sizes with one trailing value (bits → bytes per position; bytes per stored entry = bytes / S):

- V=151936, S=64, b=8: l=11; 704 + 139 + 520 = 1363 bits → 171 bytes (2.67 B/entry).
- V=151936, S=64, b=6 (`fitting_value_bits` at 2.5 B/entry; b=7 would take 1298 bits → 163
  bytes): 704 + 139 + 390 = 1233 bits → 155 bytes (2.42 B/entry).
- V=32000, S=64, b=8 (fits 2.5 B/entry): l=8; 512 + 189 + 520 = 1221 bits → 153 bytes.

kdlab's cache has two trailing values, b bits more: 172, 155 and 154 bytes for the three rows.

Error bound with the default R=16 nats: b=8 gives δ = 16/254 ≈ 0.063, so |error| ≤ 0.0315 in
log p (≈ 3% relative error in p); b=6 gives δ = 16/62 ≈ 0.258, |error| ≤ 0.129. Probabilities
below e^−16 ≈ 1.1e-7 are stored as e^−16.

Why Elias–Fano: a set of S ids out of V carries log2 C(V, S) bits of information, ≈ 12.6
bits/id for V=152k, S=64; Elias–Fano needs l + (high part)/S = 11 + 139/64 ≈ 13.2 bits/id, within
about 0.6 bit of that bound (a plain fixed-width id needs 18). Its size depends only on (V, S), so
every row has the same length, rows can be sliced from a flat array by index, and decoding is a
few whole-tensor operations with no per-position loop: byte gathers for the fixed-width fields
(`read_fields`) and one `nonzero` over the high parts (each row has exactly S ones, so the
result reshapes to `[N, S]`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

FORMAT = "elias-fano+log-levels/v1"
"""Name of this bit layout, stored in `Codec.to_dict` so that a changed layout is detected."""


def pack_bits(values: Tensor, width: int) -> Tensor:
    """Spread integers into their bits, LSB first.

    Args:
        values: `[N, M]` non-negative integers below `2**width`.
        width: bits per value, in [0, 63].

    Returns:
        `[N, M * width]` bool; bit j of `values[n, m]` is at `[n, m * width + j]`.
    """
    if not 0 <= width <= 63:
        raise ValueError(f"width must be in [0, 63], got {width}")
    values = values.long()
    if values.numel() and (values.min() < 0 or values.max() >= 1 << width):
        raise ValueError(
            f"values must lie in [0, 2**{width}), found [{values.min()}, {values.max()}]"
        )
    shifts = torch.arange(width, device=values.device)
    bits = (values.unsqueeze(-1) >> shifts) & 1  # [N, M, width]
    return bits.bool().reshape(values.shape[0], values.shape[1] * width)


def unpack_bits(bits: Tensor, width: int) -> Tensor:
    """Inverse of `pack_bits`.

    Args:
        bits: `[N, M * width]` bool (or 0/1 integers).
        width: bits per value, in [1, 63].

    Returns:
        `[N, M]` int64.
    """
    if not 1 <= width <= 63:
        raise ValueError(f"width must be in [1, 63], got {width}")
    if bits.shape[1] % width:
        raise ValueError(f"bit count {bits.shape[1]} is not a multiple of width {width}")
    weights = 1 << torch.arange(width, device=bits.device)  # [width] int64
    grouped = bits.reshape(bits.shape[0], bits.shape[1] // width, width).long()  # [N, M, width]
    return (grouped * weights).sum(-1)


def bits_to_bytes(bits: Tensor) -> Tensor:
    """Pack bit rows into bytes, LSB first, zero-padding each row to a whole byte.

    Args:
        bits: `[N, L]` bool.

    Returns:
        `[N, ceil(L / 8)]` uint8; bit k of a row is bit `k % 8` of byte `k // 8`.
    """
    n, length = bits.shape
    nbytes = -(-length // 8)
    padded = torch.zeros(n, nbytes * 8, dtype=torch.uint8, device=bits.device)
    padded[:, :length] = bits
    weights = 1 << torch.arange(8, dtype=torch.uint8, device=bits.device)  # [8]
    return (padded.view(n, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)


def bytes_to_bits(codes: Tensor, length: int) -> Tensor:
    """Inverse of `bits_to_bytes`: the first `length` bits of each row.

    Args:
        codes: `[N, B]` uint8.
        length: bits to return, at most `8 * B`.

    Returns:
        `[N, length]` bool.
    """
    if not 0 <= length <= 8 * codes.shape[1]:
        raise ValueError(f"length must be in [0, {8 * codes.shape[1]}], got {length}")
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    bits = (codes.unsqueeze(-1) >> shifts) & 1  # [N, B, 8]
    return bits.view(codes.shape[0], 8 * codes.shape[1])[:, :length].bool()


def _field_bytes(starts: Tensor, width: int) -> tuple[Tensor, Tensor, int]:
    """Byte index `[..., M, span]` and in-byte shift `[..., M]` of w-bit fields at bit `starts`."""
    span = (7 + width + 7) // 8  # bytes a field can touch, whatever its shift
    index = (starts >> 3).unsqueeze(-1) + torch.arange(span, device=starts.device)
    return index, starts & 7, span


def write_fields(out: Tensor, values: Tensor, starts: Tensor, width: int) -> None:
    """Add w-bit fields into byte rows in place (LSB first, as `pack_bits` + `bits_to_bytes`).

    Fields are added byte by byte, so they must not overlap each other or bits already set in
    `out` (then adding is OR-ing). Loops only over the few bytes a field can touch.

    Args:
        out: `[N, B]` uint8 rows, written in place.
        values: `[N, M]` non-negative integers below `2**width`.
        starts: `[M]` (shared by all rows) or `[N, M]` bit offset of each field; every field
            must end within the row.
        width: bits per field, in [1, 48].
    """
    if not 1 <= width <= 48:
        raise ValueError(f"width must be in [1, 48], got {width}")
    index, shift, span = _field_bytes(starts.long(), width)
    index = index.clamp(max=out.shape[1] - 1).expand(*values.shape, span)  # [N, M, span]
    words = values.long() << shift  # [N, M]; bytes past a field's end are 0, so clamping is safe
    for j in range(span):
        out.scatter_add_(1, index[..., j], ((words >> (8 * j)) & 255).to(torch.uint8))


def read_fields(codes: Tensor, starts: Tensor, width: int) -> Tensor:
    """Read w-bit fields from byte rows (LSB first); inverse of `write_fields`.

    Args:
        codes: `[N, B]` uint8.
        starts: `[M]` (shared by all rows) or `[N, M]` bit offset of each field.
        width: bits per field, in [1, 48].

    Returns:
        `[N, M]` int64.
    """
    if not 1 <= width <= 48:
        raise ValueError(f"width must be in [1, 48], got {width}")
    n, m = codes.shape[0], starts.shape[-1]
    index, shift, span = _field_bytes(starts.long(), width)
    index = index.clamp(max=codes.shape[1] - 1).expand(n, m, span).reshape(n, m * span)
    gathered = codes.gather(1, index).view(n, m, span).long()  # [N, M, span]
    words = gathered[..., 0]
    for j in range(1, span):
        words = words | (gathered[..., j] << (8 * j))
    return (words >> shift) & ((1 << width) - 1)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise ValueError unless `value` is an int in [low, high] (no upper bound for None)."""
    valid = f"[{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Codec.{name} must be an int {valid}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(
            f"Codec.{name} must be {'in ' if high is not None else ''}{valid}, got {value}"
        )


@dataclass(frozen=True)
class Codec:
    """Fixed-size byte rows for sparse teacher signals (layout in the module docstring).

    Attributes:
        vocab: V, the vocabulary size (ids lie in [0, V)), >= 1.
        slots: S, ids stored per position, 1 <= S <= V.
        value_bits: b, bits per stored log-prob, in [2, 8].
        log_floor: R > 0: log-probs are stored on [−R, 0]; smaller ones as −R.
        trailing: values per row after the S slot values, not tied to an id, >= 0.
    """

    vocab: int
    slots: int
    value_bits: int = 8
    log_floor: float = 16.0
    trailing: int = 1

    def __post_init__(self) -> None:
        _check_int("vocab", self.vocab, 1)
        _check_int("slots", self.slots, 1, self.vocab)
        _check_int("value_bits", self.value_bits, 2, 8)
        _check_int("trailing", self.trailing, 0)
        r = self.log_floor
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < math.inf:
            raise ValueError(f"Codec.log_floor must be a finite number > 0, got {r!r}")

    @property
    def low_bits(self) -> int:
        """l = max(0, floor(log2(V / S))), the Elias–Fano low bits per id."""
        return (self.vocab // self.slots).bit_length() - 1  # floor(log2 x) = floor(log2 floor x)

    @property
    def _high_length(self) -> int:
        """Length of the Elias–Fano high-part bitvector."""
        return self.slots + ((self.vocab - 1) >> self.low_bits) + 1

    @property
    def _high_offset(self) -> int:
        """Bit offset of the high part (after the S·l low bits)."""
        return self.slots * self.low_bits

    @property
    def _value_offset(self) -> int:
        """Bit offset of the S + trailing value levels (after the ids)."""
        return self._high_offset + self._high_length

    @property
    def bits_per_position(self) -> int:
        """Bits of one row before padding: low part + high part + values."""
        return self._value_offset + self.num_values * self.value_bits

    @property
    def num_values(self) -> int:
        """Values per row: S slot values, then the trailing ones."""
        return self.slots + self.trailing

    @property
    def bytes_per_position(self) -> int:
        """Bytes of one stored row, `ceil(bits_per_position / 8)`."""
        return -(-self.bits_per_position // 8)

    @property
    def step(self) -> float:
        """δ = R / (2^b − 2), the spacing of the value levels."""
        return self.log_floor / ((1 << self.value_bits) - 2)

    @property
    def max_log_error(self) -> float:
        """δ / 2: bound on |decoded − true| for log p in [−R, 0]."""
        return self.step / 2

    def encode(self, ids: Tensor, log_probs: Tensor) -> Tensor:
        """Rows of (ids, log-probs) to byte rows.

        Args:
            ids: `[N, S]` integers, distinct within a row, in [0, V), any order.
            log_probs: `[N, S + trailing]` float: the log-prob of each id (same order as `ids`),
                then the trailing values. −inf is stored exactly; NaN and +inf are rejected.

        Returns:
            `[N, bytes_per_position]` uint8. Each row is sorted by id; values follow their ids.
        """
        self._check_inputs(ids, log_probs)
        ids, order = ids.long().sort(dim=1)  # [N, S]
        self._check_ids(ids)
        s = self.slots
        values = torch.cat([log_probs[:, :s].gather(1, order), log_probs[:, s:]], dim=1)
        levels = self._quantise(values)  # [N, S + trailing]
        n, s, low, b = ids.shape[0], self.slots, self.low_bits, self.value_bits
        codes = torch.zeros(n, self.bytes_per_position, dtype=torch.uint8, device=ids.device)
        slot = torch.arange(self.num_values, device=ids.device)  # [S + trailing]
        if low:
            write_fields(codes, ids & ((1 << low) - 1), low * slot[:s], low)
        write_fields(codes, torch.ones_like(ids), self._high_offset + (ids >> low) + slot[:s], 1)
        write_fields(codes, levels, self._value_offset + b * slot, b)
        return codes

    def decode(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Byte rows back to (ids, log-probs).

        Args:
            codes: `[N, bytes_per_position]` uint8, as made by `encode`.

        Returns:
            ids `[N, S]` int64 ascending per row, and log_probs `[N, S + trailing]` float32 (the
            ids' values, then the trailing values), −inf where the level is 0.
        """
        if (
            codes.dtype != torch.uint8
            or codes.dim() != 2
            or codes.shape[1] != self.bytes_per_position
        ):
            raise ValueError(
                f"codes must be uint8 [N, {self.bytes_per_position}], "
                f"got {codes.dtype} {list(codes.shape)}"
            )
        slot = torch.arange(self.num_values, device=codes.device)  # [S + trailing]
        levels = read_fields(codes, self._value_offset + self.value_bits * slot, self.value_bits)
        return self._decode_ids(codes), self._level_values(codes.device)[levels]

    def _decode_ids(self, codes: Tensor) -> Tensor:
        """Elias–Fano ids `[N, S]` int64, ascending per row, from byte rows `[N, B]`."""
        n, s, low = codes.shape[0], self.slots, self.low_bits
        first, stop = self._high_offset, self._value_offset
        high_bytes = codes[:, first // 8 : -(-stop // 8)]  # the bytes the high part touches
        high = bytes_to_bits(high_bytes, stop - first // 8 * 8)[:, first % 8 :]  # [N, high_length]
        ones = high.nonzero()[:, 1]  # row-major: each row's one-positions in order
        if ones.numel() != n * s:
            raise ValueError(f"corrupt codes: {ones.numel()} ids in {n} rows, expected {s} a row")
        slot = torch.arange(s, device=codes.device)
        ids = (ones.view(n, s) - slot) << low  # [N, S]
        if low:
            ids |= read_fields(codes, low * slot, low)
        return ids

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (for the cache's meta.json), including the layout's name."""
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Codec:
        """Inverse of `to_dict`; rejects another layout's name or unknown keys."""
        data = dict(data)
        found = data.pop("format", None)
        if found != FORMAT:
            raise ValueError(f"cache codec format {found!r} is not {FORMAT!r}; re-build the cache")
        unknown = set(data) - {"vocab", "slots", "value_bits", "log_floor", "trailing"}
        if unknown:
            raise ValueError(f"unknown Codec fields {sorted(unknown)}")
        return cls(**data)

    def _check_inputs(self, ids: Tensor, log_probs: Tensor) -> None:
        """Shapes and dtypes of `encode`'s arguments."""
        s = self.slots
        if ids.dim() != 2 or ids.shape[1] != s:
            raise ValueError(f"ids must be [N, {s}] (slots={s}), got {list(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
        if log_probs.shape != (ids.shape[0], self.num_values):
            raise ValueError(
                f"log_probs must be [N, slots + trailing] = [{ids.shape[0]}, {self.num_values}] "
                f"(slot values then the trailing values), got {list(log_probs.shape)}"
            )
        if log_probs.device != ids.device:
            raise ValueError(f"ids on {ids.device} but log_probs on {log_probs.device}")
        if not log_probs.dtype.is_floating_point:
            raise ValueError(f"log_probs must be a float tensor, got {log_probs.dtype}")
        if log_probs.isnan().any() or (log_probs == math.inf).any():
            raise ValueError("log_probs contain NaN or +inf; use -inf for probability 0")

    def _check_ids(self, ids: Tensor) -> None:
        """Range and distinctness of ids already sorted per row (`[N, S]` int64)."""
        if ids.numel() == 0:
            return
        if ids[:, 0].min() < 0:
            raise ValueError(
                f"negative id {ids[:, 0].min().item()}; ids must lie in [0, {self.vocab})"
            )
        if ids[:, -1].max() >= self.vocab:
            top = ids[:, -1].max().item()
            raise ValueError(f"id {top} >= vocab {self.vocab}; ids must lie in [0, {self.vocab})")
        repeated = (ids[:, 1:] == ids[:, :-1]).nonzero()
        if len(repeated):
            row, col = repeated[0].tolist()
            raise ValueError(
                f"repeated id {ids[row, col].item()} in row {row}; ids must be distinct per row"
            )

    def _quantise(self, values: Tensor) -> Tensor:
        """`[N, S + trailing]` log-probs (no NaN / +inf) → int64 levels in [0, 2^b − 1]."""
        r = self.log_floor
        x = values.double().clamp(-r, 0.0)  # −inf → −R here; restored to level 0 below
        levels = torch.round((x + r) / self.step).long() + 1
        return levels.masked_fill(values == -math.inf, 0)

    def _level_values(self, device: torch.device) -> Tensor:
        """`[2^b]` float32 value of each level, −inf at level 0 (computed in float64)."""
        j = torch.arange(1 << self.value_bits, dtype=torch.float64, device=device)
        table = -self.log_floor + (j - 1) * self.step
        table[0] = -math.inf
        return table.float()


def fitting_value_bits(
    vocab: int,
    slots: int,
    budget_bytes_per_entry: float = 2.5,
    log_floor: float = 16.0,
    trailing: int = 1,
) -> int:
    """The largest b in [2, 8] whose rows take at most `budget · slots` bytes (2 when none fits).

    Args:
        vocab: V.
        slots: S.
        budget_bytes_per_entry: bytes allowed per stored id (row budget = this · S).
        log_floor: R, passed to the `Codec`s tried (it does not change the size).
        trailing: values per row after the slot values.
    """
    for bits in range(8, 2, -1):
        if (
            Codec(vocab, slots, bits, log_floor, trailing).bytes_per_position
            <= budget_bytes_per_entry * slots
        ):
            return bits
    Codec(vocab, slots, 2, log_floor, trailing)  # validates the arguments when nothing fits
    return 2
