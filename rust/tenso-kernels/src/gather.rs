//! Gathering a strided array into C order in one pass.
//!
//! NumPy's generic copy walks element by element through an iterator; for the layouts people actually send (a slice
//! with a step, a transposed matrix, a column block) that costs several times a plain memcpy. Here the layout is first
//! simplified (unit dimensions dropped, dimensions that are contiguous with each other merged), then copied with the
//! cheapest loop that fits it: whole rows, cache-sized tiles for transposes, or fixed-size element moves
//! ([`Path::Specialized`]). [`Path::Portable`] is the reference loop: one element at a time, in C order, on one thread.
//!
//! Everything here is safe code over slices; the caller turns an array's memory span into a slice (the binding does
//! so next to the array it borrows) and [`Strided::try_new`] checks that every element lies inside it.

use std::sync::Mutex;

/// Edge of the square tiles used for transposed layouts: 32 x 32 elements of up to 16 bytes stay within L1.
const TILE: usize = 32;

/// A gather implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Loops chosen by layout: row copies, cache tiles for transposes (on several threads when large), fixed-size
    /// element moves that the compiler vectorizes.
    Specialized,
    /// One element at a time, in C order, on one thread.
    Portable,
}

impl Path {
    /// The name reported to Python (`tenso.tenso_rs._kernel_paths()`): `specialized` or `portable`.
    pub fn name(self) -> &'static str {
        match self {
            Path::Specialized => "specialized",
            Path::Portable => "portable",
        }
    }

    /// The path [`Strided::gather_into`] takes: [`Path::Portable`] when forced (see the crate docs).
    pub fn active() -> Path {
        if crate::portable_forced() {
            Path::Portable
        } else {
            Path::Specialized
        }
    }
}

/// A strided view of `src`: element `[i0, i1, ...]` starts at byte `origin + sum(i_k * strides[k])`.
#[derive(Debug, Clone, Copy)]
pub struct Strided<'a> {
    src: &'a [u8],
    origin: usize,
    shape: &'a [usize],
    strides: &'a [isize],
    itemsize: usize,
}

impl<'a> Strided<'a> {
    /// A view of the elements of `shape` and byte `strides` (NumPy's), each `itemsize` bytes, the first at byte
    /// `origin` of `src`. `None` unless `shape` and `strides` have the same length, `itemsize` is not zero and every
    /// element lies inside `src` (an array with no elements needs no bytes).
    pub fn try_new(
        src: &'a [u8],
        origin: usize,
        shape: &'a [usize],
        strides: &'a [isize],
        itemsize: usize,
    ) -> Option<Self> {
        if shape.len() != strides.len() || itemsize == 0 {
            return None;
        }
        shape.iter().try_fold(itemsize, |n, &d| n.checked_mul(d))?;
        if let Some((low, len)) = Self::span(shape, strides, itemsize) {
            let first = isize::try_from(origin).ok()?.checked_add(low)?;
            let first = usize::try_from(first).ok()?;
            if first.checked_add(len)? > src.len() {
                return None;
            }
        }
        Some(Strided {
            src,
            origin,
            shape,
            strides,
            itemsize,
        })
    }

    /// The byte span `(lowest offset, length)` that an array of this shape and strides touches, relative to the
    /// first element; `None` for an empty array (or one whose offsets overflow).
    pub fn span(shape: &[usize], strides: &[isize], itemsize: usize) -> Option<(isize, usize)> {
        let mut low = 0isize;
        let mut high = 0isize;
        for (&n, &s) in shape.iter().zip(strides) {
            if n == 0 {
                return None;
            }
            let reach = s.checked_mul(n as isize - 1)?;
            if reach < 0 {
                low = low.checked_add(reach)?;
            } else {
                high = high.checked_add(reach)?;
            }
        }
        let len = usize::try_from(high - low).ok()?.checked_add(itemsize)?;
        Some((low, len))
    }

    /// Bytes of the C-order copy: `product(shape) * itemsize`.
    pub fn len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.itemsize
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies every element, in C order, into `dst`, on the [active](Path::active) path.
    ///
    /// On the specialized path, large transposes are split along their outermost dimension across threads: their
    /// reads are bound by memory latency (every element of a source column sits on another page), so each core adds
    /// throughput. Row copies and strided rows stream through memory at full bandwidth already, and stay on one thread.
    ///
    /// # Panics
    ///
    /// If `dst.len()` is not [`Self::len`].
    pub fn gather_into(&self, dst: &mut [u8]) {
        self.gather_on(Path::active(), dst);
    }

    /// [`Self::gather_into`] on `path` (for tests and benchmarks).
    ///
    /// # Panics
    ///
    /// If `dst.len()` is not [`Self::len`].
    pub fn gather_on(&self, path: Path, dst: &mut [u8]) {
        assert_eq!(dst.len(), self.len(), "gather output of the wrong size");
        match path {
            Path::Portable => self.gather_portable(dst),
            Path::Specialized => {
                let dims = simplify(self.shape, self.strides);
                let size = self.itemsize as isize;
                let transposed =
                    matches!(dims.as_slice(), [.., (_, rs), (_, cs)] if *rs == size && *cs != size);
                let threads = if transposed {
                    parallelism(dst.len())
                } else {
                    1
                };
                self.gather_threads(&dims, dst, threads);
            }
        }
    }

    /// The portable path: an odometer over the original shape and strides, one element per step.
    fn gather_portable(&self, dst: &mut [u8]) {
        let (shape, strides, size) = (self.shape, self.strides, self.itemsize);
        let mut index = vec![0usize; shape.len()];
        let mut offset = self.origin as isize;
        for element in dst.chunks_exact_mut(size) {
            let at = offset as usize;
            element.copy_from_slice(&self.src[at..at + size]);
            for k in (0..shape.len()).rev() {
                index[k] += 1;
                offset += strides[k];
                if index[k] < shape[k] {
                    break;
                }
                offset -= strides[k] * shape[k] as isize;
                index[k] = 0;
            }
        }
    }

    /// [`Self::gather_into`] of the simplified `dims` on up to `threads` threads.
    fn gather_threads(&self, dims: &[(usize, isize)], dst: &mut [u8], threads: usize) {
        if dst.is_empty() {
            return;
        }
        let origin = self.origin as isize;
        match dims.split_first() {
            Some((&(n0, s0), rest)) if threads > 1 && n0 >= 2 * TILE => {
                // Several bands per thread, taken in turn: a thread slowed down by other work on its core takes
                // fewer of them instead of holding the others up.
                let band_rows = (n0 / (threads * 8)).max(TILE).next_multiple_of(TILE);
                let row_bytes = dst.len() / n0;
                let bands = Mutex::new(dst.chunks_mut(band_rows * row_bytes).enumerate());
                std::thread::scope(|scope| {
                    for _ in 0..threads {
                        scope.spawn(|| loop {
                            let next = bands.lock().unwrap_or_else(|e| e.into_inner()).next();
                            let Some((band, out)) = next else { break };
                            let mut sub = Vec::with_capacity(dims.len());
                            sub.push((out.len() / row_bytes, s0));
                            sub.extend_from_slice(rest);
                            let at = origin + (band * band_rows) as isize * s0;
                            self.gather_dims(&sub, at, out);
                        });
                    }
                });
            }
            _ => self.gather_dims(dims, origin, dst),
        }
    }

    /// [`Self::gather_into`] for simplified `dims` whose first element is at byte `origin` of the source.
    fn gather_dims(&self, dims: &[(usize, isize)], origin: isize, dst: &mut [u8]) {
        let size = self.itemsize;
        match dims {
            [] => {
                let at = origin as usize;
                dst.copy_from_slice(&self.src[at..at + size])
            }
            [.., (n, s)] if *s == size as isize => {
                let row = n * size;
                let outer = &dims[..dims.len() - 1];
                for_each_offset(outer, origin, dst.chunks_exact_mut(row), |off, out| {
                    out.copy_from_slice(&self.src[off..off + row]);
                });
            }
            [.., (rows, rs), (cols, cs)] if *rs == size as isize => {
                let (rows, cols, cs) = (*rows, *cols, *cs);
                let outer = &dims[..dims.len() - 2];
                for_each_offset(
                    outer,
                    origin,
                    dst.chunks_exact_mut(rows * cols * size),
                    |off, out| {
                        transpose(self.src, off, rows, cols, cs, size, out);
                    },
                );
            }
            [.., (n, s)] => {
                let (n, s) = (*n, *s);
                let outer = &dims[..dims.len() - 1];
                for_each_offset(outer, origin, dst.chunks_exact_mut(n * size), |off, out| {
                    strided_row(self.src, off as isize, s, size, out);
                });
            }
        }
    }
}

/// Bytes of output per gather thread, at least.
const BYTES_PER_THREAD: usize = 8 << 20;

/// Threads for a gather of `len` bytes: one per [`BYTES_PER_THREAD`], at most one per core (and 8).
fn parallelism(len: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(8).min(len / BYTES_PER_THREAD).max(1)
}

/// Drops unit dimensions and merges each dimension into the next inner one when they are laid out back to back.
fn simplify(shape: &[usize], strides: &[isize]) -> Vec<(usize, isize)> {
    let mut inner_first: Vec<(usize, isize)> = Vec::with_capacity(shape.len());
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n == 1 {
            continue;
        }
        if let Some(last) = inner_first.last_mut() {
            if s == last.1 * last.0 as isize {
                last.0 *= n;
                continue;
            }
        }
        inner_first.push((n, s));
    }
    inner_first.reverse();
    inner_first
}

/// Calls `f(offset, chunk)` for every index of the `outer` dimensions, in C order, with the matching output chunk.
fn for_each_offset<'d>(
    outer: &[(usize, isize)],
    origin: isize,
    mut chunks: impl Iterator<Item = &'d mut [u8]>,
    mut f: impl FnMut(usize, &mut [u8]),
) {
    let mut index = vec![0usize; outer.len()];
    let mut offset = origin;
    loop {
        match chunks.next() {
            Some(chunk) => f(offset as usize, chunk),
            None => return,
        }
        // Odometer: bump the innermost outer index, carrying into the ones above.
        let mut k = outer.len();
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            index[k] += 1;
            offset += outer[k].1;
            if index[k] < outer[k].0 {
                break;
            }
            offset -= outer[k].1 * outer[k].0 as isize;
            index[k] = 0;
        }
    }
}

/// One output row of `out.len() / size` elements read `stride` bytes apart from `start`.
fn strided_row(src: &[u8], start: isize, stride: isize, size: usize, out: &mut [u8]) {
    match size {
        1 => strided_row_n::<1>(src, start, stride, out),
        2 => strided_row_n::<2>(src, start, stride, out),
        4 => strided_row_n::<4>(src, start, stride, out),
        8 => strided_row_n::<8>(src, start, stride, out),
        16 => strided_row_n::<16>(src, start, stride, out),
        _ => {
            let mut at = start;
            for element in out.chunks_exact_mut(size) {
                element.copy_from_slice(&src[at as usize..at as usize + size]);
                at += stride;
            }
        }
    }
}

fn strided_row_n<const N: usize>(src: &[u8], start: isize, stride: isize, out: &mut [u8]) {
    let count = out.len() / N;
    if stride > 0 && count > 0 {
        // Forward strides: walk the source row in stride-sized chunks, so the loop carries no index arithmetic and
        // the compiler can keep it tight (the common `a[:, ::k]` case).
        let step = stride as usize;
        let first = start as usize;
        let row = &src[first..first + (count - 1) * step + N];
        let (body, last) = out.split_at_mut((count - 1) * N);
        // Fixed-size chunks on both sides let the compiler turn the common steps into vector shuffles.
        match step / N {
            2 if step == 2 * N => pick::<N, 2>(body, row),
            3 if step == 3 * N => pick::<N, 3>(body, row),
            4 if step == 4 * N => pick::<N, 4>(body, row),
            _ => {
                for (element, chunk) in body.chunks_exact_mut(N).zip(row.chunks(step)) {
                    element.copy_from_slice(&chunk[..N]);
                }
            }
        }
        last.copy_from_slice(&row[row.len() - N..]);
        return;
    }
    let mut at = start;
    for element in out.chunks_exact_mut(N) {
        let from = at as usize;
        element.copy_from_slice(&src[from..from + N]);
        at += stride;
    }
}

/// Copies the first element of every group of `K` consecutive elements of `row` into `out`.
fn pick<const N: usize, const K: usize>(out: &mut [u8], row: &[u8]) {
    for (element, group) in out.chunks_exact_mut(N).zip(row.chunks_exact(N * K)) {
        element.copy_from_slice(&group[..N]);
    }
}

/// C-order copy of a `rows x cols` block whose rows are contiguous in the source (element stride `size`) and whose
/// columns are `col_stride` apart: a transpose, done in tiles so that both sides stay in cache.
fn transpose(
    src: &[u8],
    start: usize,
    rows: usize,
    cols: usize,
    col_stride: isize,
    size: usize,
    out: &mut [u8],
) {
    match size {
        1 => transpose_n::<1>(src, start, rows, cols, col_stride, out),
        2 => transpose_n::<2>(src, start, rows, cols, col_stride, out),
        4 => transpose_n::<4>(src, start, rows, cols, col_stride, out),
        8 => transpose_n::<8>(src, start, rows, cols, col_stride, out),
        16 => transpose_n::<16>(src, start, rows, cols, col_stride, out),
        _ => {
            for r in 0..rows {
                for c in 0..cols {
                    let from =
                        (start as isize + (r * size) as isize + c as isize * col_stride) as usize;
                    let to = (r * cols + c) * size;
                    out[to..to + size].copy_from_slice(&src[from..from + size]);
                }
            }
        }
    }
}

fn transpose_n<const N: usize>(
    src: &[u8],
    start: usize,
    rows: usize,
    cols: usize,
    col_stride: isize,
    out: &mut [u8],
) {
    // Within a tile, each output row is written front to back (one bounds check per row) while the reads walk the
    // tile's columns, which are TILE consecutive elements apart in the source rows: both sides stay in L1.
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        for c0 in (0..cols).step_by(TILE) {
            let c1 = (c0 + TILE).min(cols);
            for r in r0..r1 {
                let row = &mut out[(r * cols + c0) * N..(r * cols + c1) * N];
                let mut from = start as isize + (r * N) as isize + c0 as isize * col_stride;
                for element in row.chunks_exact_mut(N) {
                    let at = from as usize;
                    element.copy_from_slice(&src[at..at + N]);
                    from += col_stride;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: element-by-element copy through explicit index arithmetic.
    fn naive(
        src: &[u8],
        origin: usize,
        shape: &[usize],
        strides: &[isize],
        size: usize,
    ) -> Vec<u8> {
        let count: usize = shape.iter().product();
        let mut out = Vec::with_capacity(count * size);
        for flat in 0..count {
            let mut rem = flat;
            let mut off = origin as isize;
            for k in (0..shape.len()).rev() {
                off += (rem % shape[k]) as isize * strides[k];
                rem /= shape[k];
            }
            out.extend_from_slice(&src[off as usize..off as usize + size]);
        }
        out
    }

    fn check(shape: &[usize], strides: &[isize], size: usize) {
        // The span starts `shift` bytes into the source, so that no path relies on an aligned source.
        for shift in [0usize, 3] {
            let (low, len) = Strided::span(shape, strides, size).expect("non-empty");
            let src: Vec<u8> = (0..len + shift).map(|i| (i * 7 + 3) as u8).collect();
            let origin = (-low) as usize + shift;
            let expected = naive(&src, origin, shape, strides, size);
            let strided = Strided::try_new(&src, origin, shape, strides, size).expect("in bounds");
            let what = format!("shape {shape:?} strides {strides:?} size {size} shift {shift}");
            // One thread, and bands across three (what large arrays get on a multi-core machine).
            for threads in [1, 3] {
                let mut got = vec![0u8; expected.len()];
                strided.gather_threads(&simplify(shape, strides), &mut got, threads);
                assert_eq!(got, expected, "{what} threads {threads}");
            }
            for path in [Path::Specialized, Path::Portable] {
                let mut got = vec![0u8; expected.len()];
                strided.gather_on(path, &mut got);
                assert_eq!(got, expected, "{what} {path:?}");
            }
            let mut got = vec![0u8; expected.len()];
            strided.gather_into(&mut got);
            assert_eq!(got, expected, "{what} active path");
        }
    }

    #[test]
    fn specialized_matches_portable_on_many_shapes() {
        // Transposes, column steps and reversed rows of every size around the tile edges.
        // Miri checks memory safety, and this module is safe code over slices: a few small shapes suffice there.
        let dims: &[usize] = if cfg!(miri) {
            &[1, 2, 5]
        } else {
            &[1, 2, 31, 32, 33, 65]
        };
        let sizes: &[usize] = if cfg!(miri) {
            &[1, 8, 3]
        } else {
            &[1, 2, 4, 8, 16, 12]
        };
        for &size in sizes {
            let s = size as isize;
            for &rows in dims {
                for &cols in dims {
                    let (r, c) = (rows as isize, cols as isize);
                    check(&[rows, cols], &[s, r * s], size); // transposed
                    check(&[rows, cols], &[2 * c * s, 2 * s], size); // every other column
                    check(&[rows, cols], &[-c * s, s], size); // reversed rows
                    check(&[rows, cols], &[3 * c * s, -3 * s], size); // reversed, every third column
                }
            }
        }
    }

    #[test]
    fn try_new_checks_bounds() {
        let src = [0u8; 24];
        assert!(Strided::try_new(&src, 0, &[2, 3], &[12, 4], 4).is_some());
        assert!(
            Strided::try_new(&src, 1, &[2, 3], &[12, 4], 4).is_none(),
            "last element past the end"
        );
        assert!(Strided::try_new(&src, 8, &[2, 3], &[-8, 4], 4).is_some());
        assert!(
            Strided::try_new(&src, 7, &[2, 3], &[-8, 4], 4).is_none(),
            "first row before the start"
        );
        assert!(
            Strided::try_new(&src, 0, &[2, 3], &[12], 4).is_none(),
            "strides of another rank"
        );
        assert!(
            Strided::try_new(&src, 0, &[3], &[4], 0).is_none(),
            "zero itemsize"
        );
        assert!(
            Strided::try_new(&src, 0, &[usize::MAX, 2], &[0, 0], 4).is_none(),
            "size overflows"
        );
        let empty = Strided::try_new(&[], 99, &[4, 0], &[8, 8], 8).expect("no element, no byte");
        assert!(empty.is_empty());
        empty.gather_into(&mut []);
        let scalar = Strided::try_new(&src, 20, &[], &[], 4).expect("0-d");
        let mut one = [9u8; 4];
        scalar.gather_on(Path::Portable, &mut one);
        assert_eq!(one, [0; 4]);
    }

    #[test]
    fn layouts() {
        let sizes: &[usize] = if cfg!(miri) {
            &[1, 8, 3]
        } else {
            &[1, 2, 4, 8, 16, 3]
        };
        for &size in sizes {
            let s = size as isize;
            check(&[5, 7], &[7 * s, s], size); // contiguous
            check(&[5, 7], &[s, 5 * s], size); // transposed
            if !cfg!(miri) {
                check(&[70, 45], &[s, 70 * s], size); // transposed, several tiles
                check(&[100, 37], &[s, 100 * s], size); // transposed: bands of whole tiles, and a ragged one
            }
            check(&[2, 24, 16], &[384 * s, s, 24 * s], size); // batched transposes, split by batch
            check(&[50, 9], &[-18 * s, 2 * s], size); // every other column of reversed rows, in bands
            check(&[6, 4], &[8 * s, 2 * s], size); // every other column
            check(&[3, 4, 5], &[s, 3 * s, 12 * s], size); // fully reversed axes
            check(&[4, 1, 6], &[-6 * s, 99, s], size); // negative stride, unit dim
            check(&[2, 3, 4], &[12 * s, -4 * s, -s], size); // reversed inner axes
            check(&[3, 5, 2], &[10 * s, s, 5 * s], size); // batched transpose
            check(&[9], &[3 * s], size); // 1-D strided
            check(&[], &[], size); // 0-d
        }
    }

    #[test]
    fn span_of_empty_is_none() {
        assert_eq!(Strided::span(&[3, 0], &[4, 4], 4), None);
    }
}
