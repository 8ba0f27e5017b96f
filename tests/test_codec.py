"""Codec round-trips (property-based) and strict rejection of malformed stored values."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stac_rscbir.extension.codec import (
    SUPPORTED_BITS,
    CBIRFieldError,
    decode_code,
    decode_descriptor,
    encode_code,
    encode_descriptor,
    pack_bits,
    packed_to_words,
    unpack_bits,
    words_to_packed,
)

ISSUE_BITS = (16, 32, 64, 128, 256)


@st.composite
def bit_vectors(draw: st.DrawFn, sizes: tuple[int, ...] = SUPPORTED_BITS) -> np.ndarray:
    n = draw(st.sampled_from(sizes))
    return draw(arrays(np.uint8, n, elements=st.integers(0, 1)))


@given(
    bit_vectors(ISSUE_BITS), st.sampled_from(["big", "little"]), st.sampled_from(["base64", "hex"])
)
def test_bits_roundtrip_exact(bits: np.ndarray, bit_order: str, encoding: str) -> None:
    packed = pack_bits(bits, bit_order)
    text = encode_code(packed, bits.size, encoding)
    back = decode_code(text, bits.size, encoding)
    np.testing.assert_array_equal(back, packed)
    np.testing.assert_array_equal(unpack_bits(back, bit_order), bits)
    assert encode_code(back, bits.size, encoding) == text


@given(bit_vectors((64, 128, 256)), st.sampled_from(["big", "little"]))
def test_words_roundtrip_and_bit_positions(bits: np.ndarray, bit_order: str) -> None:
    packed = pack_bits(bits, bit_order)
    words = packed_to_words(packed, bit_order)
    assert words.dtype == np.uint64 and words.shape == (bits.size // 64,)
    np.testing.assert_array_equal(words_to_packed(words, bit_order), packed)
    for i in range(bits.size):  # the documented layout: bit i lives in word i // 64
        shift = 63 - i % 64 if bit_order == "big" else i % 64
        assert (int(words[i // 64]) >> shift) & 1 == bits[i]


def test_bit_order_layout_is_documented_one() -> None:
    bits = np.zeros(16, np.uint8)
    bits[0] = 1
    assert pack_bits(bits, "big").tolist() == [0x80, 0]
    assert pack_bits(bits, "little").tolist() == [0x01, 0]
    assert encode_code(pack_bits(bits, "big"), 16, "hex") == "8000"


def test_batched_packing_keeps_leading_axes() -> None:
    codes = np.random.default_rng(0).integers(0, 2, (5, 3, 64)).astype(np.uint8)
    packed = pack_bits(codes)
    assert packed.shape == (5, 3, 8)
    np.testing.assert_array_equal(unpack_bits(packed), codes)
    assert packed_to_words(packed).shape == (5, 3, 1)


@given(
    st.sampled_from(["float16", "float32", "float64"]),
    st.sampled_from(["little", "big"]),
    st.integers(1, 300),
    st.integers(0, 2**32 - 1),
)
def test_descriptor_roundtrip_exact(dtype: str, byte_order: str, dim: int, seed: int) -> None:
    values = np.random.default_rng(seed).normal(size=dim).astype(dtype)
    text = encode_descriptor(values, dtype, byte_order)  # type: ignore[arg-type]
    back = decode_descriptor(text, dtype, dim, byte_order)  # type: ignore[arg-type]
    assert back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, values)


@pytest.mark.parametrize(
    ("text", "bits", "encoding", "problem"),
    [
        ("AAAAAAAAAA==", 64, "base64", "decodes to 56 bits but the entry declares bits=64"),
        ("AAAAAAAAAAAA", 64, "base64", "decodes to 72 bits"),
        ("AAAA AAAAAA=", 64, "base64", "invalid base64"),
        ("AAAAAAAAAA-=", 64, "base64", "invalid base64"),
        ("AAAAAAAAAAB=", 64, "base64", "non-canonical base64"),
        ("00000000000000", 64, "hex", "decodes to 56 bits"),
        ("ABCDEF0123456789", 64, "hex", "invalid hex"),
        ("0000000g00000000", 64, "hex", "invalid hex"),
    ],
)
def test_bad_codes_name_the_field(text: str, bits: int, encoding: str, problem: str) -> None:
    with pytest.raises(CBIRFieldError, match=problem) as err:
        decode_code(text, bits, encoding, field="cbir:codes[0].code")  # type: ignore[arg-type]
    assert err.value.field == "cbir:codes[0].code"
    assert str(err.value).startswith("cbir:codes[0].code: ")


def test_unknown_encoding_and_bits_rejected() -> None:
    with pytest.raises(CBIRFieldError, match="encoding: unknown value 'base32'"):
        decode_code("AAAAAAAAAAA=", 64, "base32")  # type: ignore[arg-type]
    with pytest.raises(CBIRFieldError, match="unsupported bit length 63"):
        decode_code("AAAAAAAAAAA=", 63)
    with pytest.raises(CBIRFieldError, match="unsupported bit length True"):
        encode_code(b"\0", True)  # type: ignore[arg-type]
    with pytest.raises(CBIRFieldError, match="must be a string"):
        decode_code(12345, 64)


def test_encoders_refuse_bad_input() -> None:
    with pytest.raises(CBIRFieldError, match="7 bytes given for a 64-bit code"):
        encode_code(bytes(7), 64)
    with pytest.raises(CBIRFieldError, match="values must be 0 or 1"):
        pack_bits(np.array([0, 1, 2, 0, 0, 0, 0, 0]))
    with pytest.raises(CBIRFieldError, match="multiple of 8"):
        pack_bits(np.zeros(12))
    with pytest.raises(CBIRFieldError, match="must be uint8"):
        encode_code(np.zeros(8, np.int64), 64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_descriptor_rejected_both_ways(bad: float) -> None:
    values = np.ones(8, np.float32)
    values[3] = bad
    with pytest.raises(CBIRFieldError, match=r"non-finite value .* at index 3"):
        encode_descriptor(values)
    stored = base64.b64encode(values.astype("<f4").tobytes()).decode()
    with pytest.raises(CBIRFieldError, match=r"descriptor\.value: non-finite value"):
        decode_descriptor(stored, "float32", 8)


def test_descriptor_dimension_and_dtype_mismatch() -> None:
    text = encode_descriptor(np.ones(16), "float32")
    with pytest.raises(CBIRFieldError, match="holds 64 bytes = 16 float32 values, but dim=32"):
        decode_descriptor(text, "float32", 32)
    with pytest.raises(CBIRFieldError, match=r"descriptor\.dim: must be a positive integer"):
        decode_descriptor(text, "float32", 0)
    with pytest.raises(CBIRFieldError, match="dtype: unknown value 'int8'"):
        decode_descriptor(text, "int8", 16)
    with pytest.raises(CBIRFieldError, match="non-empty 1-D vector"):
        encode_descriptor(np.ones((2, 2)))


def test_overflowing_cast_is_caught() -> None:
    with pytest.raises(CBIRFieldError, match="non-finite"):
        encode_descriptor(np.array([1e6, 0.0]), "float16")
