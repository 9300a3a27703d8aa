"""Bit packing of unsigned codes (1-8 bits) into a little-endian bit stream of bytes."""

from __future__ import annotations

import torch


def packed_nbytes(n_codes: int, bits: int) -> int:
    """Bytes needed to hold n_codes codes of `bits` bits."""
    return (n_codes * bits + 7) // 8


_PACK_CHUNK = 1 << 22   # codes per step (a multiple of 8): temporaries stay small for any tensor


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any shape, values < 2**bits) into a 1-D uint8 tensor."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat.clone()
    if flat.numel() <= _PACK_CHUNK:
        return _pack_flat(flat, bits)
    # every chunk but the last holds a multiple of 8 codes, so its bits end on a byte boundary
    return torch.cat([_pack_flat(flat[i: i + _PACK_CHUNK], bits) for i in range(0, flat.numel(), _PACK_CHUNK)])


def _pack_flat(flat: torch.Tensor, bits: int) -> torch.Tensor:
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, no bit stream needed
        per_byte = 8 // bits
        pad = (-flat.numel()) % per_byte
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        groups = flat.view(-1, per_byte)
        out = groups[:, 0].clone()
        for i in range(1, per_byte):
            out |= groups[:, i] << (i * bits)
        return out
    # 3, 5, 6, 7 bits: go through a bit stream
    shifts = torch.arange(bits, dtype=torch.uint8)
    bit_stream = ((flat.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-bit_stream.numel()) % 8
    if pad:
        bit_stream = torch.cat([bit_stream, bit_stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (bit_stream.view(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n_codes: int) -> torch.Tensor:
    """Inverse of pack: the first n_codes codes as a 1-D uint8 tensor."""
    packed = packed.reshape(-1).to(torch.uint8)
    if bits == 8:
        return packed[:n_codes].clone()
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per_byte = 8 // bits   # one shifted copy per code position: ~3x faster than a broadcast shift
        parts = [(packed >> (i * bits)) & mask if i else packed & mask for i in range(per_byte)]
        return torch.stack(parts, dim=1).reshape(-1)[:n_codes].contiguous()
    bit_stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    bit_stream = bit_stream[: n_codes * bits].view(n_codes, bits).to(torch.int32)
    weights = 1 << torch.arange(bits, dtype=torch.int32)
    return (bit_stream * weights).sum(dim=1).to(torch.uint8)
