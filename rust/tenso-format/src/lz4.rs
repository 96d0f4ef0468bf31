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

/// The layout of one LZ4 frame found by [`frame_extent`] without decompressing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameExtent {
    /// Bytes from the magic number through the end mark and the content checksum, if the frame has one.
    pub len: usize,
    /// The descriptor's content-size field, when present.
    pub content_size: Option<u64>,
}

/// Walks an LZ4 frame's structure (descriptor, then each block's size word, data and checksum, the end mark and
/// the content checksum) without decompressing anything, and says where the frame ends.
///
/// The frame must be complete: a frame that stops before its end mark, or before the content checksum its
/// descriptor announces, is [`FormatError::Lz4NoEndMark`] even if the blocks present would decode. Bytes after the
/// frame are not looked at. Block contents and checksums are checked by the decompressor, not here.
pub fn frame_extent(src: &[u8]) -> Result<FrameExtent, FormatError> {
    const MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
    let corrupt = |reason| FormatError::Lz4 { reason };
    if src.len() < 7 {
        return Err(corrupt("frame is truncated"));
    }
    if src[..4] != MAGIC {
        return Err(corrupt("bad frame magic number"));
    }
    let flg = src[4];
    let bd = src[5];
    if flg >> 6 != 0b01 {
        return Err(corrupt("unsupported frame version"));
    }
    let block_checksums = flg & 0x10 != 0;
    let has_content_size = flg & 0x08 != 0;
    let content_checksum = flg & 0x04 != 0;
    let has_dict_id = flg & 0x01 != 0;
    let max_block = match (bd >> 4) & 0x7 {
        4 => 64 << 10,
        5 => 256 << 10,
        6 => 1 << 20,
        7 => 4 << 20,
        _ => return Err(corrupt("invalid frame block size")),
    };
    let header_len = 7 + if has_content_size { 8 } else { 0 } + if has_dict_id { 4 } else { 0 };
    if src.len() < header_len {
        return Err(corrupt("frame is truncated"));
    }
    let content_size = has_content_size.then(|| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&src[6..14]);
        u64::from_le_bytes(word)
    });
    let checksum = (xxhash_rust::xxh32::xxh32(&src[4..header_len - 1], 0) >> 8) as u8;
    if checksum != src[header_len - 1] {
        return Err(corrupt("frame header checksum mismatch"));
    }
    let cut = |needed: usize| FormatError::Lz4NoEndMark {
        available: src.len(),
        needed,
    };
    let mut at = header_len;
    loop {
        let word_end = at.checked_add(4).ok_or(cut(usize::MAX))?;
        let word = src.get(at..word_end).ok_or(cut(word_end))?;
        let size = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        at = word_end;
        if size == 0 {
            break;
        }
        let data = (size & 0x7fff_ffff) as usize;
        if data > max_block {
            return Err(corrupt("frame block larger than its maximum block size"));
        }
        let block_end = at + data + if block_checksums { 4 } else { 0 };
        if block_end > src.len() {
            return Err(cut(block_end + 4));
        }
        at = block_end;
    }
    if content_checksum {
        at += 4;
        if at > src.len() {
            return Err(cut(at));
        }
    }
    Ok(FrameExtent {
        len: at,
        content_size,
    })
}

/// Decompresses an LZ4 frame into `dst`, which must receive exactly `dst.len()` bytes.
///
/// Any valid frame is accepted (linked or independent blocks, 64 KiB..4 MiB blocks, with or without
/// content size and checksums), and only a valid one: the frame must end with its end mark (and content checksum,
/// when flagged), and a content-size field must equal what the blocks decode to ([`frame_extent`]). Data after the
/// frame is ignored (the trailing zeros of a shared-memory segment; upstream decoders tolerate them too).
pub fn decompress_frame_into(src: &[u8], dst: &mut [u8]) -> Result<(), FormatError> {
    let extent = frame_extent(src)?;
    let mut dec = lz4_flex::frame::FrameDecoder::new(&src[..extent.len]);
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
    // The rest of the frame must be its end mark: reading on checks the content size and checksum.
    let mut probe = [0u8; 1];
    match dec.read(&mut probe) {
        Ok(0) => Ok(()),
        Ok(_) => Err(FormatError::DecompressedSize {
            expected: dst.len(),
            found: dst.len() + 1,
        }),
        Err(e) => match extent.content_size {
            Some(declared) if declared != dst.len() as u64 => Err(FormatError::Lz4ContentSize {
                declared,
                decoded: dst.len(),
            }),
            _ => Err(FormatError::Lz4 {
                reason: frame_reason(&e),
            }),
        },
    }
}

fn frame_reason(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return "frame is truncated";
    }
    // lz4_flex's errors display as their variant names.
    let msg = e.to_string();
    if msg.contains("Magic") || msg.contains("magic") {
        "bad frame magic number"
    } else if msg.contains("ContentChecksum") {
        "frame content checksum mismatch"
    } else if msg.contains("BlockChecksum") {
        "frame block checksum mismatch"
    } else if msg.contains("Checksum") || msg.contains("checksum") {
        "frame checksum mismatch"
    } else if msg.contains("Dictionary") {
        "frame needs an external dictionary"
    } else {
        "corrupt frame"
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

    /// A frame with content size, block checksums and content checksum, built by hand from `frame_block`s.
    fn checked_frame(body: &[u8], content_size: Option<u64>) -> Vec<u8> {
        let mut flg = 0x60u8 | 0x10 | 0x04;
        if content_size.is_some() {
            flg |= 0x08;
        }
        let mut frame = vec![0x04, 0x22, 0x4d, 0x18, flg, 0x40];
        if let Some(size) = content_size {
            frame.extend_from_slice(&size.to_le_bytes());
        }
        frame.push((xxhash_rust::xxh32::xxh32(&frame[4..], 0) >> 8) as u8);
        for chunk in body.chunks(64 << 10) {
            let block = frame_block(chunk);
            frame.extend_from_slice(&block);
            frame.extend_from_slice(&xxhash_rust::xxh32::xxh32(&block[4..], 0).to_le_bytes());
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(&xxhash_rust::xxh32::xxh32(body, 0).to_le_bytes());
        frame
    }

    #[test]
    fn frames_must_end_with_their_end_mark() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 7) as u8).collect();
        for frame in [
            compress_frame(&body),
            checked_frame(&body, None),
            checked_frame(&body, Some(body.len() as u64)),
        ] {
            let mut out = vec![0u8; body.len()];
            decompress_frame_into(&frame, &mut out).unwrap();
            assert_eq!(out, body);
            // Trailing bytes after a complete frame are ignored.
            let mut padded = frame.clone();
            padded.extend_from_slice(&[0; 9]);
            decompress_frame_into(&padded, &mut out).unwrap();
            // Every cut inside the tail (end mark, content checksum) is rejected, naming the missing end.
            for cut in 1..=8.min(frame.len()) {
                let err = decompress_frame_into(&frame[..frame.len() - cut], &mut out).unwrap_err();
                assert!(
                    matches!(err, FormatError::Lz4NoEndMark { .. }),
                    "cut {cut}: {err:?}"
                );
                assert!(err.to_string().contains("end mark"), "{err}");
            }
        }
    }

    #[test]
    fn content_size_must_match_the_blocks() {
        let body = vec![3u8; 1000];
        for declared in [999u64, 1001, 0, 1 << 60] {
            let frame = checked_frame(&body, Some(declared));
            let mut out = vec![0u8; 1000];
            let err = decompress_frame_into(&frame, &mut out).unwrap_err();
            assert_eq!(
                err,
                FormatError::Lz4ContentSize {
                    declared,
                    decoded: 1000
                }
            );
        }
    }

    #[test]
    fn checksums_are_checked() {
        let body = vec![5u8; 5000];
        let mut frame = checked_frame(&body, None);
        let n = frame.len();
        frame[n - 1] ^= 1;
        let mut out = vec![0u8; 5000];
        let err = decompress_frame_into(&frame, &mut out).unwrap_err();
        assert_eq!(
            err,
            FormatError::Lz4 {
                reason: "frame content checksum mismatch"
            }
        );
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
