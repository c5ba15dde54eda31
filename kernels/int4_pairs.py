"""Exact int4 weights as 16-bit pairs: the PTX that the W4A16 kernels on a GPU dequantize with.

A packed word holds the nibbles of 8 consecutive rows of one column. One ``lop3`` puts two of them
under a 16-bit exponent, which makes the fp16 (or bf16) pair (base + q_j, base + q_j+4), and one
more instruction takes base + z off both: q - z comes out exact, two weights an instruction
(``f16_nibble_pairs``, ``bf16_nibble_pairs``). The GEMV (``w4a16_gemv``), the tensor-core kernel's
weight tile (``w4a16``) and the Hopper kernel (``w4a16_wgmma``) compose their inline asm from these
strings, and take their zero points' constants from ``zero_f16x2`` and ``zero_bf16x2``.
"""

import struct

import triton
import triton.language as tl

from .common import asm_constant


def f16_bits(value: float) -> str:
    """``value`` rounded to fp16, as the hex literal PTX takes (0x3C00 for 1)."""
    return "0x%04X" % int.from_bytes(struct.pack("<e", value), "little")


def f16_nibble_pairs(word: str, unit: float, z_low: str, z_high: str) -> str:
    """PTX leaving in q0..q3 the half2 ``unit * (q_j - z, q_j+4 - z)``, j = 0..3, of the 8 nibbles of
    the word in register ``word``, exactly, for a power of two ``unit`` and its zero constants
    ``z_low``, ``z_high`` (``zero_f16x2``; scratch: t; ``sixteenth`` holds (1/16, 1/16)). One lop3
    turns a word into a half2 of two nibbles under the exponent of 1024 unit; with unit 1,
    ``(w & 0x000F000F) | 0x64006400`` is (1024 + q0, 1024 + q4) and ``(w & 0x00F000F0) | 0x64006400``
    is (1024 + 16 q1, 1024 + 16 q5); the same after one shift by 8 gives nibbles 2, 6 and 3, 7.
    Subtracting ``z_low`` ((1024 + z) unit), or scaling by 1/16 and adding ``z_high`` (-(64 + z)
    unit, one HFMA2), leaves unit (q - z): exact, as zeros are integers and no value needs more than
    fp16's 11 significant bits."""
    magic = f16_bits(1024 * unit) + f16_bits(1024 * unit)[2:]  # the fp16 twice: 0x64006400 for unit 1
    return f"""
        shr.u32 t, {word}, 8;
        lop3.b32 q0, {word}, 0x000F000F, {magic}, 0xEA;
        lop3.b32 q1, {word}, 0x00F000F0, {magic}, 0xEA;
        lop3.b32 q2, t, 0x000F000F, {magic}, 0xEA;
        lop3.b32 q3, t, 0x00F000F0, {magic}, 0xEA;
        sub.rn.f16x2 q0, q0, {z_low};
        fma.rn.f16x2 q1, q1, sixteenth, {z_high};
        sub.rn.f16x2 q2, q2, {z_low};
        fma.rn.f16x2 q3, q3, sixteenth, {z_high};"""


def bf16_nibble_pairs(word: str, z_128: str) -> str:
    """PTX leaving in q0..q3 the bf16x2 (q_j - z, q_j+4 - z), j = 0..3, of the word in register
    ``word`` (scratch: t1..t3; ``one`` holds (1, 1)). bf16 keeps 7 mantissa bits, so nibble j must
    sit in bits 0-3 of each 16-bit lane: one lop3 makes ``((w >> 4 j) & 0x000F000F) | 0x43004300``
    the bf16x2 (128 + q_j, 128 + q_j+4) exactly (0x4300 is 128.0), and one fma by 1 with ``z_128``
    (-128 - z) leaves q - z exactly."""
    return f"""
        shr.u32 t1, {word}, 4;
        shr.u32 t2, {word}, 8;
        shr.u32 t3, {word}, 12;
        lop3.b32 q0, {word}, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 q1, t1, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 q2, t2, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 q3, t3, 0x000F000F, 0x43004300, 0xEA;
        fma.rn.bf16x2 q0, q0, one, {z_128};
        fma.rn.bf16x2 q1, q1, one, {z_128};
        fma.rn.bf16x2 q2, q2, one, {z_128};
        fma.rn.bf16x2 q3, q3, one, {z_128};"""


# The GEMV's fp16 dot sums unit (q - z) x, a sixteenth so that no product overflows
# (``w4a16_gemv._word_pair_dot_f16x2``); the GEMV scales its sum back once.
F16_DOT_UNIT = 1 / 16
# PTX closing an asm block whose q0..q3 hold nibble pairs (j, j + 4): outputs $0..$7 are nibbles 0..7
NIBBLE_PAIRS_OUT = """
        mov.b32 {$0, $4}, q0;
        mov.b32 {$1, $5}, q1;
        mov.b32 {$2, $6}, q2;
        mov.b32 {$3, $7}, q3;
        }"""


def f16_zero_constants(unit: float) -> str:
    """PTX turning an fp16 zero point z into the half2 constants ``(1024 + z) unit`` and
    ``-(64 + z) unit`` of ``f16_nibble_pairs`` (exact for integer z and a power of two ``unit``;
    an fma with two constants instead of the mul cost ptxas up to 16 more registers in the GEMV)."""
    scaled = "mov.b16 z, $2;" if unit == 1 else f"mov.b16 c, {f16_bits(unit)}; mul.rn.f16 z, $2, c;"
    return f"""
        {{
        .reg .b16 c, t, z;
        {scaled}
        mov.b16 c, {f16_bits(1024 * unit)};
        add.rn.f16 t, z, c;
        mov.b32 $0, {{t, t}};
        mov.b16 c, {f16_bits(-64 * unit)};
        sub.rn.f16 t, c, z;
        mov.b32 $1, {{t, t}};
        }}"""


# The tile's weights take q - z whole; the GEMV's dot takes it in its unit.
_ZERO_CONSTANTS_TILE = asm_constant(f16_zero_constants(1.0))
_ZERO_CONSTANTS_DOT = asm_constant(f16_zero_constants(F16_DOT_UNIT))


@triton.jit
def zero_f16x2(zero, FOR_DOT: tl.constexpr):
    """fp16 zero points -> the two half2 zero constants of ``f16_nibble_pairs``, for the unit 1
    (the tile's weights) or, with FOR_DOT, the GEMV dot's ``F16_DOT_UNIT``."""
    return tl.inline_asm_elementwise(
        _ZERO_CONSTANTS_DOT if FOR_DOT else _ZERO_CONSTANTS_TILE,
        "=r,=r,h", [zero], dtype=(tl.int32, tl.int32), is_pure=True, pack=1,
    )


@triton.jit
def zero_bf16x2(zero):
    """bf16 zero points -> the bf16x2 constant (-128 - z, -128 - z) (exact: z is an integer in [0, 15])."""
    return tl.inline_asm_elementwise(
        """
        {
        .reg .b16 m, c, t;
        mov.b16 m, 0xBF80;
        mov.b16 c, 0xC300;
        fma.rn.bf16 t, $1, m, c;
        mov.b32 $0, {t, t};
        }
        """,
        "=r,h", [zero], dtype=tl.int32, is_pure=True, pack=1,
    )
