//! LZ4 bodies (feature `lz4`): frames for both versions, raw blocks for v3 (FORMAT.md §6).
//!
//! Decompression always writes into a caller-provided slice whose length is `N * itemsize` from the
//! shape, so a claimed or actual decompressed size never sizes an allocation. A body that decompresses
//! to more or fewer bytes than the slice is an error.

use crate::error::FormatError;
use std::io::{Read, Write};

/// Compresses `src` into an LZ4 frame with `lz4_flex`'s `FrameEncoder` defaults (no content size,
/// independent blocks, automatic block size): the bytes tenso 0.24.0 writes.
pub fn compress_frame(src: &[u8]) -> Vec<u8> {
    let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(src.len() / 2 + 64));
    enc.write_all(src).expect("writing into a Vec cannot fail");
    enc.finish().expect("finishing into a Vec cannot fail")
}

/// Block size of frames assembled by [`frame_from_blocks`]: 4 MiB, the largest the frame format allows, so that large
/// bodies split into few blocks that can be compressed independently (and in parallel by the caller).
pub const FRAME_BLOCK_SIZE: usize = 4 << 20;

/// Compresses one block of at most [`FRAME_BLOCK_SIZE`] bytes as it appears inside a frame: a little-endian size
/// word, then the data; stored uncompressed (high bit of the size word set) when compression does not shrink it.
pub fn frame_block(src: &[u8]) -> Vec<u8> {
    debug_assert!(src.len() <= FRAME_BLOCK_SIZE);
    let compressed = lz4_flex::block::compress(src);
    let mut block = Vec::with_capacity(4 + compressed.len().min(src.len()));
    if compressed.len() < src.len() {
        block.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        block.extend_from_slice(&compressed);
    } else {
        block.extend_from_slice(&(src.len() as u32 | 0x8000_0000).to_le_bytes());
        block.extend_from_slice(src);
    }
    block
}

/// Assembles an LZ4 frame (independent 4 MiB blocks, no content size, no checksums) from the [`frame_block`]s of
/// consecutive [`FRAME_BLOCK_SIZE`] slices of a body. Any LZ4 frame reader decodes it.
///
/// ```text
/// 04 22 4D 18 | FLG 0x60 | BD 0x70 | HC | blocks... | 00 00 00 00
/// magic         v01, independent blocks, 4 MiB max block, header checksum = (XXH32(FLG BD) >> 8) & 0xFF
/// ```
pub fn frame_from_blocks(blocks: &[Vec<u8>]) -> Vec<u8> {
    let descriptor = [0x60u8, 0x70];
    let checksum = (xxhash_rust::xxh32::xxh32(&descriptor, 0) >> 8) as u8;
    let total = blocks.iter().map(Vec::len).sum::<usize>() + 7 + 4;
    let mut frame = Vec::with_capacity(total);
    frame.extend_from_slice(&[0x04, 0x22, 0x4d, 0x18]);
    frame.extend_from_slice(&descriptor);
    frame.push(checksum);
    for block in blocks {
        frame.extend_from_slice(block);
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame
}

/// Decompresses an LZ4 frame into `dst`, which must receive exactly `dst.len()` bytes.
///
/// Any valid frame is accepted (linked or independent blocks, 64 KiB..4 MiB blocks, with or without
/// content size and checksums). Data after the frame's end mark is ignored once `dst` is full.
pub fn decompress_frame_into(src: &[u8], dst: &mut [u8]) -> Result<(), FormatError> {
    let mut dec = lz4_flex::frame::FrameDecoder::new(src);
    let mut filled = 0usize;
    while filled < dst.len() {
        match dec.read(&mut dst[filled..]) {
            Ok(0) => {
                return Err(FormatError::DecompressedSize {
                    expected: dst.len(),
                    found: filled,
                })
            }
            Ok(n) => filled += n,
            Err(e) => {
                return Err(FormatError::Lz4 {
                    reason: frame_reason(&e),
                })
            }
        }
    }
    let mut probe = [0u8; 1];
    match dec.read(&mut probe) {
        Ok(0) => Ok(()),
        Ok(_) => Err(FormatError::DecompressedSize {
            expected: dst.len(),
            found: dst.len() + 1,
        }),
        // The body is complete; bytes after the frame (trailing zeros of a shared-memory segment)
        // are not part of it. Upstream decoders tolerate them too.
        Err(_) => Ok(()),
    }
}

fn frame_reason(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "frame is truncated",
        _ => {
            let msg = e.to_string();
            if msg.contains("magic") || msg.contains("Magic") {
                "bad frame magic number"
            } else if msg.contains("checksum") || msg.contains("Checksum") {
                "frame checksum mismatch"
            } else {
                "corrupt frame"
            }
        }
    }
}

/// Decompresses a raw LZ4 block (v3 shared-memory variant, no frame) into `dst`, which must be filled exactly.
pub fn decompress_block_into(src: &[u8], dst: &mut [u8]) -> Result<(), FormatError> {
    match lz4_flex::block::decompress_into(src, dst) {
        Ok(n) if n == dst.len() => Ok(()),
        Ok(n) => Err(FormatError::DecompressedSize {
            expected: dst.len(),
            found: n,
        }),
        Err(lz4_flex::block::DecompressError::OutputTooSmall { expected, .. }) => {
            Err(FormatError::DecompressedSize {
                expected: dst.len(),
                found: expected.max(dst.len() + 1),
            })
        }
        Err(_) => Err(FormatError::Lz4 {
            reason: "corrupt block",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_v4_bytes() {
        let body: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let frame = compress_frame(&body);
        // FORMAT.md §6.5, the v4 body.
        assert_eq!(
            frame,
            [
                0x04, 0x22, 0x4d, 0x18, 0x60, 0x40, 0x82, 0x0c, 0x00, 0x00, 0x80, 0x00, 0x00, 0x80,
                0x3f, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x00, 0x00
            ]
        );
        let mut out = vec![0u8; 12];
        decompress_frame_into(&frame, &mut out).unwrap();
        assert_eq!(out, body);
    }

    #[test]
    fn assembled_frames_decode() {
        let body: Vec<u8> = (0..(FRAME_BLOCK_SIZE * 2 + 12345))
            .map(|i| (i % 251) as u8)
            .collect();
        let noise: Vec<u8> = (0..FRAME_BLOCK_SIZE + 7)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for src in [&body[..], &noise[..], &[][..], &[7u8][..]] {
            let blocks: Vec<Vec<u8>> = src.chunks(FRAME_BLOCK_SIZE).map(frame_block).collect();
            let frame = frame_from_blocks(&blocks);
            let mut out = vec![0u8; src.len()];
            decompress_frame_into(&frame, &mut out).unwrap();
            assert_eq!(out, src);
        }
    }

    #[test]
    fn sizes_must_match() {
        let frame = compress_frame(&[5u8; 100]);
        let mut short = vec![0u8; 99];
        assert!(matches!(
            decompress_frame_into(&frame, &mut short),
            Err(FormatError::DecompressedSize { .. })
        ));
        let mut long = vec![0u8; 101];
        assert!(matches!(
            decompress_frame_into(&frame, &mut long),
            Err(FormatError::DecompressedSize { .. })
        ));
        let mut ok = vec![0u8; 100];
        decompress_frame_into(&frame, &mut ok).unwrap();
        assert!(decompress_frame_into(&[], &mut ok).is_err());
        assert!(decompress_frame_into(&[1, 2, 3, 4, 5, 6, 7], &mut ok).is_err());
    }

    #[test]
    fn empty_frame_and_v3_frame() {
        let frame = compress_frame(&[]);
        decompress_frame_into(&frame, &mut []).unwrap();
        // FORMAT.md §6.5, the v3 body written by python-lz4 (content size present).
        let v3 = [
            0x04, 0x22, 0x4d, 0x18, 0x68, 0x40, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0x5d, 0x0c, 0, 0, 0x80,
            0, 0, 0x80, 0x3f, 0, 0, 0, 0x40, 0, 0, 0x40, 0x40, 0, 0, 0, 0,
        ];
        let mut out = vec![0u8; 12];
        decompress_frame_into(&v3, &mut out).unwrap();
        assert_eq!(&out[4..8], &2.0f32.to_le_bytes());
    }

    #[test]
    fn blocks() {
        let data = vec![9u8; 1000];
        let block = lz4_flex::block::compress(&data);
        let mut out = vec![0u8; 1000];
        decompress_block_into(&block, &mut out).unwrap();
        assert_eq!(out, data);
        let mut small = vec![0u8; 10];
        assert!(decompress_block_into(&block, &mut small).is_err());
        let mut big = vec![0u8; 2000];
        assert!(decompress_block_into(&block, &mut big).is_err());
        assert!(decompress_block_into(&[0xff, 0xff], &mut out).is_err());
    }
}
