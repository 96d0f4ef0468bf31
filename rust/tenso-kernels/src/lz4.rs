//! LZ4 frames of large bodies, compressed on every core.
//!
//! A frame whose blocks are independent can be compressed block by block in any order. Bodies of at least two
//! [`FRAME_BLOCK_SIZE`] blocks are cut into 4 MiB blocks ([`tenso_format::lz4::frame_block`]) that threads compress
//! side by side, then framed by [`tenso_format::lz4::frame_from_blocks`]; smaller bodies, and every body on a
//! one-core machine, go through `lz4_flex`'s frame encoder ([`tenso_format::lz4::compress_frame`], the bytes tenso
//! 0.24.0 writes). Every LZ4 frame reader decodes both.

pub use tenso_format::lz4::FRAME_BLOCK_SIZE;

/// The LZ4 frame of `body`, on as many threads as the machine has cores (see the module docs).
pub fn compress_frame(body: &[u8]) -> Vec<u8> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    compress_frame_on(body, threads)
}

/// The LZ4 frame of `body` on up to `threads` threads: [`compress_blocks`] when there are at least two threads and
/// two blocks, else `lz4_flex`'s frame encoder.
pub fn compress_frame_on(body: &[u8], threads: usize) -> Vec<u8> {
    if threads < 2 || body.len() < 2 * FRAME_BLOCK_SIZE {
        return tenso_format::lz4::compress_frame(body);
    }
    compress_blocks(body, threads)
}

/// The frame of independent [`FRAME_BLOCK_SIZE`] blocks of `body`, compressed on up to `threads` threads. The bytes
/// do not depend on `threads`.
pub fn compress_blocks(body: &[u8], threads: usize) -> Vec<u8> {
    compress_blocks_of(body, FRAME_BLOCK_SIZE, threads)
}

/// [`compress_blocks`] with blocks of `block` bytes (at most [`FRAME_BLOCK_SIZE`]; smaller only in tests, to get many
/// blocks out of little data).
fn compress_blocks_of(body: &[u8], block: usize, threads: usize) -> Vec<u8> {
    debug_assert!(block > 0 && block <= FRAME_BLOCK_SIZE);
    let chunks: Vec<&[u8]> = body.chunks(block).collect();
    let per_thread = chunks.len().div_ceil(threads.max(1)).max(1);
    let blocks: Vec<Vec<u8>> = std::thread::scope(|scope| {
        let workers: Vec<_> = chunks
            .chunks(per_thread)
            .map(|group| {
                scope.spawn(move || {
                    group
                        .iter()
                        .map(|c| tenso_format::lz4::frame_block(c))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a compression worker panicked"))
            .collect()
    });
    tenso_format::lz4::frame_from_blocks(&blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenso_format::lz4::decompress_frame_into;

    /// Compressible bytes with some noise, so blocks are stored compressed.
    fn body(len: usize) -> Vec<u8> {
        let noise = crate::test_bytes(len, 9);
        (0..len)
            .map(|i| if i % 5 == 0 { noise[i] } else { (i / 64) as u8 })
            .collect()
    }

    fn round_trip(frame: &[u8], want: &[u8]) {
        if cfg!(miri) {
            // The frame decoder fills a buffer of the frame's 4 MiB block size: minutes under Miri. Decoding is
            // tenso-format's (safe) code, tested natively.
            return;
        }
        let mut back = vec![0u8; want.len()];
        decompress_frame_into(frame, &mut back).expect("a valid frame");
        assert!(back == want, "round trip of {} bytes", want.len());
    }

    #[test]
    fn blocks_are_independent_of_threads() {
        // Under Miri (which checks lz4_flex's unsafe compressor and the threads here) a few hundred bytes.
        let data = body(if cfg!(miri) { 400 } else { 300_000 });
        let block = data.len() / 7; // 8 blocks, the last one short
        let one = compress_blocks_of(&data, block, 1);
        let threads: &[usize] = if cfg!(miri) { &[3] } else { &[2, 3, 16] };
        for &threads in threads {
            assert_eq!(compress_blocks_of(&data, block, threads), one);
        }
        round_trip(&one, &data);
        // Random bytes do not shrink: stored blocks.
        let noise = crate::test_bytes(300, 5);
        round_trip(&compress_blocks_of(&noise, 100, 2), &noise);
        round_trip(&compress_blocks_of(&[], 1000, 2), &[]);
    }

    #[test]
    fn small_bodies_use_the_frame_encoder() {
        let data = body(if cfg!(miri) { 200 } else { 100_000 });
        let frame = compress_frame_on(&data, 8);
        assert_eq!(frame, tenso_format::lz4::compress_frame(&data));
        round_trip(&frame, &data);
    }

    #[test]
    #[cfg_attr(miri, ignore = "tens of megabytes: too slow under Miri")]
    fn large_bodies_in_parallel() {
        let data = body(2 * FRAME_BLOCK_SIZE + 12_345);
        let parallel = compress_frame_on(&data, 4);
        assert_eq!(parallel, compress_blocks(&data, 1));
        assert_eq!(
            compress_frame_on(&data, 1),
            tenso_format::lz4::compress_frame(&data)
        );
        round_trip(&parallel, &data);
    }
}
