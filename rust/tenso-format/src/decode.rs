//! Borrowing, zero-copy decoding of packets of both protocol versions.
//!
//! Dispatch follows FORMAT.md §13:
//!
//! ```text
//! header.kind() (one dispatch shared with `frame` and `packet_info`):
//! header ─┬─ GPU_IPC_REF             → rejected (FormatError::Unsupported)
//!         ├─ BUNDLE                  → bundle: count × (klen u32, key, vlen u32, packet)
//!         ├─ SPARSE_COO | CSR | CSC  → sparse: shape [rows, cols], 3 × (n u32, dense packet)
//!         ├─ STRING                  → v4 string tensor
//!         ├─ RAGGED                  → rejected (FormatError::Unsupported)
//!         ├─ dtype 16..19            → quantized (layout A for v3, layout B for v4)
//!         └─ otherwise               → dense, dtype 1..15
//! ```
//!
//! Dense packet layout (`H` = 8 for v3, 10 for v4):
//!
//! ```text
//! off          size      field
//! 0            H         header
//! H            4·ndim    shape, u32 LE each, outermost first
//! S=H+4·ndim   0 or 1    alignment exponent e (iff CUST_ALIGN)
//! P            pad       zeros up to the next multiple of A (relative to the packet start)
//! B            L         body: N·itemsize bytes, or an LZ4 body running to the end of the slice
//! B+L          0 or 8    XXH3-64 footer (iff INTEGRITY)
//! ```
//!
//! Rules applied here beyond upstream (FORMAT.md §14 "Recommended"): exactly versions 3 and 4; unknown
//! flag bits and flags that do not apply to the kind are rejected; `ndim <= 32`, element products are
//! overflow-checked against `max_elements`; alignment exponents above 63 are rejected; containers nest at
//! most `max_depth` levels (the recursion is depth-counted, so it cannot overflow the stack); a packet
//! nested in a container must fill its slice exactly; integrity is checked on the wire bytes before any
//! decompression. Bool bodies are returned as they are: bytes other than 00/01 are not scanned for.

use crate::consts::*;
use crate::dtype::{DType, QDType, QuantScheme, SparseFormat, Version};
use crate::error::FormatError;
use crate::header::{
    add, checked_elements, pad_to, parse_header, read_u32, read_u8, slice, Header, PacketKind,
};

/// The most container levels a decoder follows whatever `DecodeOptions::max_depth` says (the recursion
/// uses a few hundred bytes of stack per level).
pub const HARD_MAX_DEPTH: usize = 128;

/// Limits and switches for decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Most nested container levels (a top-level bundle is one level). Default 64; capped at [`HARD_MAX_DEPTH`].
    pub max_depth: usize,
    /// Most elements per dense/quantized/string packet or sparse component. Default 1e9.
    pub max_elements: u64,
    /// Verify XXH3 footers. Default true. When false the footer bytes must still be present.
    pub verify_integrity: bool,
    /// The one-shot XXH3-64 that verifies single-piece bodies (see [`crate::hash`]); `None`: `xxhash-rust`.
    pub xxh3: Option<crate::hash::Xxh3Fn>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_depth: MAX_DEPTH,
            max_elements: MAX_ELEMENTS,
            verify_integrity: true,
            xxh3: None,
        }
    }
}

impl DecodeOptions {
    /// These options with `f` as the one-shot XXH3-64.
    pub fn with_xxh3(self, f: crate::hash::Xxh3Fn) -> Self {
        DecodeOptions {
            xxh3: Some(f),
            ..self
        }
    }
}

/// A decoded packet, borrowing from the input buffer.
#[derive(Debug, Clone, PartialEq)]
pub enum Packet<'a> {
    /// A dense array.
    Dense(Dense<'a>),
    /// A bundle: entries in wire order. Duplicate keys are kept; a map built from them should let the later one win.
    Bundle(Vec<(&'a str, Packet<'a>)>),
    /// A validated sparse matrix.
    Sparse(Sparse<'a>),
    /// A quantized tensor.
    Quantized(Quantized<'a>),
    /// A v4 string tensor (UTF-8 validated).
    Strings(Strings<'a>),
}

impl Packet<'_> {
    /// `"dense"`, `"bundle"`, `"sparse"`, `"quantized"` or `"string"`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Packet::Dense(_) => "dense",
            Packet::Bundle(_) => "bundle",
            Packet::Sparse(_) => "sparse",
            Packet::Quantized(_) => "quantized",
            Packet::Strings(_) => "string",
        }
    }
}

/// A dense array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dense<'a> {
    /// Version of this packet.
    pub version: Version,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first (empty for 0-d).
    pub shape: Vec<u64>,
    /// Alignment the body was padded to, relative to the packet start (1, 64 or `2^e`).
    pub alignment: usize,
    /// The body.
    pub body: Body<'a>,
}

impl Dense<'_> {
    /// Product of the shape (1 for 0-d).
    pub fn num_elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Size of the uncompressed body, `N * itemsize` (validated against the limits during decode).
    pub fn nbytes(&self) -> usize {
        (self.num_elements() as usize) * self.dtype.itemsize()
    }

    /// For bool arrays, checks that every byte is 0 or 1 (decoding does not scan bodies; call this when
    /// the values will be exposed as bools). Other dtypes pass. Compressed bodies are checked after
    /// decompression with [`check_bool_body`].
    pub fn check_bool(&self) -> Result<(), FormatError> {
        match (self.dtype, self.body) {
            (DType::Bool, Body::Raw(b)) => check_bool_body(b),
            _ => Ok(()),
        }
    }

    /// The uncompressed body bytes when the body is not compressed.
    pub fn raw(&self) -> Option<&[u8]> {
        match self.body {
            Body::Raw(b) => Some(b),
            _ => None,
        }
    }
}

/// The body of a dense packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// Exactly `N * itemsize` bytes, a sub-slice of the input (zero-copy).
    Raw(&'a [u8]),
    /// An LZ4 frame; decompress into `decoded_len` bytes with [`Body::decode_into`] or `lz4::decompress_frame_into`.
    Lz4Frame {
        /// The compressed bytes as on the wire.
        frame: &'a [u8],
        /// `N * itemsize`.
        decoded_len: usize,
    },
    /// A v3 raw LZ4 block (no frame magic); decompress into `decoded_len` bytes.
    Lz4Block {
        /// The compressed bytes as on the wire.
        block: &'a [u8],
        /// `N * itemsize`.
        decoded_len: usize,
    },
}

impl Body<'_> {
    /// Length of the uncompressed body.
    pub fn decoded_len(&self) -> usize {
        match *self {
            Body::Raw(b) => b.len(),
            Body::Lz4Frame { decoded_len, .. } | Body::Lz4Block { decoded_len, .. } => decoded_len,
        }
    }

    /// True for the LZ4 variants.
    pub fn is_compressed(&self) -> bool {
        !matches!(self, Body::Raw(_))
    }

    /// Writes the uncompressed body into `dst`, which must be exactly `decoded_len()` bytes.
    pub fn decode_into(&self, dst: &mut [u8]) -> Result<(), FormatError> {
        if dst.len() != self.decoded_len() {
            return Err(FormatError::OutputSize {
                expected: self.decoded_len(),
                found: dst.len(),
            });
        }
        match *self {
            Body::Raw(b) => {
                dst.copy_from_slice(b);
                Ok(())
            }
            #[cfg(feature = "lz4")]
            Body::Lz4Frame { frame, .. } => crate::lz4::decompress_frame_into(frame, dst),
            #[cfg(feature = "lz4")]
            Body::Lz4Block { block, .. } => crate::lz4::decompress_block_into(block, dst),
            #[cfg(not(feature = "lz4"))]
            _ => Err(FormatError::Unsupported {
                what: "lz4 compression (built without the \"lz4\" feature)",
            }),
        }
    }

    /// The uncompressed body in a fresh vector (allocates `decoded_len()`, which the shape limits bound).
    pub fn to_vec(&self) -> Result<Vec<u8>, FormatError> {
        let mut v = vec![0u8; self.decoded_len()];
        self.decode_into(&mut v)?;
        Ok(v)
    }
}

/// A validated sparse matrix: components are 1-D uncompressed dense arrays in wire order
/// (COO: data, row, col; CSR/CSC: data, indices, indptr).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sparse<'a> {
    /// Storage format.
    pub format: SparseFormat,
    /// Logical shape (rows, cols).
    pub shape: [u64; 2],
    /// The three components.
    pub components: [Dense<'a>; 3],
}

impl Sparse<'_> {
    /// Checks the components against each other and the logical shape (FORMAT.md §8; done by every
    /// decode, see [`crate::sparse`]).
    pub fn validate(&self) -> Result<(), FormatError> {
        fn part<'s>(d: &'s Dense<'_>) -> crate::sparse::Component<'s> {
            crate::sparse::Component {
                dtype: d.dtype,
                shape: &d.shape,
                raw: d.raw(),
            }
        }
        let [a, b, c] = &self.components;
        crate::sparse::validate(self.format, self.shape, [part(a), part(b), part(c)])
    }
}

/// A quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized<'a> {
    /// Version of this packet (selects layout A or B).
    pub version: Version,
    /// Code type.
    pub qdtype: QDType,
    /// Scheme.
    pub scheme: QuantScheme,
    /// Channel axis: the v4 wire byte; for v3, which does not record it, the first axis whose length
    /// equals the number of scales for per-channel packets (FORMAT.md §9.3) and 0 otherwise.
    pub axis: u8,
    /// Group size as stored.
    pub group_size: u32,
    /// Logical (unpacked) shape.
    pub shape: Vec<u64>,
    /// Scales, one per pair.
    pub scales: Vec<f32>,
    /// Zero points, one per pair.
    pub zero_points: Vec<f32>,
    /// Packed codes: N bytes, or `ceil(N/2)` for 4-bit types.
    pub codes: &'a [u8],
}

impl Quantized<'_> {
    /// Product of the shape.
    pub fn num_elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A v4 string tensor: string `i` is `payload[offsets[i]..offsets[i+1]]`, valid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strings<'a> {
    /// `count + 1` offsets, starting at 0, non-decreasing, ending at `payload.len()`.
    pub offsets: Vec<u64>,
    /// The concatenated UTF-8 strings.
    pub payload: &'a [u8],
    /// The offsets as they are on the wire (`8 * (count + 1)` bytes, u64 LE).
    pub offsets_bytes: &'a [u8],
}

impl<'a> Strings<'a> {
    /// Number of strings.
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// True when there are no strings.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// String `i` (validated UTF-8 during decode).
    pub fn get(&self, i: usize) -> Option<&'a str> {
        let (s, e) = (
            *self.offsets.get(i)? as usize,
            *self.offsets.get(i + 1)? as usize,
        );
        std::str::from_utf8(self.payload.get(s..e)?).ok()
    }
}

/// Checks that every byte of an uncompressed bool body is 0 or 1.
pub fn check_bool_body(body: &[u8]) -> Result<(), FormatError> {
    // OR-ing each block vectorises; only a bad block pays for finding the offending byte.
    if !body
        .chunks(4096)
        .any(|block| block.iter().fold(0u8, |acc, &b| acc | b) > 1)
    {
        return Ok(());
    }
    match body.iter().position(|&b| b > 1) {
        None => Ok(()),
        Some(index) => Err(FormatError::BadBool {
            index,
            value: body[index],
        }),
    }
}

/// Decodes a packet with the default options. Trailing bytes after an uncompressed top-level packet are
/// ignored; a compressed dense body runs to the end of `buf` (minus 8 with `INTEGRITY`).
pub fn decode(buf: &[u8]) -> Result<Packet<'_>, FormatError> {
    decode_with(buf, &DecodeOptions::default())
}

/// Decodes a packet with explicit options.
pub fn decode_with<'a>(buf: &'a [u8], opts: &DecodeOptions) -> Result<Packet<'a>, FormatError> {
    decode_prefix(buf, opts).map(|(p, _)| p)
}

/// Decodes a packet and also returns where it ends in `buf` (`buf.len()` for a compressed dense packet).
pub fn decode_prefix<'a>(
    buf: &'a [u8],
    opts: &DecodeOptions,
) -> Result<(Packet<'a>, usize), FormatError> {
    Decoder { opts }.packet(buf, 0)
}

/// Decodes a packet that must fill `buf` exactly (as inside a container).
pub fn decode_exact<'a>(buf: &'a [u8], opts: &DecodeOptions) -> Result<Packet<'a>, FormatError> {
    let (p, end) = Decoder { opts }.packet(buf, 0)?;
    if end != buf.len() {
        return Err(FormatError::TrailingBytes { offset: end });
    }
    Ok(p)
}

struct Decoder<'o> {
    opts: &'o DecodeOptions,
}

/// Where a body starts and the alignment it was padded to.
pub(crate) fn body_start(buf: &[u8], flags: u16, pos: usize) -> Result<(usize, u64), FormatError> {
    let (p, align) = if flags & FLAG_CUST_ALIGN != 0 {
        let e = read_u8(buf, pos)?;
        if e > MAX_ALIGN_EXPONENT {
            return Err(FormatError::BadAlignExponent { exponent: e });
        }
        (add(pos, 1)?, 1u64 << e)
    } else if flags & FLAG_ALIGNED != 0 {
        (pos, DEFAULT_ALIGNMENT as u64)
    } else {
        (pos, 1)
    };
    let b = (p as u64)
        .checked_add(pad_to(p as u64, align))
        .and_then(|b| usize::try_from(b).ok())
        .ok_or(FormatError::LengthOverflow { what: "padding" })?;
    Ok((b, align))
}

/// Reads `ndim` u32 dimensions at `at`.
pub(crate) fn read_shape(buf: &[u8], at: usize, ndim: usize) -> Result<Vec<u64>, FormatError> {
    if ndim > MAX_NDIM {
        return Err(FormatError::TooManyDims {
            ndim,
            limit: MAX_NDIM,
        });
    }
    let s = slice(buf, at, 4 * ndim)?;
    Ok(s.chunks_exact(4)
        .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect())
}

pub(crate) fn footer(buf: &[u8], at: usize) -> Result<u64, FormatError> {
    crate::header::read_u64(buf, at)
}

#[cfg(feature = "xxh3")]
fn check_digest(expected: u64, found: u64) -> Result<(), FormatError> {
    if expected == found {
        Ok(())
    } else {
        Err(FormatError::Integrity { expected, found })
    }
}

/// Verifies a footer over the concatenation of `parts`.
fn verify(opts: &DecodeOptions, stored: u64, parts: &[&[u8]]) -> Result<(), FormatError> {
    if !opts.verify_integrity {
        return Ok(());
    }
    #[cfg(feature = "xxh3")]
    {
        let f = crate::hash::or_default(opts.xxh3);
        check_digest(stored, crate::hash::xxh3_64_parts_with(f, parts))
    }
    #[cfg(not(feature = "xxh3"))]
    {
        let _ = (stored, parts);
        Err(FormatError::Unsupported {
            what: "integrity footers (built without the \"xxh3\" feature)",
        })
    }
}

impl Decoder<'_> {
    fn packet<'a>(&self, buf: &'a [u8], depth: usize) -> Result<(Packet<'a>, usize), FormatError> {
        let h = parse_header(buf)?;
        match h.kind()? {
            PacketKind::GpuIpcRef => Err(FormatError::Unsupported {
                what: "gpu ipc reference packets",
            }),
            PacketKind::Bundle => self.bundle(buf, &h, depth),
            PacketKind::Sparse(_) => self.sparse(buf, &h, depth),
            PacketKind::Strings => self.strings(buf, &h).map(|(s, e)| (Packet::Strings(s), e)),
            PacketKind::Ragged => Err(FormatError::Unsupported {
                what: "ragged direct framing (FLAG_RAGGED), which no writer produces",
            }),
            PacketKind::Quantized => self
                .quantized(buf, &h)
                .map(|(q, e)| (Packet::Quantized(q), e)),
            PacketKind::Dense => self.dense(buf, &h).map(|(d, e)| (Packet::Dense(d), e)),
        }
    }

    fn enter(&self, depth: usize) -> Result<(), FormatError> {
        // The recursion is bounded by this limit; a caller asking for more than HARD_MAX_DEPTH levels
        // gets HARD_MAX_DEPTH, so that no option can turn a packet into a stack overflow.
        let limit = self.opts.max_depth.min(HARD_MAX_DEPTH);
        if depth >= limit {
            return Err(FormatError::NestingTooDeep { limit });
        }
        Ok(())
    }

    fn nested<'a>(&self, buf: &'a [u8], depth: usize) -> Result<Packet<'a>, FormatError> {
        let (p, end) = self.packet(buf, depth)?;
        if end != buf.len() {
            return Err(FormatError::TrailingBytes { offset: end });
        }
        Ok(p)
    }

    fn bundle<'a>(
        &self,
        buf: &'a [u8],
        h: &Header,
        depth: usize,
    ) -> Result<(Packet<'a>, usize), FormatError> {
        if h.flags != FLAG_BUNDLE {
            return Err(FormatError::BadFlags { flags: h.flags });
        }
        if h.dtype_code != 0 {
            return Err(FormatError::malformed(
                h.len() - 2 - usize::from(h.version == Version::V4),
                "bundle header has a non-zero dtype code",
            ));
        }
        self.enter(depth)?;
        let mut pos = h.len();
        let mut entries = Vec::with_capacity(usize::from(h.count));
        for _ in 0..h.count {
            let klen = read_u32(buf, pos)? as usize;
            let key_at = add(pos, 4)?;
            let key = slice(buf, key_at, klen)?;
            let key =
                std::str::from_utf8(key).map_err(|_| FormatError::BadKey { offset: key_at })?;
            let vlen_at = add(key_at, klen)?;
            let vlen = read_u32(buf, vlen_at)? as usize;
            let value = slice(buf, add(vlen_at, 4)?, vlen)?;
            let packet = self.nested(value, depth + 1)?;
            entries.push((key, packet));
            pos = add(vlen_at, 4 + vlen)?;
        }
        Ok((Packet::Bundle(entries), pos))
    }

    fn sparse<'a>(
        &self,
        buf: &'a [u8],
        h: &Header,
        depth: usize,
    ) -> Result<(Packet<'a>, usize), FormatError> {
        let format = SparseFormat::from_flags(h.flags)?;
        if h.flags != format.flag() {
            return Err(FormatError::BadFlags { flags: h.flags });
        }
        if h.dtype_code != 0 {
            return Err(FormatError::BadSparse {
                reason: "sparse header has a non-zero dtype code",
            });
        }
        if h.count != 2 {
            return Err(FormatError::BadSparse {
                reason: "logical shape must be 2-D",
            });
        }
        self.enter(depth)?;
        let shape = read_shape(buf, h.len(), 2)?;
        let mut pos = h.len() + 8;
        let mut comps: Vec<Dense<'a>> = Vec::with_capacity(3);
        for _ in 0..3 {
            let n = read_u32(buf, pos)? as usize;
            let sub = slice(buf, pos + 4, n)?;
            match self.nested(sub, depth + 1)? {
                Packet::Dense(d) => comps.push(d),
                _ => {
                    return Err(FormatError::BadSparse {
                        reason: "components must be dense arrays",
                    })
                }
            }
            pos = add(pos, 4 + n)?;
        }
        let components: [Dense<'a>; 3] = comps
            .try_into()
            .expect("exactly three components were pushed");
        let sparse = Sparse {
            format,
            shape: [shape[0], shape[1]],
            components,
        };
        sparse.validate()?;
        Ok((Packet::Sparse(sparse), pos))
    }

    fn dense<'a>(&self, buf: &'a [u8], h: &Header) -> Result<(Dense<'a>, usize), FormatError> {
        const ALLOWED: u16 = FLAG_ALIGNED | FLAG_CUST_ALIGN | FLAG_INTEGRITY | FLAG_COMPRESSION;
        if h.flags & !ALLOWED != 0 {
            return Err(FormatError::BadFlags { flags: h.flags });
        }
        let dtype = DType::from_code(h.dtype_code)?;
        let ndim = usize::from(h.count);
        let shape = read_shape(buf, h.len(), ndim)?;
        let n = checked_elements(&shape, self.opts.max_elements)?;
        let nbytes = n
            .checked_mul(dtype.itemsize() as u64)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or(FormatError::LengthOverflow { what: "body size" })?;
        let (b, align) = body_start(buf, h.flags, h.len() + 4 * ndim)?;
        let alignment =
            usize::try_from(align).map_err(|_| FormatError::BadAlignment { alignment: align })?;
        let integrity = h.flags & FLAG_INTEGRITY != 0;
        if h.flags & FLAG_COMPRESSION != 0 {
            let tail = if integrity { 8 } else { 0 };
            let needed = add(b, tail)?;
            if buf.len() < needed {
                return Err(FormatError::truncated(needed, buf.len()));
            }
            let end_body = buf.len() - tail;
            let data = &buf[b..end_body];
            if integrity {
                verify(self.opts, footer(buf, end_body)?, &[data])?;
            }
            let body = compressed_body(h.version, data, nbytes)?;
            return Ok((
                Dense {
                    version: h.version,
                    dtype,
                    shape,
                    alignment,
                    body,
                },
                buf.len(),
            ));
        }
        let data = slice(buf, b, nbytes)?;
        let mut end = b + nbytes;
        if integrity {
            let stored = footer(buf, end)?;
            self.verify_dense(h.version, stored, data)?;
            end += 8;
        }
        Ok((
            Dense {
                version: h.version,
                dtype,
                shape,
                alignment,
                body: Body::Raw(data),
            },
            end,
        ))
    }

    fn verify_dense(&self, version: Version, stored: u64, data: &[u8]) -> Result<(), FormatError> {
        let plain = verify(self.opts, stored, &[data]);
        #[cfg(feature = "xxh3")]
        if let Err(FormatError::Integrity { .. }) = plain {
            // 0.19.4's `dumps` hashes bodies of 1 MiB or more in 1 MiB chunks (FORMAT.md §5.3).
            if version == Version::V3
                && data.len() >= CHUNKED_HASH_CHUNK
                && crate::hash::xxh3_64_chunked_with(crate::hash::or_default(self.opts.xxh3), data)
                    == stored
            {
                return Ok(());
            }
        }
        let _ = version;
        plain
    }

    fn quantized<'a>(
        &self,
        buf: &'a [u8],
        h: &Header,
    ) -> Result<(Quantized<'a>, usize), FormatError> {
        const ALLOWED: u16 = FLAG_ALIGNED | FLAG_CUST_ALIGN | FLAG_INTEGRITY;
        if h.flags & !ALLOWED != 0 {
            return Err(FormatError::BadFlags { flags: h.flags });
        }
        let qdtype = QDType::from_code(h.dtype_code)?;
        let ndim = usize::from(h.count);
        let shape = read_shape(buf, h.len(), ndim)?;
        let n = checked_elements(&shape, self.opts.max_elements)?;
        let m = h.len() + 4 * ndim;
        let scheme = QuantScheme::from_code(read_u8(buf, m)?)?;
        let (wire_axis, mut pos) = match h.version {
            Version::V3 => (None, m + 1),
            Version::V4 => (Some(read_u8(buf, m + 1)?), m + 2),
        };
        let group_size = read_u32(buf, pos)?;
        let num_scales = read_u32(buf, pos + 4)?;
        pos += 8;
        let axis = crate::quant::channel_axis(h.version, scheme, wire_axis, &shape, num_scales)?;
        let expected = scheme.expected_num_scales(&shape, group_size, usize::from(axis))?;
        if u64::from(num_scales) != expected {
            return Err(FormatError::BadQuant {
                reason: "num_scales does not match the scheme and shape",
            });
        }
        let ns = num_scales as usize;
        let sc = slice(buf, pos, 4 * ns)?;
        let zp = slice(buf, pos + 4 * ns, 4 * ns)?;
        let q = pos + 8 * ns;
        let scales = sc
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let zero_points = zp
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (b, _) = body_start(buf, h.flags, q)?;
        let len = qdtype.packed_len(n);
        let codes = slice(buf, b, len)?;
        let mut end = b + len;
        if h.flags & FLAG_INTEGRITY != 0 {
            let stored = footer(buf, end)?;
            match h.version {
                Version::V3 => verify(self.opts, stored, &[codes])?,
                Version::V4 => verify(self.opts, stored, &[&buf[m..q], codes])?,
            }
            end += 8;
        }
        Ok((
            Quantized {
                version: h.version,
                qdtype,
                scheme,
                axis,
                group_size,
                shape,
                scales,
                zero_points,
                codes,
            },
            end,
        ))
    }

    fn strings<'a>(&self, buf: &'a [u8], h: &Header) -> Result<(Strings<'a>, usize), FormatError> {
        const ALLOWED: u16 = FLAG_STRING | FLAG_ALIGNED | FLAG_CUST_ALIGN | FLAG_INTEGRITY;
        if h.flags & !ALLOWED != 0 {
            return Err(FormatError::BadFlags { flags: h.flags });
        }
        if h.dtype_code != DTYPE_STRING {
            return Err(FormatError::UnknownDType { code: h.dtype_code });
        }
        if h.count != 1 {
            return Err(FormatError::malformed(
                8,
                "string tensor must have exactly one dimension",
            ));
        }
        let count = u64::from(read_u32(buf, h.len())?);
        checked_elements(&[count], self.opts.max_elements)?;
        let (b, _) = body_start(buf, h.flags, h.len() + 4)?;
        let off_len = (count as usize + 1) * 8;
        let offsets_bytes = slice(buf, b, off_len)?;
        let offsets: Vec<u64> = offsets_bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        if offsets[0] != 0 {
            return Err(FormatError::malformed(b, "string offsets must start at 0"));
        }
        if let Some(i) = offsets.windows(2).position(|w| w[1] < w[0]) {
            return Err(FormatError::malformed(
                b + 8 * (i + 1),
                "string offsets decrease",
            ));
        }
        let total =
            usize::try_from(offsets[count as usize]).map_err(|_| FormatError::LengthOverflow {
                what: "string payload",
            })?;
        let payload_at = b + off_len;
        let payload = slice(buf, payload_at, total)?;
        let mut end = payload_at + total;
        if h.flags & FLAG_INTEGRITY != 0 {
            verify(self.opts, footer(buf, end)?, &[&buf[b..end]])?;
            end += 8;
        }
        for (i, w) in offsets.windows(2).enumerate() {
            if std::str::from_utf8(&payload[w[0] as usize..w[1] as usize]).is_err() {
                return Err(FormatError::BadUtf8 { index: i });
            }
        }
        Ok((
            Strings {
                offsets,
                payload,
                offsets_bytes,
            },
            end,
        ))
    }
}

fn compressed_body(
    version: Version,
    data: &[u8],
    decoded_len: usize,
) -> Result<Body<'_>, FormatError> {
    if cfg!(not(feature = "lz4")) {
        return Err(FormatError::Unsupported {
            what: "lz4 compression (built without the \"lz4\" feature)",
        });
    }
    // LZ4 cannot expand a byte into more than 255 bytes, so a shape that promises more than that is a lie
    // that would only make the caller allocate for nothing (FORMAT.md §14, "LZ4 bombs").
    if decoded_len / 256 > data.len() {
        return Err(FormatError::DecompressedSize {
            expected: decoded_len,
            found: data.len().saturating_mul(256),
        });
    }
    if data.starts_with(&LZ4_FRAME_MAGIC) {
        Ok(Body::Lz4Frame {
            frame: data,
            decoded_len,
        })
    } else if version == Version::V3 {
        // 0.19.4's shared-memory writer stores a bare block; its size is N * itemsize (FORMAT.md §6.4).
        Ok(Body::Lz4Block {
            block: data,
            decoded_len,
        })
    } else {
        Err(FormatError::Lz4 {
            reason: "body does not start with the lz4 frame magic",
        })
    }
}
