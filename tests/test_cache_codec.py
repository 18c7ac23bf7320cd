"""The teacher cache's storage codec: round trips, the error bound, sizes, bit layout, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdlab.teachers.codec import (
    FORMAT,
    Codec,
    bits_to_bytes,
    bytes_to_bits,
    fitting_value_bits,
    pack_bits,
    read_fields,
    unpack_bits,
    write_fields,
)

QWEN_VOCAB = 151936


def random_rows(codec: Codec, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` rows of distinct ids in random order `[n, S]`, values in [−R, 0] `[n, S + trailing]`."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(n, codec.vocab, generator=gen).argsort(dim=1)[:, : codec.slots]
    log_probs = -codec.log_floor * torch.rand(n, codec.num_values, generator=gen)
    return ids, log_probs


def sorted_by_id(ids: torch.Tensor, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows as decode returns them: ids ascending, values following their ids, then the rest."""
    s = ids.shape[1]
    ids, order = ids.sort(dim=1)
    return ids, torch.cat([log_probs[:, :s].gather(1, order), log_probs[:, s:]], dim=1)


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab", "slots", "bits", "trailing"),
    [(QWEN_VOCAB, 64, 8, 1), (QWEN_VOCAB, 64, 6, 2), (QWEN_VOCAB, 1, 8, 1), (32000, 64, 8, 2)]
    + [(50, 50, 3, 1), (1, 1, 2, 1), (1000, 1, 5, 2), (1000, 7, 4, 0), (21, 8, 8, 2)],
)
def test_round_trip(vocab: int, slots: int, bits: int, trailing: int) -> None:
    codec = Codec(vocab, slots, bits, trailing=trailing)
    ids, log_probs = random_rows(codec, 16)
    log_probs[::3, 0] = -math.inf  # some empty slots (and an empty tail when S = 1)
    log_probs[1, -1] = -math.inf  # (a slot value when trailing = 0)

    codes = codec.encode(ids, log_probs)
    assert codes.dtype == torch.uint8 and codes.shape == (16, codec.bytes_per_position)
    got_ids, got = codec.decode(codes)

    want_ids, want = sorted_by_id(ids, log_probs)
    assert got_ids.dtype == torch.int64 and torch.equal(got_ids, want_ids)
    assert got.dtype == torch.float32 and got.shape == (16, slots + trailing)
    empty = want == -math.inf
    assert torch.equal(got == -math.inf, empty)
    assert (got[~empty] - want[~empty]).abs().max() <= codec.max_log_error + 1e-6


def test_values_outside_the_range_are_clamped() -> None:
    codec = Codec(1000, 4, value_bits=8, log_floor=10.0)
    ids = torch.tensor([[3, 1, 2, 0]])
    log_probs = torch.tensor([[1e-7, -10.5, -1e30, 0.0, -math.inf]])
    _, got = codec.decode(codec.encode(ids, log_probs))
    # sorted ids [0, 1, 2, 3] carry [0.0, -10.5, -1e30, 1e-7], tail −inf
    assert got[0, :2].sub(torch.tensor([0.0, -10.0])).abs().max() <= codec.max_log_error
    assert got[0, 2] == pytest.approx(-10.0, abs=codec.max_log_error)
    assert got[0, 3] == pytest.approx(0.0, abs=codec.max_log_error)
    assert got[0, 4] == -math.inf


def test_error_bound_is_nearly_reached() -> None:
    codec = Codec(500, 50, value_bits=5)
    ids, log_probs = random_rows(codec, 40, seed=1)
    _, got = codec.decode(codec.encode(ids, log_probs))
    error = (got - sorted_by_id(ids, log_probs)[1]).abs().max()
    assert 0.4 * codec.max_log_error < error <= codec.max_log_error + 1e-6


def test_no_rows() -> None:
    codec = Codec(QWEN_VOCAB, 64)
    codes = codec.encode(torch.zeros(0, 64, dtype=torch.long), torch.zeros(0, 65))
    assert codes.shape == (0, codec.bytes_per_position)
    ids, log_probs = codec.decode(codes)
    assert ids.shape == (0, 64) and log_probs.shape == (0, 65)


def test_encoding_is_deterministic() -> None:
    codec = Codec(QWEN_VOCAB, 64, 6)
    ids, log_probs = random_rows(codec, 8, seed=2)
    assert torch.equal(codec.encode(ids, log_probs), codec.encode(ids.clone(), log_probs.clone()))


# --- the layout -----------------------------------------------------------------------------------


def test_golden_bytes() -> None:
    # V=16, S=2 → l = floor(log2 8) = 3; b=2, R=16 → levels 1, 2, 3 are −16, −8, 0.
    # ids [9, 2] sort to [2, 9]: low parts 2, 1 → bits 010 100 (LSB first);
    # high part, 2 + (15 >> 3) + 1 = 4 bits, ones at (2 >> 3) + 0 = 0 and (9 >> 3) + 1 = 2 → 1010;
    # values [0 (id 2), −8 (id 9), −inf (tail)] → levels 3, 2, 0 → bits 11 01 00.
    # Row: 01010010 10110100 → bytes 0b01001010 = 74, 0b00101101 = 45.
    codec = Codec(16, 2, value_bits=2)
    assert (codec.low_bits, codec.bits_per_position, codec.bytes_per_position) == (3, 16, 2)
    codes = codec.encode(torch.tensor([[9, 2]]), torch.tensor([[-8.0, 0.0, -math.inf]]))
    assert codes.tolist() == [[74, 45]]


def test_sizes() -> None:
    # V=151936, S=64: l = floor(log2 2374) = 11; low 64·11 = 704; high 64 + (151935 >> 11) + 1
    # = 64 + 74 + 1 = 139; values 65·8 = 520 → 1363 bits → 171 bytes.
    qwen = Codec(QWEN_VOCAB, 64, 8)
    assert (qwen.low_bits, qwen.bits_per_position, qwen.bytes_per_position) == (11, 1363, 171)
    # V=32000, S=64: l = floor(log2 500) = 8; low 512; high 64 + (31999 >> 8) + 1 = 189;
    # values 520 → 1221 bits → 153 bytes.
    llama = Codec(32000, 64, 8)
    assert (llama.low_bits, llama.bits_per_position, llama.bytes_per_position) == (8, 1221, 153)
    # S = V: l = 0, high 5 + 4 + 1 = 10, values 6·3 = 18 → 28 bits → 4 bytes.
    assert Codec(5, 5, 3).bytes_per_position == 4
    assert Codec(16, 2, 2, log_floor=4.0).step == 2.0
    assert Codec(16, 2, 8).max_log_error == pytest.approx(16 / 254 / 2)


def test_fitting_value_bits() -> None:
    bits = fitting_value_bits(QWEN_VOCAB, 64, 2.5)
    assert Codec(QWEN_VOCAB, 64, bits).bytes_per_position <= 160
    assert Codec(QWEN_VOCAB, 64, bits + 1).bytes_per_position > 160
    assert bits == 6  # 843 + 65·6 = 1233 bits → 155 bytes; b = 7: 1298 bits → 163 bytes
    assert fitting_value_bits(32000, 64, 2.5) == 8
    assert fitting_value_bits(QWEN_VOCAB, 64, 0.5) == 2  # nothing fits


# --- bit helpers ----------------------------------------------------------------------------------


def test_pack_bits_round_trip() -> None:
    assert pack_bits(torch.tensor([[5, 2]]), 3).tolist() == [
        [True, False, True, False, True, False]
    ]
    values = torch.randint(0, 1 << 13, (4, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(unpack_bits(pack_bits(values, 13), 13), values)
    assert pack_bits(torch.zeros(3, 4, dtype=torch.long), 0).shape == (3, 0)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\*\*3\)"):
        pack_bits(torch.tensor([[8]]), 3)


def test_bytes_round_trip() -> None:
    bits = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert bits_to_bytes(bits).tolist() == [[13, 1]]  # LSB first, last byte zero-padded
    many = torch.rand(5, 21, generator=torch.Generator().manual_seed(4)) < 0.5
    assert torch.equal(bytes_to_bits(bits_to_bytes(many), 21), many)
    assert bits_to_bytes(torch.zeros(0, 21, dtype=torch.bool)).shape == (0, 3)
    with pytest.raises(ValueError, match="length must be in"):
        bytes_to_bits(torch.zeros(1, 2, dtype=torch.uint8), 17)


@pytest.mark.parametrize("width", [1, 3, 8, 11, 17])
def test_fields_match_the_bit_helpers(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    values = torch.randint(0, 1 << width, (6, 10), generator=gen)
    offset = 5  # fields start mid-byte
    starts = offset + width * torch.arange(10)
    codes = torch.zeros(6, -(-(offset + 10 * width) // 8), dtype=torch.uint8)
    write_fields(codes, values, starts, width)
    padded = torch.cat([torch.zeros(6, offset, dtype=torch.bool), pack_bits(values, width)], 1)
    assert torch.equal(codes, bits_to_bytes(padded))
    assert torch.equal(read_fields(codes, starts, width), values)
    # per-row starts: each row's fields in reversed order
    rows = starts.flip(0).expand(6, 10)
    codes = torch.zeros_like(codes)
    write_fields(codes, values, rows, width)
    assert torch.equal(read_fields(codes, rows, width), values)
    assert torch.equal(read_fields(codes, starts, width), values.flip(1))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "log_probs", "match"),
    [
        ([[1, 2, 1]], None, "repeated id 1 in row 0"),
        ([[1, 2, 10]], None, "id 10 >= vocab 10"),
        ([[-1, 2, 3]], None, "negative id -1"),
        ([[1, 2]], None, r"ids must be \[N, 3\]"),
        ([[1, 2, 3]], [[0.0] * 3], r"log_probs must be \[N, slots \+ trailing\] = \[1, 4\]"),
        ([[1.0, 2.0, 3.0]], None, "ids must be an integer tensor"),
        ([[1, 2, 3]], [[0.0, math.nan, 0.0, 0.0]], "NaN or \\+inf"),
    ],
)
def test_encode_rejects(ids: list, log_probs: list | None, match: str) -> None:
    codec = Codec(10, 3)
    ids_t = torch.tensor(ids)
    lp = torch.zeros(len(ids), 4) if log_probs is None else torch.tensor(log_probs)
    with pytest.raises(ValueError, match=match):
        codec.encode(ids_t, lp)


def test_decode_rejects() -> None:
    codec = Codec(100, 4)
    with pytest.raises(ValueError, match=rf"codes must be uint8 \[N, {codec.bytes_per_position}\]"):
        codec.decode(torch.zeros(2, codec.bytes_per_position + 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="corrupt codes"):
        codec.decode(torch.zeros(2, codec.bytes_per_position, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"vocab": 0, "slots": 1}, r"vocab must be >= 1"),
        ({"vocab": 10, "slots": 11}, r"slots must be in \[1, 10\]"),
        ({"vocab": 10, "slots": 0}, r"slots must be in \[1, 10\]"),
        ({"vocab": 10, "slots": 2, "value_bits": 9}, r"value_bits must be in \[2, 8\]"),
        ({"vocab": 10, "slots": 2, "value_bits": 1}, r"value_bits must be in \[2, 8\]"),
        ({"vocab": 10, "slots": 2, "log_floor": 0.0}, "log_floor must be a finite number > 0"),
        ({"vocab": 10, "slots": 2, "log_floor": math.inf}, "log_floor must be a finite"),
        ({"vocab": 10.0, "slots": 2}, "vocab must be an int"),
    ],
)
def test_codec_rejects_bad_fields(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Codec(**fields)


def test_dict_round_trip() -> None:
    codec = Codec(QWEN_VOCAB, 64, 6, log_floor=12.5)
    data = json.loads(json.dumps(codec.to_dict()))
    assert data["format"] == FORMAT
    assert Codec.from_dict(data) == codec
    with pytest.raises(ValueError, match="format 'other/v0'"):
        Codec.from_dict({**data, "format": "other/v0"})
    with pytest.raises(ValueError, match=r"unknown Codec fields \['extra'\]"):
        Codec.from_dict({**data, "extra": 1})
