"""Typed findings: a diagnosis is a kind with parameters, and its text is rendered from them.

Tests and tools assert ``Finding.kind``; reports show ``Finding.text``. ``TensorResult.findings`` holds
them as dicts (``{"kind": ..., **params}``, JSON-ready); ``TensorResult.diagnosis`` the rendered texts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Kind(str, Enum):
    """What a finding says. The values are stable (JSON)."""
    # encodings (codes and block scales, compared with a reference encoding of the float side)
    SCALE_ZEROED = "scale-zeroed"            # some block scales are 0, codes agree
    SCALE_MULTIPLIED = "scale-multiplied"    # some block scales are k x the reference, codes agree
    SCALE_RECIPROCAL = "scale-reciprocal"    # scales are 1 / the reference (an inverse stored as is)
    SCALE_TRANSPOSED = "scale-transposed"    # the scale grid is the reference grid transposed
    SCALE_SHIFTED = "scale-shifted"          # the scale of row/block i is the reference scale of i -+ 1
    SCALE_SWAPPED = "scale-swapped"          # the scales are those of another tensor
    SCALE_STALE = "scale-stale"              # codes agree, scales differ otherwise (scales of other weights)
    CODES_DIFFER = "codes-differ"            # scales agree, some codes differ
    NIBBLES_SWAPPED = "nibbles-swapped"      # 4-bit codes packed with the two halves of each block swapped
    INT4_UNSIGNED = "int4-unsigned"          # int4 codes stored 0..15 instead of sign-extended
    BLOCKS_WRONG_AXIS = "blocks-wrong-axis"  # blocks over the output axis instead of the input axis
    ENCODES_OTHER = "encodes-other"          # the encoded tensor is a correct encoding of another float tensor
    E8M0_AS_VALUE = "e8m0-as-value"          # E8M0 scale bytes used as the scale instead of 2 ** (byte - 127)
    NOT_TRANSPOSED = "not-transposed"        # values dequantized in the stored order, reshaped without transposing
    SCALES_BIASES_SWAPPED = "scales-biases-swapped"  # an affine group's scale used as its bias and back
    WORD_ORDER_REVERSED = "word-order-reversed"      # the codes packed in a word read from its other end
    GROUP_SIZE_WRONG = "group-size-wrong"            # the scales applied with another group size
    BITS_WRONG = "bits-wrong"                        # packed codes read at another bit width
    QUANT_CONFIG_WRONG = "quant-config-wrong"        # the file's config names other bits / group size than its codes
    BLOCK_SIZE_WRONG = "block-size-wrong"            # each block scale applied to another number of elements
    CODES_OF_ANOTHER_ENCODING = "codes-of-another-encoding"  # the codes decoded as another code format's
    ZERO_POINT_UNDERFLOW = "zero-point-underflow"    # an affine group's zero point wrapped or clipped to its bits
    CODE_OFFSET_WRONG = "code-offset-wrong"          # unsigned stored fields (code + offset) read without / twice
    OFFSET_SIGN_WRONG = "offset-sign-wrong"          # a zero point or block minimum applied with the wrong sign
    NIBBLES_INTERLEAVED = "nibbles-interleaved"      # block-halves nibble order read as interleaved pairs
    SCALE_OF_ANOTHER_ENCODING = "scale-of-another-encoding"  # the scale bytes decoded as another float format
    SUB_SCALES_MISREAD = "sub-scales-misread"        # K-quant 6-bit sub-block scales / minimums unpacked wrong


TEXT = {
    Kind.SCALE_ZEROED: "block scale zeroed: {blocks} of {total} {unit} scales are 0 where a reference {encoding} "
                       "encoding of A has non-zero scales (first at {first}); the codes agree",
    Kind.SCALE_MULTIPLIED: "block scale multiplied by {factor:g}: {blocks} of {total} {unit} scales are {factor:g} x "
                           "those of a reference {encoding} encoding (first at {first}); the codes agree",
    Kind.SCALE_RECIPROCAL: "reciprocal scales: the stored {unit} scales are 1 / those of a reference {encoding} "
                           "encoding (an inverse scale stored where the multiplier belongs); the codes agree",
    Kind.SCALE_TRANSPOSED: "scale grid transposed: the stored {unit} scales are the reference {encoding} grid "
                           "transposed; the codes agree",
    Kind.SCALE_SHIFTED: "scales off by one {unit}: the scale stored for {unit} i is the reference {encoding} scale "
                        "of {unit} i{sign}1; the codes agree",
    Kind.SCALE_SWAPPED: "scales swapped: {tensor} holds the {encoding} scales of {other}; the codes agree",
    Kind.SCALE_STALE: "stale scales: the codes agree with a reference {encoding} encoding but the scales do not "
                      "(stored / reference between {lo:.3g} and {hi:.3g}): scales of other weights",
    Kind.CODES_DIFFER: "scales agree with a reference {encoding} encoding; {count} codes differ (largest code "
                       "difference {largest:g})",
    Kind.NIBBLES_SWAPPED: "nibble order swapped: the 4-bit codes of each {encoding} block are packed with its two "
                          "halves exchanged ({blocks} blocks)",
    Kind.INT4_UNSIGNED: "int4 codes not sign-extended: negative codes are stored as 0..15 (q + 16) instead of "
                        "-8..-1 ({count} codes); scales {scales}",
    Kind.BLOCKS_WRONG_AXIS: "quantization blocks along the wrong axis: the codes and scales are those of the "
                            "transposed weight (blocks of {block} over the output axis instead of the input axis)",
    Kind.ENCODES_OTHER: "another tensor: {tensor} is a correct {encoding} encoding of {other} of the float side "
                        "({where}; every element within its quantization step): tensors swapped or misnamed",
    Kind.E8M0_AS_VALUE: "E8M0 scale read as a value: the float side is the {encoding} codes times each block's "
                        "scale byte itself, not 2 ** (byte - 127)",
    Kind.NOT_TRANSPOSED: "not transposed: the float side is the {encoding} values in their stored {stored} order "
                         "reshaped to {logical} (the transpose to the logical layout is missing)",
    Kind.SCALES_BIASES_SWAPPED: "scales and biases swapped: the float side is the {encoding} codes times each "
                                "group's bias plus its scale",
    Kind.WORD_ORDER_REVERSED: "code order reversed: the float side reads the {bits}-bit {encoding} codes of each "
                              "32-bit word from its high end (the first element is in the low bits)",
    Kind.GROUP_SIZE_WRONG: "wrong group size: the float side applies the {encoding} scales in groups of {read}, "
                           "the file's groups are {stored}",
    Kind.BITS_WRONG: "wrong bit width: the float side reads the {encoding} words as {read}-bit codes, the file's "
                     "codes are {stored}-bit",
    Kind.QUANT_CONFIG_WRONG: "quantization config wrong: read as {bits}-bit codes in groups of {group}, the stored "
                             "words and scales are the float side within one step; the config says {config_bits}-bit "
                             "groups of {config_group}",
    Kind.BLOCK_SIZE_WRONG: "wrong block size: the float side applies each {encoding} scale to {read} elements "
                           "({order}), the file's blocks are {stored}",
    Kind.CODES_OF_ANOTHER_ENCODING: "codes decoded as another encoding: the float side reads the {encoding} codes "
                                    "({codes}) as {read}{shape}",
    Kind.ZERO_POINT_UNDERFLOW: "zero point {how}: the float side is the {encoding} values with each group's zero "
                               "point (-bias / scale, the code of 0.0) held in an unsigned {bits}-bit field "
                               "({groups} groups changed)",
    Kind.CODE_OFFSET_WRONG: "code offset wrong: the float side reads the {encoding} codes {how}; each stored field "
                            "holds the code plus {offset}",
    Kind.OFFSET_SIGN_WRONG: "offset with the wrong sign: the float side {read}; the {encoding} dequantization is "
                            "{right}",
    Kind.NIBBLES_INTERLEAVED: "nibble order read as interleaved: the float side places the two {encoding} codes of "
                              "byte j of each block at elements 2j and 2j+1; the file holds element j in the low "
                              "nibble and element j+{half} in the high one ({blocks} blocks)",
    Kind.SCALE_OF_ANOTHER_ENCODING: "scales decoded as another format: the float side reads the {encoding} block "
                                    "scales ({scales}) as {read}",
    Kind.SUB_SCALES_MISREAD: "sub-block scales unpacked wrong: the float side reads the 6-bit {encoding} scales and "
                             "minimums of sub-blocks 4-7 {how}",
}


@dataclass(frozen=True)
class Finding:
    kind: Kind
    params: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return TEXT[self.kind].format(**self.params)

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, **self.params}


def record(r, findings: list[Finding]) -> list[str]:
    """Store typed ``findings`` on a TensorResult ``r``; returns their texts (its ``diagnosis``)."""
    r.findings = [f.to_dict() for f in findings]
    return [f.text for f in findings]


__all__ = ["Kind", "Finding", "record", "TEXT"]
