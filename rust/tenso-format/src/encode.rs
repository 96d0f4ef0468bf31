//! Writing packets: a two-step plan/fill API for callers that place bodies themselves, and a
//! one-call [`encode`].
//!
//! Output is byte-identical to tenso 0.24.0 (v4) and 0.19.4 (v3, with the plain XXH3 footer) for
//! uncompressed packets: the writer rule of FORMAT.md §4.2 (`alignment == 64` → `ALIGNED`, otherwise
//! `CUST_ALIGN` and an exponent byte), zero padding relative to each packet's own start, bundle and
//! sparse headers without option flags, sparse components without integrity or compression (aligned to
//! `alignment` in v3 and to 64 in v4), quantized layout A (v3) or B (v4), string tensors (v4) always
//! `ALIGNED`.
//!
//! ```text
//! plan(item)            → Plan { len, slots }   sizes only, no body work
//! encode_into(item,out) → writes everything except Deferred bodies and their footers
//! caller                → copies each Deferred body into out[slot.body]
//! seal(out, slots)      → computes the footers of Deferred bodies
//! ```

use crate::consts::*;
use crate::dtype::{DType, QDType, QuantScheme, SparseFormat, Version};
use crate::error::FormatError;
use crate::header::{checked_elements, pad_to, Header};
use std::ops::Range;

/// Options of the writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Protocol version for the whole tree. Default v4.
    pub version: Version,
    /// Body alignment (a power of two). Default 64.
    pub alignment: usize,
    /// Write XXH3-64 footers on leaves. Default false.
    pub integrity: bool,
    /// Compress dense leaves with LZ4 (honoured by [`encode`] only). Default false.
    pub compress: bool,
    /// The one-shot XXH3-64 of single-piece footers (see [`crate::hash`]); `None`: `xxhash-rust`.
    pub xxh3: Option<crate::hash::Xxh3Fn>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            version: Version::V4,
            alignment: DEFAULT_ALIGNMENT,
            integrity: false,
            compress: false,
            xxh3: None,
        }
    }
}

impl EncodeOptions {
    /// These options with `f` as the one-shot XXH3-64.
    pub fn with_xxh3(self, f: crate::hash::Xxh3Fn) -> Self {
        EncodeOptions {
            xxh3: Some(f),
            ..self
        }
    }

    /// Checks the alignment: a power of two, at most `2^63`.
    pub fn validate(&self) -> Result<(), FormatError> {
        if !self.alignment.is_power_of_two()
            || self.alignment.trailing_zeros() > u32::from(MAX_ALIGN_EXPONENT)
        {
            return Err(FormatError::BadAlignment {
                alignment: self.alignment as u64,
            });
        }
        Ok(())
    }
}

/// A value to write.
#[derive(Debug, Clone, PartialEq)]
pub enum Item<'a> {
    /// A dense array.
    Dense {
        /// Element type.
        dtype: DType,
        /// Shape (each dimension at most `u32::MAX`).
        shape: Vec<u64>,
        /// Where the body comes from.
        body: BodySrc<'a>,
    },
    /// A bundle: entries written in this order (at most 255).
    Bundle(Vec<(&'a str, Item<'a>)>),
    /// A sparse matrix; components must be `Item::Dense` with `Bytes` or `Deferred` bodies.
    Sparse {
        /// Storage format.
        format: SparseFormat,
        /// Logical shape (rows, cols).
        shape: [u64; 2],
        /// COO: data, row, col; CSR/CSC: data, indices, indptr.
        components: Box<[Item<'a>; 3]>,
    },
    /// A quantized tensor (never compressed; v3 does not record the per-channel axis, see [`Plan::dropped_axes`]).
    Quantized {
        /// Code type.
        qdtype: QDType,
        /// Scheme.
        scheme: QuantScheme,
        /// Channel axis (per-channel), written in v4 only.
        axis: u8,
        /// Group size, written as given.
        group_size: u32,
        /// Logical shape.
        shape: Vec<u64>,
        /// Scales.
        scales: &'a [f32],
        /// Zero points (same count as scales).
        zero_points: &'a [f32],
        /// Packed codes (`packed_len(N)` bytes).
        codes: &'a [u8],
    },
    /// A v4 string tensor.
    Strings {
        /// `count + 1` offsets from 0 to `payload.len()`, non-decreasing.
        offsets: &'a [u64],
        /// Concatenated string bytes.
        payload: &'a [u8],
    },
}

/// Where a dense body comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodySrc<'a> {
    /// The C-order little-endian body, exactly `N * itemsize` bytes.
    Bytes(&'a [u8]),
    /// The caller copies the body into the slot reported by [`encode_into`].
    Deferred,
    /// An LZ4 frame of the body; the leaf gets `FLAG_COMPRESSION`.
    Lz4Frame(&'a [u8]),
}

/// The place of a deferred body in the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Byte range of the body in the output.
    pub body: Range<usize>,
    /// Offset of the 8-byte footer to compute with [`seal`], when the leaf has integrity.
    pub footer: Option<usize>,
}

/// The size of an encoded packet and the slots of its deferred bodies (depth-first order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Total length in bytes.
    pub len: usize,
    /// Deferred bodies.
    pub slots: Vec<Slot>,
    /// Per-channel quantized tensors written as v3 along an axis other than 0: v3 has no axis byte, so
    /// readers infer the first axis whose length equals the number of scales (FORMAT.md §9.3), as
    /// 0.19.4 writes them. Callers may warn that the axis is not recorded.
    pub dropped_axes: usize,
}

/// Offset of the body of a dense packet: header + shape + exponent byte + padding.
pub fn dense_prefix_len(version: Version, ndim: usize, alignment: usize) -> usize {
    let mut p = version.header_len() + 4 * ndim;
    if alignment != DEFAULT_ALIGNMENT {
        p += 1;
    }
    p + pad_to(p as u64, alignment as u64) as usize
}

/// Sizes the packet and validates every limit (ndim, dimensions, element counts, entry counts,
/// body lengths, quantization metadata). No body is read.
pub fn plan(item: &Item<'_>, opts: &EncodeOptions) -> Result<Plan, FormatError> {
    opts.validate()?;
    let mut e = Emitter::new(None, None, opts);
    e.item(item, opts, 0)?;
    Ok(Plan {
        len: e.pos,
        slots: e.slots,
        dropped_axes: e.dropped_axes,
    })
}

/// Writes the packet into `out` (exactly `plan.len` bytes), zero padding included, except deferred
/// bodies and their footers. Returns the plan.
pub fn encode_into(
    item: &Item<'_>,
    opts: &EncodeOptions,
    out: &mut [u8],
) -> Result<Plan, FormatError> {
    let p = plan(item, opts)?;
    if out.len() != p.len {
        return Err(FormatError::OutputSize {
            expected: p.len,
            found: out.len(),
        });
    }
    let mut e = Emitter::new(Some(out), None, opts);
    e.item(item, opts, 0)?;
    debug_assert_eq!(e.pos, p.len);
    Ok(p)
}

/// Computes the footers of deferred bodies after the caller filled them, with `xxhash-rust`.
pub fn seal(out: &mut [u8], slots: &[Slot]) {
    seal_with(out, slots, &EncodeOptions::default());
}

/// [`seal`] with the XXH3 implementation of `opts` (the options the plan was made with).
pub fn seal_with(out: &mut [u8], slots: &[Slot], opts: &EncodeOptions) {
    for s in slots {
        if let Some(at) = s.footer {
            let d = digest(opts.xxh3, &[&out[s.body.clone()]]);
            out[at..at + 8].copy_from_slice(&d.to_le_bytes());
        }
    }
}

/// A packet to be written as a stream without holding its bodies: [`skeleton`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skeleton {
    /// The plan: total length and, in order, where each deferred body and its footer go.
    pub plan: Plan,
    /// Every byte of the packet except the deferred bodies and their footers, in order (headers, shapes, keys,
    /// lengths, padding). Writing it piece by piece with each body and footer in its slot gives the packet.
    pub bytes: Vec<u8>,
}

/// Plans a packet whose dense leaves all have [`BodySrc::Deferred`] bodies (bundles of them allowed) and returns
/// everything but the bodies and footers, so that a writer can stream bodies held elsewhere (device memory)
/// without ever holding the whole packet. The bytes are the ones [`encode_into`] would write.
pub fn skeleton(item: &Item<'_>, opts: &EncodeOptions) -> Result<Skeleton, FormatError> {
    fn deferred_only(item: &Item<'_>) -> bool {
        match item {
            Item::Dense { body, .. } => *body == BodySrc::Deferred,
            Item::Bundle(entries) => entries.iter().all(|(_, v)| deferred_only(v)),
            _ => false,
        }
    }
    if !deferred_only(item) {
        return Err(FormatError::Unsupported {
            what: "skeleton of anything but deferred dense bodies and bundles of them",
        });
    }
    let plan = plan(item, opts)?;
    let body_bytes = plan.slots.iter().try_fold(0usize, |acc, s| {
        acc.checked_add(s.body.len() + if s.footer.is_some() { 8 } else { 0 })
    });
    let capacity = body_bytes
        .and_then(|b| plan.len.checked_sub(b))
        .unwrap_or(0);
    let mut e = Emitter::new(None, Some(Vec::with_capacity(capacity)), opts);
    e.item(item, opts, 0)?;
    debug_assert_eq!(e.pos, plan.len);
    let bytes = e.skel.take().unwrap_or_default();
    Ok(Skeleton { plan, bytes })
}

/// Encodes a packet in one call. `Deferred` bodies are not allowed. With `opts.compress`, dense leaves
/// given as `Bytes` (not sparse components) are LZ4-compressed first.
pub fn encode(item: &Item<'_>, opts: &EncodeOptions) -> Result<Vec<u8>, FormatError> {
    if opts.compress {
        let mut frames = Vec::new();
        collect_frames(item, &mut frames)?;
        let mut idx = 0;
        let compressed = with_frames(item, &frames, &mut idx);
        return encode_plain(&compressed, opts);
    }
    encode_plain(item, opts)
}

fn encode_plain(item: &Item<'_>, opts: &EncodeOptions) -> Result<Vec<u8>, FormatError> {
    let p = plan(item, opts)?;
    if !p.slots.is_empty() {
        return Err(FormatError::Unsupported {
            what: "deferred bodies in encode (use plan/encode_into/seal)",
        });
    }
    let mut out = vec![0u8; p.len];
    encode_into(item, opts, &mut out)?;
    Ok(out)
}

#[cfg(feature = "lz4")]
fn compress(b: &[u8]) -> Result<Vec<u8>, FormatError> {
    Ok(crate::lz4::compress_frame(b))
}

#[cfg(not(feature = "lz4"))]
fn compress(_: &[u8]) -> Result<Vec<u8>, FormatError> {
    Err(FormatError::Unsupported {
        what: "lz4 compression (built without the \"lz4\" feature)",
    })
}

fn collect_frames(item: &Item<'_>, frames: &mut Vec<Vec<u8>>) -> Result<(), FormatError> {
    match item {
        Item::Dense {
            body: BodySrc::Bytes(b),
            ..
        } => frames.push(compress(b)?),
        Item::Bundle(entries) => {
            for (_, v) in entries {
                collect_frames(v, frames)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn with_frames<'b>(item: &Item<'b>, frames: &'b [Vec<u8>], idx: &mut usize) -> Item<'b> {
    match item {
        Item::Dense {
            dtype,
            shape,
            body: BodySrc::Bytes(_),
        } => {
            let f = &frames[*idx];
            *idx += 1;
            Item::Dense {
                dtype: *dtype,
                shape: shape.clone(),
                body: BodySrc::Lz4Frame(f),
            }
        }
        Item::Bundle(entries) => Item::Bundle(
            entries
                .iter()
                .map(|(k, v)| (*k, with_frames(v, frames, idx)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[cfg(feature = "xxh3")]
fn digest(xxh3: Option<crate::hash::Xxh3Fn>, parts: &[&[u8]]) -> u64 {
    crate::hash::xxh3_64_parts_with(crate::hash::or_default(xxh3), parts)
}

#[cfg(not(feature = "xxh3"))]
fn digest(_: Option<crate::hash::Xxh3Fn>, _: &[&[u8]]) -> u64 {
    unreachable!("plan refuses integrity without the xxh3 feature")
}

fn check_integrity_available(integrity: bool) -> Result<(), FormatError> {
    if integrity && cfg!(not(feature = "xxh3")) {
        return Err(FormatError::Unsupported {
            what: "integrity footers (built without the \"xxh3\" feature)",
        });
    }
    Ok(())
}

fn check_shape(shape: &[u64]) -> Result<u64, FormatError> {
    if shape.len() > MAX_NDIM {
        return Err(FormatError::TooManyDims {
            ndim: shape.len(),
            limit: MAX_NDIM,
        });
    }
    if let Some(&dim) = shape.iter().find(|&&d| d > u64::from(u32::MAX)) {
        return Err(FormatError::DimTooLarge { dim });
    }
    checked_elements(shape, MAX_ELEMENTS)
}

fn as_len(v: u64, what: &'static str) -> Result<usize, FormatError> {
    usize::try_from(v).map_err(|_| FormatError::LengthOverflow { what })
}

/// Writes (when `out` is set) or only measures (when not) a packet tree. Both modes run the same code so
/// the plan and the output cannot disagree.
struct Emitter<'o> {
    out: Option<&'o mut [u8]>,
    /// [`skeleton`] mode: every byte but deferred bodies and their footers, in order.
    skel: Option<Vec<u8>>,
    pos: usize,
    slots: Vec<Slot>,
    /// [`EncodeOptions::xxh3`].
    xxh3: Option<crate::hash::Xxh3Fn>,
    dropped_axes: usize,
}

impl<'o> Emitter<'o> {
    fn new(out: Option<&'o mut [u8]>, skel: Option<Vec<u8>>, opts: &EncodeOptions) -> Self {
        Self {
            out,
            skel,
            pos: 0,
            slots: Vec::new(),
            xxh3: opts.xxh3,
            dropped_axes: 0,
        }
    }

    fn advance(&mut self, n: usize) -> Result<Range<usize>, FormatError> {
        let start = self.pos;
        self.pos = start
            .checked_add(n)
            .ok_or(FormatError::LengthOverflow { what: "packet" })?;
        Ok(start..self.pos)
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), FormatError> {
        let r = self.advance(b.len())?;
        if let Some(out) = self.out.as_deref_mut() {
            out[r].copy_from_slice(b);
        } else if let Some(skel) = self.skel.as_mut() {
            skel.extend_from_slice(b);
        }
        Ok(())
    }

    fn zeros(&mut self, n: usize) -> Result<(), FormatError> {
        let r = self.advance(n)?;
        if let Some(out) = self.out.as_deref_mut() {
            out[r].fill(0);
        } else if let Some(skel) = self.skel.as_mut() {
            skel.resize(skel.len() + n, 0);
        }
        Ok(())
    }

    fn u32(&mut self, v: u32) -> Result<(), FormatError> {
        self.bytes(&v.to_le_bytes())
    }

    fn header(&mut self, h: Header) -> Result<(), FormatError> {
        let r = self.advance(h.len())?;
        if let Some(out) = self.out.as_deref_mut() {
            h.write(&mut out[r]);
        } else if let Some(skel) = self.skel.as_mut() {
            let at = skel.len();
            skel.resize(at + h.len(), 0);
            h.write(&mut skel[at..]);
        }
        Ok(())
    }

    fn shape(&mut self, shape: &[u64]) -> Result<(), FormatError> {
        for &d in shape {
            self.u32(d as u32)?;
        }
        Ok(())
    }

    /// Exponent byte (for non-64 alignments) and padding, relative to `start`.
    fn align(&mut self, start: usize, alignment: usize) -> Result<(), FormatError> {
        if alignment != DEFAULT_ALIGNMENT {
            self.bytes(&[alignment.trailing_zeros() as u8])?;
        }
        let rel = (self.pos - start) as u64;
        self.zeros(as_len(pad_to(rel, alignment as u64), "padding")?)
    }

    fn footer(&mut self, parts: &[Range<usize>]) -> Result<(), FormatError> {
        let r = self.advance(8)?;
        if let Some(out) = self.out.as_deref_mut() {
            let d = {
                let pieces: Vec<&[u8]> = parts.iter().map(|p| &out[p.clone()]).collect();
                digest(self.xxh3, &pieces)
            };
            out[r].copy_from_slice(&d.to_le_bytes());
        }
        Ok(())
    }

    fn item(
        &mut self,
        item: &Item<'_>,
        opts: &EncodeOptions,
        depth: usize,
    ) -> Result<(), FormatError> {
        match item {
            Item::Dense { dtype, shape, body } => self.dense(
                *dtype,
                shape,
                *body,
                opts.version,
                opts.alignment,
                opts.integrity,
            ),
            Item::Bundle(entries) => self.bundle(entries, opts, depth),
            Item::Sparse {
                format,
                shape,
                components,
            } => self.sparse(*format, *shape, components, opts, depth),
            Item::Quantized {
                qdtype,
                scheme,
                axis,
                group_size,
                shape,
                scales,
                zero_points,
                codes,
            } => self.quantized(
                *qdtype,
                *scheme,
                *axis,
                *group_size,
                shape,
                scales,
                zero_points,
                codes,
                opts,
            ),
            Item::Strings { offsets, payload } => self.strings(offsets, payload, opts),
        }
    }

    fn dense(
        &mut self,
        dtype: DType,
        shape: &[u64],
        body: BodySrc<'_>,
        version: Version,
        alignment: usize,
        integrity: bool,
    ) -> Result<(), FormatError> {
        check_integrity_available(integrity)?;
        let n = check_shape(shape)?;
        let expected = as_len(n * dtype.itemsize() as u64, "body")?;
        let mut flags = if alignment == DEFAULT_ALIGNMENT {
            FLAG_ALIGNED
        } else {
            FLAG_CUST_ALIGN
        };
        if integrity {
            flags |= FLAG_INTEGRITY;
        }
        match body {
            BodySrc::Bytes(b) if b.len() != expected => {
                return Err(FormatError::BodyLength {
                    expected,
                    found: b.len(),
                });
            }
            BodySrc::Lz4Frame(_) => flags |= FLAG_COMPRESSION,
            _ => {}
        }
        let start = self.pos;
        self.header(Header {
            version,
            flags,
            dtype_code: dtype.code(),
            count: shape.len() as u8,
            reserved: 0,
        })?;
        self.shape(shape)?;
        self.align(start, alignment)?;
        let body_range = match body {
            BodySrc::Bytes(b) | BodySrc::Lz4Frame(b) => {
                let r = self.pos..self.pos + b.len();
                self.bytes(b)?;
                r
            }
            BodySrc::Deferred => {
                let r = self.advance(expected)?;
                let footer = if integrity { Some(r.end) } else { None };
                self.slots.push(Slot {
                    body: r.clone(),
                    footer,
                });
                if integrity {
                    // Filled by `seal` once the caller has written the body.
                    self.advance(8)?;
                }
                return Ok(());
            }
        };
        if integrity {
            self.footer(&[body_range])?;
        }
        Ok(())
    }

    fn bundle(
        &mut self,
        entries: &[(&str, Item<'_>)],
        opts: &EncodeOptions,
        depth: usize,
    ) -> Result<(), FormatError> {
        if entries.len() > MAX_BUNDLE_ENTRIES {
            return Err(FormatError::TooManyEntries {
                count: entries.len(),
                limit: MAX_BUNDLE_ENTRIES,
            });
        }
        if depth >= MAX_DEPTH {
            return Err(FormatError::NestingTooDeep { limit: MAX_DEPTH });
        }
        let h = Header {
            version: opts.version,
            flags: FLAG_BUNDLE,
            dtype_code: 0,
            count: entries.len() as u8,
            reserved: 0,
        };
        self.header(h)?;
        for (key, value) in entries {
            let klen = u32::try_from(key.len())
                .map_err(|_| FormatError::LengthOverflow { what: "bundle key" })?;
            self.u32(klen)?;
            self.bytes(key.as_bytes())?;
            let skel_at = self.skel.as_ref().map(Vec::len);
            let vlen_at = self.advance(4)?;
            if let Some(skel) = self.skel.as_mut() {
                skel.extend_from_slice(&[0; 4]);
            }
            let start = self.pos;
            self.item(value, opts, depth + 1)?;
            let vlen =
                u32::try_from(self.pos - start).map_err(|_| FormatError::LengthOverflow {
                    what: "bundle value",
                })?;
            if let Some(out) = self.out.as_deref_mut() {
                out[vlen_at].copy_from_slice(&vlen.to_le_bytes());
            } else if let (Some(skel), Some(at)) = (self.skel.as_mut(), skel_at) {
                skel[at..at + 4].copy_from_slice(&vlen.to_le_bytes());
            }
        }
        Ok(())
    }

    fn sparse(
        &mut self,
        format: SparseFormat,
        shape: [u64; 2],
        components: &[Item<'_>; 3],
        opts: &EncodeOptions,
        depth: usize,
    ) -> Result<(), FormatError> {
        if depth >= MAX_DEPTH {
            return Err(FormatError::NestingTooDeep { limit: MAX_DEPTH });
        }
        if let Some(&dim) = shape.iter().find(|&&d| d > u64::from(u32::MAX)) {
            return Err(FormatError::DimTooLarge { dim });
        }
        let h = Header {
            version: opts.version,
            flags: format.flag(),
            dtype_code: 0,
            count: 2,
            reserved: 0,
        };
        self.header(h)?;
        self.shape(&shape)?;
        // v3 follows the caller's alignment, v4 always 64 (FORMAT.md §8.1); never integrity or compression.
        let alignment = match opts.version {
            Version::V3 => opts.alignment,
            Version::V4 => DEFAULT_ALIGNMENT,
        };
        for c in components.iter() {
            let Item::Dense { dtype, shape, body } = c else {
                return Err(FormatError::BadSparse {
                    reason: "components must be dense arrays",
                });
            };
            if shape.len() != 1 {
                return Err(FormatError::BadSparse {
                    reason: "components must be 1-D",
                });
            }
            if matches!(body, BodySrc::Lz4Frame(_)) {
                return Err(FormatError::BadSparse {
                    reason: "components must not be compressed",
                });
            }
            let n_at = self.advance(4)?;
            let start = self.pos;
            self.dense(*dtype, shape, *body, opts.version, alignment, false)?;
            let n = u32::try_from(self.pos - start).map_err(|_| FormatError::LengthOverflow {
                what: "sparse component",
            })?;
            if let Some(out) = self.out.as_deref_mut() {
                out[n_at].copy_from_slice(&n.to_le_bytes());
            }
        }
        Ok(())
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors the fields of Item::Quantized"
    )]
    fn quantized(
        &mut self,
        qdtype: QDType,
        scheme: QuantScheme,
        axis: u8,
        group_size: u32,
        shape: &[u64],
        scales: &[f32],
        zero_points: &[f32],
        codes: &[u8],
        opts: &EncodeOptions,
    ) -> Result<(), FormatError> {
        check_integrity_available(opts.integrity)?;
        let n = check_shape(shape)?;
        if opts.version == Version::V3 && scheme == QuantScheme::PerChannel && axis != 0 {
            // Written as 0.19.4 writes it: v3 has no axis byte (FORMAT.md §9.3).
            self.dropped_axes += 1;
        }
        let expected = scheme.expected_num_scales(shape, group_size, usize::from(axis))?;
        if scales.len() as u64 != expected || zero_points.len() != scales.len() {
            return Err(FormatError::BadQuant {
                reason: "number of scales/zero points does not match the scheme and shape",
            });
        }
        let num_scales = u32::try_from(scales.len())
            .map_err(|_| FormatError::LengthOverflow { what: "num_scales" })?;
        let len = qdtype.packed_len(n);
        if codes.len() != len {
            return Err(FormatError::BodyLength {
                expected: len,
                found: codes.len(),
            });
        }
        let mut flags = if opts.alignment == DEFAULT_ALIGNMENT {
            FLAG_ALIGNED
        } else {
            FLAG_CUST_ALIGN
        };
        if opts.integrity {
            flags |= FLAG_INTEGRITY;
        }
        let start = self.pos;
        self.header(Header {
            version: opts.version,
            flags,
            dtype_code: qdtype.code(),
            count: shape.len() as u8,
            reserved: 0,
        })?;
        self.shape(shape)?;
        let meta_start = self.pos;
        self.bytes(&[scheme.code()])?;
        if opts.version == Version::V4 {
            self.bytes(&[axis])?;
        }
        self.u32(group_size)?;
        self.u32(num_scales)?;
        for v in scales.iter().chain(zero_points) {
            self.bytes(&v.to_le_bytes())?;
        }
        let meta = meta_start..self.pos;
        self.align(start, opts.alignment)?;
        let body = self.pos..self.pos + codes.len();
        self.bytes(codes)?;
        if opts.integrity {
            match opts.version {
                Version::V3 => self.footer(&[body])?,
                Version::V4 => self.footer(&[meta, body])?,
            }
        }
        Ok(())
    }

    fn strings(
        &mut self,
        offsets: &[u64],
        payload: &[u8],
        opts: &EncodeOptions,
    ) -> Result<(), FormatError> {
        if opts.version != Version::V4 {
            return Err(FormatError::Unsupported {
                what: "string tensors in protocol v3",
            });
        }
        check_integrity_available(opts.integrity)?;
        let Some((&last, _)) = offsets.split_last() else {
            return Err(FormatError::malformed(
                0,
                "string offsets need count + 1 entries",
            ));
        };
        let count = offsets.len() - 1;
        if count as u64 > u64::from(u32::MAX) {
            return Err(FormatError::DimTooLarge { dim: count as u64 });
        }
        if offsets[0] != 0
            || offsets.windows(2).any(|w| w[1] < w[0])
            || last != payload.len() as u64
        {
            return Err(FormatError::malformed(
                0,
                "string offsets must go from 0 to the payload length without decreasing",
            ));
        }
        let mut flags = FLAG_STRING | FLAG_ALIGNED;
        if opts.integrity {
            flags |= FLAG_INTEGRITY;
        }
        let start = self.pos;
        self.header(Header {
            version: Version::V4,
            flags,
            dtype_code: DTYPE_STRING,
            count: 1,
            reserved: 0,
        })?;
        self.u32(count as u32)?;
        self.align(start, DEFAULT_ALIGNMENT)?;
        let body_start = self.pos;
        for o in offsets {
            self.bytes(&o.to_le_bytes())?;
        }
        self.bytes(payload)?;
        if opts.integrity {
            let protected = body_start..self.pos;
            self.footer(std::slice::from_ref(&protected))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The worked examples of FORMAT.md, encoded and decoded.
    use super::*;

    /// The skeleton plus each body and footer, in slot order, is the packet `encode` writes.
    #[cfg(feature = "xxh3")]
    #[test]
    fn skeleton_interleaved_with_bodies_is_the_packet() {
        let a: Vec<u8> = (0..24u8).collect();
        let b: Vec<u8> = (100..103u8).collect();
        let tree = |da: BodySrc<'static>, db: BodySrc<'static>| {
            Item::Bundle(vec![
                (
                    "first",
                    Item::Dense {
                        dtype: DType::Float32,
                        shape: vec![2, 3],
                        body: da,
                    },
                ),
                (
                    "b",
                    Item::Dense {
                        dtype: DType::UInt8,
                        shape: vec![3],
                        body: db,
                    },
                ),
            ])
        };
        let a_static: &'static [u8] = Box::leak(a.clone().into_boxed_slice());
        let b_static: &'static [u8] = Box::leak(b.clone().into_boxed_slice());
        for (version, alignment, integrity) in [
            (Version::V4, 64, true),
            (Version::V4, 16, false),
            (Version::V3, 64, true),
        ] {
            let opts = EncodeOptions {
                version,
                alignment,
                integrity,
                ..EncodeOptions::default()
            };
            let whole = encode(
                &tree(BodySrc::Bytes(a_static), BodySrc::Bytes(b_static)),
                &opts,
            )
            .unwrap();
            let skel = skeleton(&tree(BodySrc::Deferred, BodySrc::Deferred), &opts).unwrap();
            assert_eq!(skel.plan.len, whole.len());
            let mut rebuilt = Vec::new();
            let mut taken = 0; // skeleton bytes written so far
            for (slot, body) in skel.plan.slots.iter().zip([&a, &b]) {
                // Up to the body's absolute offset, everything written so far that is not a body is skeleton.
                let upto = taken + (slot.body.start - rebuilt.len());
                rebuilt.extend_from_slice(&skel.bytes[taken..upto]);
                taken = upto;
                rebuilt.extend_from_slice(body);
                if slot.footer.is_some() {
                    rebuilt.extend_from_slice(&crate::hash::xxh3_64(body).to_le_bytes());
                }
            }
            rebuilt.extend_from_slice(&skel.bytes[taken..]);
            assert_eq!(rebuilt, whole, "{version:?} {alignment} {integrity}");
        }
        assert!(skeleton(
            &tree(BodySrc::Bytes(a_static), BodySrc::Deferred),
            &EncodeOptions::default()
        )
        .is_err());
    }

    use crate::decode::{decode, Packet};
    use crate::frame::Frame;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn opts(version: Version, alignment: usize, integrity: bool) -> EncodeOptions {
        EncodeOptions {
            version,
            alignment,
            integrity,
            ..EncodeOptions::default()
        }
    }

    fn padded(prefix: &[u8], body_at: usize, body: &[u8]) -> Vec<u8> {
        let mut v = prefix.to_vec();
        v.resize(body_at, 0);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn dense_examples_4_5() {
        let body = f32s(&[1.0, 2.0, 3.0]);
        let item = Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Bytes(&body),
        };
        let v3 = encode(&item, &opts(Version::V3, 64, false)).unwrap();
        assert_eq!(
            v3,
            padded(&[0x54, 0x4e, 0x53, 0x4f, 3, 1, 1, 1, 3, 0, 0, 0], 64, &body)
        );
        let v4 = encode(&item, &EncodeOptions::default()).unwrap();
        assert_eq!(
            v4,
            padded(
                &[0x54, 0x4e, 0x53, 0x4f, 4, 1, 0, 1, 1, 0, 3, 0, 0, 0],
                64,
                &body
            )
        );
        assert_eq!(v4.len(), 76);

        let b = 2.5f64.to_le_bytes();
        let scalar = Item::Dense {
            dtype: DType::Float64,
            shape: vec![],
            body: BodySrc::Bytes(&b),
        };
        let v4 = encode(&scalar, &EncodeOptions::default()).unwrap();
        assert_eq!(
            v4,
            padded(&[0x54, 0x4e, 0x53, 0x4f, 4, 1, 0, 3, 0, 0], 64, &b)
        );
        let v3 = encode(&scalar, &opts(Version::V3, 64, false)).unwrap();
        assert_eq!(v3, padded(&[0x54, 0x4e, 0x53, 0x4f, 3, 1, 3, 0], 64, &b));

        let empty = Item::Dense {
            dtype: DType::Int16,
            shape: vec![0],
            body: BodySrc::Bytes(&[]),
        };
        let v3 = encode(&empty, &opts(Version::V3, 64, false)).unwrap();
        assert_eq!(
            v3,
            padded(
                &[0x54, 0x4e, 0x53, 0x4f, 3, 1, 0x0a, 1, 0, 0, 0, 0],
                64,
                &[]
            )
        );

        let u8s = [1u8, 2, 3, 4];
        let item = Item::Dense {
            dtype: DType::UInt8,
            shape: vec![2, 2],
            body: BodySrc::Bytes(&u8s),
        };
        let v3 = encode(&item, &opts(Version::V3, 16, false)).unwrap();
        assert_eq!(
            v3,
            padded(
                &[0x54, 0x4e, 0x53, 0x4f, 3, 0x80, 5, 2, 2, 0, 0, 0, 2, 0, 0, 0, 4],
                32,
                &u8s
            )
        );
        let v4 = encode(&item, &opts(Version::V4, 16, false)).unwrap();
        assert_eq!(
            v4,
            padded(
                &[0x54, 0x4e, 0x53, 0x4f, 4, 0x80, 0, 5, 2, 0, 2, 0, 0, 0, 2, 0, 0, 0, 4],
                32,
                &u8s
            )
        );

        let item = Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Bytes(&body),
        };
        for (v, exp_at) in [(Version::V3, 12), (Version::V4, 14)] {
            let p = encode(&item, &opts(v, 128, false)).unwrap();
            assert_eq!((p.len(), p[exp_at]), (140, 7));
            let p = encode(&item, &opts(v, 4096, false)).unwrap();
            assert_eq!((p.len(), p[exp_at]), (4096 + 12, 12));
            let p = encode(&item, &opts(v, 1, false)).unwrap();
            assert_eq!((p.len(), p[exp_at]), (exp_at + 1 + 12, 0));
            assert_eq!(dense_prefix_len(v, 1, 1), exp_at + 1);
            assert_eq!(dense_prefix_len(v, 1, 128), 128);
        }
        for bytes in [v3, v4] {
            let Packet::Dense(d) = decode(&bytes).unwrap() else {
                panic!()
            };
            assert_eq!((d.alignment, d.raw().unwrap()), (16, &u8s[..]));
        }
    }

    #[cfg(feature = "xxh3")]
    #[test]
    fn integrity_of_empty_body_5_1() {
        let item = Item::Dense {
            dtype: DType::Float32,
            shape: vec![0],
            body: BodySrc::Bytes(&[]),
        };
        let p = encode(&item, &opts(Version::V4, 64, true)).unwrap();
        assert_eq!(
            p[p.len() - 8..],
            [0xc2, 0x94, 0xd3, 0x38, 0x05, 0x80, 0x06, 0x2d]
        );
    }

    #[cfg(feature = "xxh3")]
    #[test]
    fn options_carry_the_xxh3_implementation() {
        use crate::decode::{decode_with, DecodeOptions};
        use crate::hash::Xxh3Fn;
        // A stand-in that is not XXH3, so that the footers show which implementation wrote and checked them.
        let fake = Xxh3Fn(|data| 0x5EED ^ data.len() as u64);
        let body = f32s(&[1.0, 2.0, 3.0]);
        let item = Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Bytes(&body),
        };
        let o = opts(Version::V4, 64, true).with_xxh3(fake);
        let p = encode(&item, &o).unwrap();
        assert_eq!(p[p.len() - 8..], (0x5EED ^ 12u64).to_le_bytes());
        let checked = DecodeOptions::default().with_xxh3(fake);
        assert!(decode_with(&p, &checked).is_ok());
        assert!(
            decode(&p).unwrap_err().is_integrity(),
            "xxhash-rust disagrees"
        );
        // seal_with uses the options' implementation; seal uses xxhash-rust.
        let deferred = Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Deferred,
        };
        let plan = plan(&deferred, &o).unwrap();
        let mut out = vec![0u8; plan.len];
        encode_into(&deferred, &o, &mut out).unwrap();
        out[plan.slots[0].body.clone()].copy_from_slice(&body);
        seal_with(&mut out, &plan.slots, &o);
        assert_eq!(out, p);
        seal(&mut out, &plan.slots);
        assert!(decode(&out).is_ok());
        // Which implementation does not take part in equality: all of them compute XXH3.
        assert_eq!(
            o,
            opts(Version::V4, 64, true).with_xxh3(Xxh3Fn::XXHASH_RUST)
        );
    }

    #[cfg(all(feature = "lz4", feature = "xxh3"))]
    #[test]
    fn compressed_example_6_5() {
        let body = f32s(&[1.0, 2.0, 3.0]);
        let item = Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Bytes(&body),
        };
        let o = EncodeOptions {
            compress: true,
            integrity: true,
            ..EncodeOptions::default()
        };
        let p = encode(&item, &o).unwrap();
        assert_eq!(p.len(), 99);
        assert_eq!(
            p[..14],
            [0x54, 0x4e, 0x53, 0x4f, 4, 7, 0, 1, 1, 0, 3, 0, 0, 0]
        );
        assert_eq!(p[91..], [0x02, 0x1b, 0xeb, 0x92, 0xf0, 0x77, 0xaa, 0x1d]);
        let Packet::Dense(d) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!(d.body.to_vec().unwrap(), body);
        // The v3 packet written by 0.19.4 (python-lz4 frame with content size).
        let mut v3 = padded(&[0x54, 0x4e, 0x53, 0x4f, 3, 7, 1, 1, 3, 0, 0, 0], 64, &[]);
        v3.extend_from_slice(&[
            0x04, 0x22, 0x4d, 0x18, 0x68, 0x40, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0x5d, 0x0c, 0, 0, 0x80,
            0, 0, 0x80, 0x3f, 0, 0, 0, 0x40, 0, 0, 0x40, 0x40, 0, 0, 0, 0, 0xb2, 0xb3, 0xe0, 0x42,
            0x5c, 0xee, 0xa3, 0xe1,
        ]);
        assert_eq!(v3.len(), 107);
        let Packet::Dense(d) = decode(&v3).unwrap() else {
            panic!()
        };
        assert_eq!(d.body.to_vec().unwrap(), body);
    }

    #[test]
    fn bundle_example_7_5() {
        let seven = 7i64.to_le_bytes();
        let inner = Item::Bundle(vec![(
            "c",
            Item::Dense {
                dtype: DType::Int64,
                shape: vec![1],
                body: BodySrc::Bytes(&seven),
            },
        )]);
        let item = Item::Bundle(vec![
            (
                "a",
                Item::Dense {
                    dtype: DType::UInt8,
                    shape: vec![2],
                    body: BodySrc::Bytes(&[1, 2]),
                },
            ),
            ("b", inner),
        ]);
        let v3 = encode(&item, &opts(Version::V3, 64, false)).unwrap();
        assert_eq!(v3.len(), 181);
        assert_eq!(
            v3[..17],
            [0x54, 0x4e, 0x53, 0x4f, 3, 0x10, 0, 2, 1, 0, 0, 0, 0x61, 0x42, 0, 0, 0]
        );
        assert_eq!(v3[81..83], [1, 2]);
        assert_eq!(
            v3[83..96],
            [1, 0, 0, 0, 0x62, 0x59, 0, 0, 0, 0x54, 0x4e, 0x53, 0x4f]
        );
        assert_eq!(v3[173], 7);
        let v4 = encode(&item, &EncodeOptions::default()).unwrap();
        assert_eq!(v4.len(), 185);
        assert_eq!(
            v4[..33],
            [
                0x54, 0x4e, 0x53, 0x4f, 4, 0x10, 0, 0, 2, 0, 1, 0, 0, 0, 0x61, 0x42, 0, 0, 0, 0x54,
                0x4e, 0x53, 0x4f, 4, 1, 0, 5, 1, 0, 2, 0, 0, 0
            ]
        );
        for bytes in [&v3, &v4] {
            let Packet::Bundle(e) = decode(bytes).unwrap() else {
                panic!()
            };
            assert_eq!(e.len(), 2);
            assert_eq!(e[0].0, "a");
            let Packet::Bundle(inner) = &e[1].1 else {
                panic!()
            };
            let Packet::Dense(c) = &inner[0].1 else {
                panic!()
            };
            assert_eq!(c.raw().unwrap(), seven);
        }
        let empty = encode(&Item::Bundle(vec![]), &opts(Version::V3, 64, false)).unwrap();
        assert_eq!(empty.len(), 8);
    }

    #[test]
    fn sparse_example_8_2() {
        let data = f32s(&[1.5, 2.5]);
        let idx: Vec<u8> = [1i32, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let ptr: Vec<u8> = [0i32, 1, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        let comp = |dtype, n, b| Item::Dense {
            dtype,
            shape: vec![n],
            body: BodySrc::Bytes(b),
        };
        let item = Item::Sparse {
            format: SparseFormat::Csr,
            shape: [2, 2],
            components: Box::new([
                comp(DType::Float32, 2, &data),
                comp(DType::Int32, 2, &idx),
                comp(DType::Int32, 3, &ptr),
            ]),
        };
        let v3 = encode(&item, &opts(Version::V3, 64, true)).unwrap();
        assert_eq!(v3.len(), 248);
        assert_eq!(
            v3[..20],
            [0x54, 0x4e, 0x53, 0x4f, 3, 0x20, 0, 2, 2, 0, 0, 0, 2, 0, 0, 0, 0x48, 0, 0, 0]
        );
        assert_eq!(v3[84..92], data[..]);
        assert_eq!(v3[0xa8..0xac], [0x4c, 0, 0, 0]);
        assert_eq!(v3[236..], ptr[..]);
        let v4 = encode(&item, &opts(Version::V4, 128, false)).unwrap();
        assert_eq!(v4.len(), 250, "v4 components always use 64");
        for bytes in [&v3, &v4] {
            let Packet::Sparse(s) = decode(bytes).unwrap() else {
                panic!()
            };
            assert_eq!((s.format, s.shape), (SparseFormat::Csr, [2, 2]));
            assert_eq!(s.components[2].raw().unwrap(), ptr);
        }
        let v3_128 = encode(&item, &opts(Version::V3, 128, false)).unwrap();
        let Packet::Sparse(s) = decode(&v3_128).unwrap() else {
            panic!()
        };
        assert_eq!(s.components[0].alignment, 128);
    }

    #[test]
    fn v3_per_channel_axis_is_dropped_and_inferred() {
        // Shape (7, 3, 2) along axis 1: 3 scales, no axis byte in v3 (FORMAT.md §9.3).
        let values: Vec<f32> = (0..42).map(|i| (i % 11) as f32 - 5.0).collect();
        for (axis, qd) in [(1u8, QDType::QInt8), (2, QDType::QUInt4)] {
            let q = crate::quant::quantize(
                &values,
                &[7, 3, 2],
                qd,
                QuantScheme::PerChannel,
                0,
                usize::from(axis),
            )
            .unwrap();
            let item = Item::Quantized {
                qdtype: qd,
                scheme: QuantScheme::PerChannel,
                axis,
                group_size: 0,
                shape: vec![7, 3, 2],
                scales: &q.scales,
                zero_points: &q.zero_points,
                codes: &q.codes,
            };
            let o3 = opts(Version::V3, 64, false);
            assert_eq!(plan(&item, &o3).unwrap().dropped_axes, 1);
            assert_eq!(
                plan(&item, &opts(Version::V4, 64, false))
                    .unwrap()
                    .dropped_axes,
                0
            );
            let bytes = encode(&item, &o3).unwrap();
            let Packet::Quantized(back) = decode(&bytes).unwrap() else {
                panic!()
            };
            assert_eq!(back.axis, axis);
            assert_eq!(back.scales, q.scales);
            assert_eq!(back.codes, &q.codes[..]);
            let (Frame::Complete(n) | Frame::Need(n)) =
                crate::frame::frame(&bytes, &crate::decode::DecodeOptions::default()).unwrap();
            assert_eq!(n, bytes.len());
            // A v3 per-channel packet whose scale count matches no axis is refused.
            let mut bad = bytes.clone();
            let ns_at = 8 + 12 + 1 + 4;
            bad[ns_at] = 5;
            assert!(matches!(decode(&bad), Err(FormatError::BadQuant { .. })));
        }
    }

    #[test]
    fn quantized_examples_9_5() {
        let codes = [0xc8u8, 0x3f, 0x07];
        let scale = [f32::from_le_bytes([0x89, 0x88, 0x08, 0x3e])];
        let zp = [-0.5f32];
        let item = Item::Quantized {
            qdtype: QDType::QInt4,
            scheme: QuantScheme::PerTensor,
            axis: 0,
            group_size: 0,
            shape: vec![5],
            scales: &scale,
            zero_points: &zp,
            codes: &codes,
        };
        let v3 = encode(&item, &opts(Version::V3, 64, false)).unwrap();
        let head3 = [
            0x54, 0x4e, 0x53, 0x4f, 3, 1, 0x12, 1, 5, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0x89,
            0x88, 0x08, 0x3e, 0, 0, 0, 0xbf,
        ];
        assert_eq!(v3, padded(&head3, 64, &codes));
        let v4 = encode(&item, &opts(Version::V4, 64, false)).unwrap();
        let head4 = [
            0x54, 0x4e, 0x53, 0x4f, 4, 1, 0, 0x12, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
            0x89, 0x88, 0x08, 0x3e, 0, 0, 0, 0xbf,
        ];
        assert_eq!(v4, padded(&head4, 64, &codes));
        let mut all = vec![v3, v4];
        if cfg!(feature = "xxh3") {
            let v3i = encode(&item, &opts(Version::V3, 64, true)).unwrap();
            assert_eq!(v3i[67..], [0x7b, 0x8d, 0x53, 0xf7, 0xc1, 0x33, 0xc4, 0xdf]);
            let v4i = encode(&item, &opts(Version::V4, 64, true)).unwrap();
            assert_eq!(v4i[67..], [0x55, 0x74, 0x9e, 0x6c, 0x4d, 0x91, 0xa7, 0x4b]);
            all.extend([v3i, v4i]);
        }
        for bytes in &all {
            let Packet::Quantized(q) = decode(bytes).unwrap() else {
                panic!()
            };
            assert_eq!(
                (q.codes, q.scales[0], q.zero_points[0]),
                (&codes[..], scale[0], -0.5)
            );
        }

        let codes = [1u8, 2, 3, 4, 5, 6];
        let item = Item::Quantized {
            qdtype: QDType::QUInt8,
            scheme: QuantScheme::PerChannel,
            axis: 0,
            group_size: 0,
            shape: vec![2, 3],
            scales: &[0.5, 0.25],
            zero_points: &[0.0, 1.0],
            codes: &codes,
        };
        let v4 = encode(&item, &opts(Version::V4, 16, false)).unwrap();
        assert_eq!(v4.len(), 54);
        assert_eq!(v4[..0x30].to_vec(), {
            let mut h = vec![
                0x54, 0x4e, 0x53, 0x4f, 4, 0x80, 0, 0x11, 2, 0, 2, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0,
                0, 0, 2, 0, 0, 0,
            ];
            h.extend(f32s(&[0.5, 0.25, 0.0, 1.0]));
            h.push(4);
            h.resize(0x30, 0);
            h
        });
        let v3 = encode(&item, &opts(Version::V3, 16, false)).unwrap();
        assert_eq!((v3.len(), v3[41]), (54, 4));
    }

    #[test]
    fn string_examples_10() {
        let payload = "hiwörld".as_bytes();
        let offsets = [0u64, 2, 2, 8];
        let item = Item::Strings {
            offsets: &offsets,
            payload,
        };
        let p = encode(&item, &EncodeOptions::default()).unwrap();
        assert_eq!(p.len(), 104);
        assert_eq!(
            p[..14],
            [0x54, 0x4e, 0x53, 0x4f, 4, 1, 1, 0x14, 1, 0, 3, 0, 0, 0]
        );
        assert_eq!(p[0x48], 2);
        assert_eq!(p[0x60..], *payload);
        let Packet::Strings(s) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!(
            (s.get(0), s.get(1), s.get(2), s.len()),
            (Some("hi"), Some(""), Some("wörld"), 3)
        );

        let one = Item::Strings {
            offsets: &[0, 2],
            payload: b"hi",
        };
        if cfg!(feature = "xxh3") {
            let p = encode(&one, &opts(Version::V4, 64, true)).unwrap();
            assert_eq!(p.len(), 90);
            assert_eq!(p[82..], [0x6e, 0x63, 0x47, 0x5a, 0x68, 0x9d, 0xb4, 0xcf]);
        }
        assert!(matches!(
            encode(&one, &opts(Version::V3, 64, false)),
            Err(FormatError::Unsupported { .. })
        ));
    }

    #[test]
    fn write_limits() {
        let o = EncodeOptions::default();
        let d = |shape: Vec<u64>| Item::Dense {
            dtype: DType::UInt8,
            shape,
            body: BodySrc::Deferred,
        };
        assert!(matches!(
            plan(&d(vec![1; 33]), &o),
            Err(FormatError::TooManyDims { ndim: 33, .. })
        ));
        assert!(matches!(
            plan(&d(vec![1 << 32]), &o),
            Err(FormatError::DimTooLarge { .. })
        ));
        assert!(matches!(
            plan(&d(vec![100_000, 100_000]), &o),
            Err(FormatError::TooManyElements { .. })
        ));
        let many: Vec<(&str, Item)> = (0..256).map(|_| ("k", d(vec![1]))).collect();
        assert!(matches!(
            plan(&Item::Bundle(many), &o),
            Err(FormatError::TooManyEntries {
                count: 256,
                limit: 255
            })
        ));
        for a in [0usize, 3, 48] {
            let bad = EncodeOptions {
                alignment: a,
                ..EncodeOptions::default()
            };
            assert!(matches!(
                plan(&d(vec![1]), &bad),
                Err(FormatError::BadAlignment { .. })
            ));
        }
        let wrong = Item::Dense {
            dtype: DType::Int32,
            shape: vec![2],
            body: BodySrc::Bytes(&[0; 7]),
        };
        assert!(matches!(
            encode(&wrong, &o),
            Err(FormatError::BodyLength {
                expected: 8,
                found: 7
            })
        ));
        assert!(matches!(
            encode(&d(vec![1]), &o),
            Err(FormatError::Unsupported { .. })
        ));
        let mut deep = d(vec![1]);
        for _ in 0..100 {
            deep = Item::Bundle(vec![("x", deep)]);
        }
        assert!(matches!(
            plan(&deep, &o),
            Err(FormatError::NestingTooDeep { .. })
        ));
    }

    #[test]
    fn plan_encode_into_seal() {
        let body: Vec<u8> = (0..40u8).collect();
        let item = Item::Bundle(vec![
            (
                "x",
                Item::Dense {
                    dtype: DType::Int64,
                    shape: vec![5],
                    body: BodySrc::Deferred,
                },
            ),
            (
                "y",
                Item::Dense {
                    dtype: DType::UInt8,
                    shape: vec![3],
                    body: BodySrc::Bytes(&[9, 9, 9]),
                },
            ),
        ]);
        let o = EncodeOptions {
            integrity: cfg!(feature = "xxh3"),
            ..EncodeOptions::default()
        };
        let p = plan(&item, &o).unwrap();
        assert_eq!(p.slots.len(), 1);
        let mut out = vec![0xAAu8; p.len];
        assert!(encode_into(&item, &o, &mut out[..p.len - 1]).is_err());
        let p2 = encode_into(&item, &o, &mut out).unwrap();
        assert_eq!(p, p2);
        let slot = &p.slots[0];
        out[slot.body.clone()].copy_from_slice(&body);
        seal(&mut out, &p.slots);
        let direct = Item::Bundle(vec![
            (
                "x",
                Item::Dense {
                    dtype: DType::Int64,
                    shape: vec![5],
                    body: BodySrc::Bytes(&body),
                },
            ),
            (
                "y",
                Item::Dense {
                    dtype: DType::UInt8,
                    shape: vec![3],
                    body: BodySrc::Bytes(&[9, 9, 9]),
                },
            ),
        ]);
        assert_eq!(out, encode(&direct, &o).unwrap());
        if o.integrity {
            assert_eq!(slot.footer, Some(slot.body.end));
        }
    }
}
