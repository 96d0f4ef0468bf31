//! tenso packets streamed straight between a reader/writer and device memory, one staging copy on the host.
//!
//! Reading ([`read_packet`]): the header, shape and bundle keys are parsed from the stream with `tenso-format` (a few
//! bytes); each body is then read chunk by chunk into a pinned staging buffer and copied to its own device
//! allocation while the next chunk is read. Integrity footers are checked with a streaming XXH3 over the chunks
//! (before the tensors are handed out), bool bodies are checked chunk by chunk. Only dense packets and bundles of
//! dense packets go to a device; anything else is [`GpuError::Unsupported`] once its header is read.
//!
//! Writing ([`write_packet`]): `tenso-format` plans the packet ([`tenso_format::skeleton`]); its headers go to the
//! writer as they are, each body is copied device -> staging -> writer, the copy of chunk k+1 overlapping the write of
//! chunk k, and the footer is the streaming XXH3 of what was written. The bytes are exactly `tenso.dumps`'s.

use std::io::{self, Read};

use tenso_format::hash::Hasher;
use tenso_format::{
    frame, parse_header, BodySrc, DType, DecodeOptions, EncodeOptions, FormatError, Frame, Item,
    PacketKind, Version, CHUNKED_HASH_CHUNK, FLAG_ALIGNED, FLAG_BUNDLE, FLAG_COMPRESSION,
    FLAG_CUST_ALIGN, FLAG_INTEGRITY,
};

use crate::copy::{download, CopyEngine, DevPtr, DeviceBuf, DeviceMemory, Uploader};
use crate::GpuError;

/// A dense tensor in device memory that [`read_packet`] allocated and filled (C order, little-endian bytes).
#[derive(Debug)]
pub struct DeviceTensor<B> {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// The device memory (`N * itemsize` bytes), freed when dropped.
    pub buf: B,
}

/// What [`read_packet`] read.
#[derive(Debug)]
pub enum Received<B> {
    /// A dense packet.
    Dense(DeviceTensor<B>),
    /// A bundle of dense packets, in stream order.
    Bundle(Vec<(String, DeviceTensor<B>)>),
}

/// A dense tensor in device memory to write ([`write_packet`]): C-contiguous, `N * itemsize` bytes at `ptr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTensor {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Device address of the first element.
    pub ptr: DevPtr,
}

/// What [`write_packet`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// One dense packet.
    Dense(SourceTensor),
    /// A bundle of dense packets, in this order.
    Bundle(Vec<(String, SourceTensor)>),
}

/// A reader that counts what it delivered, so that a short stream says where it ended.
struct Src<'r, R: Read + ?Sized> {
    r: &'r mut R,
    pos: usize,
}

impl<R: Read + ?Sized> Src<'_, R> {
    /// Reads into `buf` until it is full or the stream ends; returns how many bytes came.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, GpuError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) if n <= buf.len() - got => got += n,
                Ok(n) => {
                    return Err(GpuError::Io(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the source reported {n} bytes read into a smaller buffer"),
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(GpuError::Io(e)),
            }
        }
        self.pos += got;
        Ok(got)
    }

    /// Fills `buf` completely; a stream that ends first is a truncated packet that needed `needed` bytes.
    fn exact(&mut self, buf: &mut [u8], needed: usize) -> Result<(), GpuError> {
        if self.fill(buf)? < buf.len() {
            return Err(FormatError::Truncated {
                needed,
                available: self.pos,
            }
            .into());
        }
        Ok(())
    }

    /// Reads and drops `n` bytes (padding).
    fn skip(&mut self, mut n: u64, needed: usize) -> Result<(), GpuError> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = n.min(scratch.len() as u64) as usize;
            self.exact(&mut scratch[..k], needed)?;
            n -= k as u64;
        }
        Ok(())
    }

    /// Appends `n` bytes to `out`, growing it only as bytes arrive (a lying length costs no allocation).
    fn append(&mut self, out: &mut Vec<u8>, n: usize, needed: usize) -> Result<(), GpuError> {
        let mut left = n;
        while left > 0 {
            let k = left.min(64 * 1024);
            let at = out.len();
            out.resize(at + k, 0);
            self.exact(&mut out[at..], needed)?;
            left -= k;
        }
        Ok(())
    }
}

/// Where the body of a dense packet lies, relative to the packet's first byte.
struct DenseLayout {
    version: Version,
    dtype: DType,
    shape: Vec<u64>,
    body_start: usize,
    body_len: usize,
    integrity: bool,
    /// Bytes of the packet consumed so far (header, shape, exponent).
    consumed: usize,
}

/// The header (and, for dense packets, the shape and exponent) of the packet starting at the stream's position.
/// `None` only when `allow_empty` and the stream ended before its first byte.
enum Start {
    Dense(DenseLayout),
    Bundle { count: u8 },
}

fn read_start<R: Read + ?Sized>(
    src: &mut Src<'_, R>,
    opts: &DecodeOptions,
    top_level: bool,
) -> Result<Option<Start>, GpuError> {
    let base = src.pos;
    let mut prefix: Vec<u8> = Vec::with_capacity(64);
    // The end of the dense metadata (header, shape, exponent) once the header is known.
    let mut meta_end: Option<usize> = None;
    loop {
        let step = frame(&prefix, opts);
        let need = match step {
            Ok(Frame::Need(n)) => n,
            Ok(Frame::Complete(n)) => n,
            Err(e) => return Err(e.into()),
        };
        if let Some(end) = meta_end {
            if prefix.len() >= end {
                return dense_layout(&prefix, need, end).map(|l| Some(Start::Dense(l)));
            }
        }
        if meta_end.is_none() && prefix.len() >= 8 {
            if let Ok(h) = parse_header(&prefix) {
                if prefix.len() >= h.len() {
                    match h.kind()? {
                        PacketKind::Bundle if top_level => {
                            if h.flags != FLAG_BUNDLE {
                                return Err(FormatError::BadFlags { flags: h.flags }.into());
                            }
                            if h.dtype_code != 0 {
                                return Err(FormatError::Malformed {
                                    offset: h.len() - 2 - usize::from(h.version == Version::V4),
                                    reason: "bundle header has a non-zero dtype code",
                                }
                                .into());
                            }
                            return Ok(Some(Start::Bundle { count: h.count }));
                        }
                        PacketKind::Dense => {
                            const ALLOWED: u16 =
                                FLAG_ALIGNED | FLAG_CUST_ALIGN | FLAG_INTEGRITY | FLAG_COMPRESSION;
                            if h.flags & !ALLOWED != 0 {
                                return Err(FormatError::BadFlags { flags: h.flags }.into());
                            }
                            if h.flags & FLAG_COMPRESSION != 0 {
                                return Err(GpuError::Unsupported {
                                    what: "an LZ4-compressed packet (decompress on the host with tenso.read_stream)".into(),
                                });
                            }
                            let exponent = usize::from(h.flags & FLAG_CUST_ALIGN != 0);
                            let end = h.len() + 4 * usize::from(h.count) + exponent;
                            meta_end = Some(end);
                            if prefix.len() >= end {
                                continue;
                            }
                        }
                        kind => {
                            let what = if kind == PacketKind::Bundle {
                                "a bundle nested in a bundle".to_string()
                            } else {
                                format!("a {} packet", kind.name())
                            };
                            return Err(GpuError::Unsupported { what });
                        }
                    }
                }
            }
        }
        let want = meta_end.map_or(need, |end| need.min(end));
        let at = prefix.len();
        if want <= at {
            // frame() always asks for more than it has until the header is known, and every known kind returned.
            return Err(FormatError::Truncated {
                needed: at + 1,
                available: at,
            }
            .into());
        }
        prefix.resize(want, 0);
        let got = src.fill(&mut prefix[at..])?;
        if got < want - at {
            if top_level && src.pos == base {
                return Ok(None);
            }
            return Err(FormatError::Truncated {
                needed: want,
                available: at + got,
            }
            .into());
        }
    }
}

/// The dense layout once `prefix` holds the metadata (`meta_end` bytes) and framing asked for `total` bytes.
fn dense_layout(prefix: &[u8], total: usize, meta_end: usize) -> Result<DenseLayout, GpuError> {
    let h = parse_header(prefix)?;
    let dtype = DType::from_code(h.dtype_code)?;
    let shape: Vec<u64> = prefix[h.len()..h.len() + 4 * usize::from(h.count)]
        .chunks_exact(4)
        .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    // frame() checked the element count against the limit and the total for overflow.
    let body_len = shape
        .iter()
        .try_fold(dtype.itemsize() as u64, |a, &d| a.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or(FormatError::LengthOverflow { what: "body size" })?;
    let integrity = h.flags & FLAG_INTEGRITY != 0;
    let body_start = total
        .checked_sub(body_len + if integrity { 8 } else { 0 })
        .filter(|&b| b >= meta_end)
        .ok_or(FormatError::LengthOverflow { what: "padding" })?;
    Ok(DenseLayout {
        version: h.version,
        dtype,
        shape,
        body_start,
        body_len,
        integrity,
        consumed: meta_end,
    })
}

/// XXH3 of a body as it streams by: the plain digest, and 0.19.4's chunked one for v3 bodies of 1 MiB or more.
struct Digest {
    plain: Hasher,
    chunked: Option<(Hasher, Hasher, usize)>,
}

impl Digest {
    fn new(layout: &DenseLayout) -> Self {
        let chunked = (layout.version == Version::V3 && layout.body_len >= CHUNKED_HASH_CHUNK)
            .then(|| (Hasher::new(), Hasher::new(), 0));
        Self {
            plain: Hasher::new(),
            chunked,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        self.plain.update(data);
        if let Some((outer, inner, filled)) = self.chunked.as_mut() {
            while !data.is_empty() {
                let k = data.len().min(CHUNKED_HASH_CHUNK - *filled);
                inner.update(&data[..k]);
                *filled += k;
                data = &data[k..];
                if *filled == CHUNKED_HASH_CHUNK {
                    outer.update(&inner.digest().to_le_bytes());
                    *inner = Hasher::new();
                    *filled = 0;
                }
            }
        }
    }

    fn check(self, stored: u64) -> Result<(), FormatError> {
        let found = self.plain.digest();
        if found == stored {
            return Ok(());
        }
        if let Some((mut outer, inner, filled)) = self.chunked {
            if filled > 0 {
                outer.update(&inner.digest().to_le_bytes());
            }
            if outer.digest() == stored {
                return Ok(());
            }
        }
        Err(FormatError::Integrity {
            expected: stored,
            found,
        })
    }
}

/// Streams the body (and footer) of a dense packet whose metadata was read into a fresh device allocation.
fn read_body<E: DeviceMemory + ?Sized, R: Read + ?Sized>(
    engine: &E,
    up: &mut Uploader<'_, E>,
    src: &mut Src<'_, R>,
    layout: DenseLayout,
    base: usize,
    opts: &DecodeOptions,
) -> Result<DeviceTensor<E::Buf>, GpuError> {
    let total = base + layout.body_start + layout.body_len + if layout.integrity { 8 } else { 0 };
    src.skip((layout.body_start - layout.consumed) as u64, total)?;
    let buf = engine.alloc(layout.body_len)?;
    let verify = layout.integrity && opts.verify_integrity;
    let mut digest = Digest::new(&layout);
    let is_bool = layout.dtype == DType::Bool;
    // SAFETY: buf was just allocated with body_len bytes and is ours alone. On success the caller finishes (drains)
    // the uploader before the tensor is handed out, and drops the uploader before any buffer (declaration order); on
    // failure the streams are drained below, before buf is freed on return.
    let copied = unsafe {
        up.copy(buf.ptr(), layout.body_len, |chunk| {
            src.exact(chunk, total)?;
            if is_bool {
                tenso_format::check_bool_body(chunk)?;
            }
            if verify {
                digest.update(chunk);
            }
            Ok(())
        })
    };
    let read = copied.and_then(|()| {
        if layout.integrity {
            let mut footer = [0u8; 8];
            src.exact(&mut footer, total)?;
            if verify {
                digest.check(u64::from_le_bytes(footer))?;
            }
        }
        Ok(())
    });
    if let Err(e) = read {
        // Chunks of this body may still be queued: no copy may write buf after it is freed.
        let _ = crate::copy::drain(engine);
        return Err(e);
    }
    Ok(DeviceTensor {
        dtype: layout.dtype,
        shape: layout.shape,
        buf,
    })
}

/// Reads one packet (dense, or a bundle of dense packets) from `reader` into fresh device memory; `None` if the
/// stream ended before its first byte. The reader is never read past the packet's end.
///
/// Errors: malformed or over-limit packets are [`GpuError::Format`] (truncation included: see
/// [`FormatError::is_truncation`]); other packet kinds are [`GpuError::Unsupported`], raised after their header.
pub fn read_packet<E: DeviceMemory + ?Sized, R: Read + ?Sized>(
    engine: &E,
    reader: &mut R,
    opts: &DecodeOptions,
) -> Result<Option<Received<E::Buf>>, GpuError> {
    let mut src = Src { r: reader, pos: 0 };
    let Some(start) = read_start(&mut src, opts, true)? else {
        return Ok(None);
    };
    // Declared before the uploader, so dropped after it: no buffer is freed while a copy into it may run.
    let mut entries: Vec<(String, DeviceTensor<E::Buf>)> = Vec::new();
    let mut up = Uploader::new(engine)?;
    match start {
        Start::Dense(layout) => {
            let tensor = read_body(engine, &mut up, &mut src, layout, 0, opts)?;
            up.finish()?;
            Ok(Some(Received::Dense(tensor)))
        }
        Start::Bundle { count } => {
            let depth_ok = opts.max_depth >= 1;
            if !depth_ok {
                return Err(FormatError::NestingTooDeep {
                    limit: opts.max_depth,
                }
                .into());
            }
            for _ in 0..count {
                let mut word = [0u8; 4];
                src.exact(&mut word, src.pos + 4)?;
                let klen = u32::from_le_bytes(word) as usize;
                let key_at = src.pos;
                let mut key = Vec::new();
                src.append(&mut key, klen, key_at.saturating_add(klen))?;
                let key =
                    String::from_utf8(key).map_err(|_| FormatError::BadKey { offset: key_at })?;
                src.exact(&mut word, src.pos + 4)?;
                let vlen = u32::from_le_bytes(word) as usize;
                let base = src.pos;
                let Some(Start::Dense(layout)) = read_start(&mut src, opts, false)? else {
                    unreachable!("read_start refuses anything but dense values below the top level")
                };
                let total =
                    layout.body_start + layout.body_len + if layout.integrity { 8 } else { 0 };
                if total > vlen {
                    return Err(FormatError::Truncated {
                        needed: total,
                        available: vlen,
                    }
                    .into());
                }
                if total < vlen {
                    return Err(FormatError::TrailingBytes { offset: total }.into());
                }
                let tensor = read_body(engine, &mut up, &mut src, layout, base, opts)?;
                entries.push((key, tensor));
            }
            up.finish()?;
            Ok(Some(Received::Bundle(entries)))
        }
    }
}

/// Writes `out` as one packet: the headers from `tenso-format`, each body copied from device memory through
/// staging, footers computed as the bodies stream by. Returns the number of bytes written. The bytes are those
/// `tenso_format::encode` would write for the same tensors and options.
///
/// # Safety
/// Every `SourceTensor::ptr` points to `N * itemsize` bytes of device memory readable by the engine and not written
/// until this returns.
pub unsafe fn write_packet<E: CopyEngine + ?Sized>(
    engine: &E,
    out: &Outgoing,
    opts: &EncodeOptions,
    mut write: impl FnMut(&[u8]) -> Result<(), GpuError>,
) -> Result<usize, GpuError> {
    let dense = |t: &SourceTensor| Item::Dense {
        dtype: t.dtype,
        shape: t.shape.clone(),
        body: BodySrc::Deferred,
    };
    let (item, sources): (Item<'_>, Vec<&SourceTensor>) = match out {
        Outgoing::Dense(t) => (dense(t), vec![t]),
        Outgoing::Bundle(entries) => (
            Item::Bundle(
                entries
                    .iter()
                    .map(|(k, t)| (k.as_str(), dense(t)))
                    .collect(),
            ),
            entries.iter().map(|(_, t)| t).collect(),
        ),
    };
    let skel = tenso_format::skeleton(&item, opts)?;
    let mut written = 0usize; // bytes of the packet written so far
    let mut taken = 0usize; // skeleton bytes written so far
    for (slot, source) in skel.plan.slots.iter().zip(sources) {
        let upto = taken + (slot.body.start - written);
        write(&skel.bytes[taken..upto])?;
        written += upto - taken;
        taken = upto;
        let mut digest = Hasher::new();
        let hash = slot.footer.is_some();
        // SAFETY: forwarded from the caller: slot.body.len() == N * itemsize of this tensor (the plan computed it
        // from the same dtype and shape).
        unsafe {
            download(engine, source.ptr, slot.body.len(), |chunk| {
                if hash {
                    digest.update(chunk);
                }
                write(chunk)
            })
        }?;
        written += slot.body.len();
        if hash {
            write(&digest.digest().to_le_bytes())?;
            written += 8;
        }
    }
    write(&skel.bytes[taken..])?;
    written += skel.bytes.len() - taken;
    debug_assert_eq!(written, skel.plan.len);
    Ok(written)
}

impl From<FormatError> for GpuError {
    fn from(e: FormatError) -> Self {
        Self::Format(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::ExternalMemory;
    use crate::fake::FakeDevice;
    use tenso_format::{encode, QDType, QuantScheme};

    fn body(dtype: DType, n: usize) -> Vec<u8> {
        let len = n * dtype.itemsize();
        (0..len)
            .map(|i| {
                if dtype == DType::Bool {
                    (i % 2) as u8
                } else {
                    (i * 7 % 253) as u8
                }
            })
            .collect()
    }

    /// A dense leaf over `data`.
    fn leaf<'a>(dtype: DType, shape: &[u64], data: &'a [u8]) -> Item<'a> {
        Item::Dense {
            dtype,
            shape: shape.to_vec(),
            body: BodySrc::Bytes(data),
        }
    }

    fn dense(dtype: DType, shape: &[u64], data: &[u8], opts: &EncodeOptions) -> Vec<u8> {
        encode(&leaf(dtype, shape, data), opts).unwrap()
    }

    fn read_all(
        dev: &FakeDevice,
        bytes: &[u8],
    ) -> Result<Option<Received<crate::fake::FakeBuf>>, GpuError> {
        read_packet(dev, &mut &bytes[..], &DecodeOptions::default())
    }

    fn options() -> Vec<EncodeOptions> {
        let mut out = Vec::new();
        for version in [Version::V4, Version::V3] {
            for alignment in [64, 1, 16, 4096] {
                for integrity in [false, true] {
                    out.push(EncodeOptions {
                        version,
                        alignment,
                        integrity,
                        ..EncodeOptions::default()
                    });
                }
            }
        }
        out
    }

    /// Writes a received tensor back with write_packet and returns the bytes.
    fn write_back(dev: &FakeDevice, out: &Outgoing, opts: &EncodeOptions) -> Vec<u8> {
        let mut bytes = Vec::new();
        // SAFETY: every pointer in `out` is a live fake allocation of the right size.
        let n = unsafe {
            write_packet(dev, out, opts, |b| {
                bytes.extend_from_slice(b);
                Ok(())
            })
        }
        .unwrap();
        assert_eq!(n, bytes.len());
        bytes
    }

    #[test]
    fn every_dtype_layout_and_chunk_boundary_round_trips() {
        for chunk in [1, 7, 64, 1 << 16] {
            let dev = FakeDevice::new(chunk);
            for opts in options() {
                for dtype in DType::ALL {
                    for shape in [vec![], vec![0], vec![3, 5], vec![64], vec![2, 3, 11]] {
                        let n = shape.iter().product::<u64>() as usize;
                        let data = body(dtype, n);
                        let packet = dense(dtype, &shape, &data, &opts);
                        let Some(Received::Dense(t)) = read_all(&dev, &packet).unwrap() else {
                            panic!("dense expected")
                        };
                        assert_eq!((t.dtype, &t.shape), (dtype, &shape));
                        assert_eq!(t.buf.len(), data.len());
                        if !data.is_empty() {
                            assert_eq!(
                                dev.read(t.buf.ptr(), data.len()),
                                data,
                                "{dtype:?} {shape:?} {opts:?}"
                            );
                        }
                        let out = Outgoing::Dense(SourceTensor {
                            dtype,
                            shape: shape.clone(),
                            ptr: t.buf.ptr(),
                        });
                        assert_eq!(
                            write_back(&dev, &out, &opts),
                            packet,
                            "{dtype:?} {shape:?} {opts:?}"
                        );
                    }
                }
            }
            assert_eq!(dev.allocations(), 0, "every device buffer freed");
            assert_eq!(dev.pending(), 0);
            assert_eq!(
                dev.staging().allocations(),
                2,
                "chunk {chunk}: two staging buffers, reused"
            );
        }
    }

    /// Memory handed out by a consumer's caching allocator (a slice of one arena): dropping it frees nothing.
    #[derive(Debug)]
    struct Borrowed {
        ptr: DevPtr,
        len: usize,
    }

    impl DeviceBuf for Borrowed {
        fn ptr(&self) -> DevPtr {
            self.ptr
        }
        fn len(&self) -> usize {
            self.len
        }
    }

    #[test]
    fn tensors_in_the_consumers_allocator_cost_no_device_wide_sync() {
        // Issue #19, defect 3: each tensor in tenso's own cuMemAlloc'ed memory is a cuMemFree later, which may
        // wait for the whole device (the fake counts every free as such a wait); memory from the consumer's
        // allocator (torch's, CuPy's) is given back to it instead.
        let dev = FakeDevice::new(16);
        let data: Vec<Vec<u8>> = (1..=3).map(|k| body(DType::Float32, 10 * k)).collect();
        let names = ["t0", "t1", "t2"];
        let entries: Vec<(&str, Item<'_>)> = data
            .iter()
            .zip(names)
            .map(|(d, name)| (name, leaf(DType::Float32, &[(d.len() / 4) as u64], d)))
            .collect();
        let packet = encode(&Item::Bundle(entries), &EncodeOptions::default()).unwrap();

        // tenso's own allocations: one device-wide wait per tensor when they go.
        let received = read_all(&dev, &packet).unwrap();
        assert_eq!(dev.device_syncs(), 0);
        drop(received);
        assert_eq!(dev.device_syncs(), 3);

        // The consumer's arena (allocated once, as a caching allocator keeps its blocks).
        let arena = dev.alloc(4096).unwrap();
        let next = std::cell::Cell::new(arena.ptr());
        let asked = std::cell::RefCell::new(Vec::new());
        let consumer = ExternalMemory::new(&dev, |len: usize| {
            asked.borrow_mut().push(len);
            let ptr = next.get();
            next.set(ptr + len.div_ceil(256) as u64 * 256);
            Ok(Borrowed { ptr, len })
        });
        let got = read_packet(&consumer, &mut &packet[..], &DecodeOptions::default()).unwrap();
        let Some(Received::Bundle(tensors)) = got else {
            panic!("bundle expected")
        };
        assert_eq!(*asked.borrow(), vec![40, 80, 120]);
        for ((_, t), d) in tensors.iter().zip(&data) {
            assert_eq!(dev.read(t.buf.ptr(), d.len()), *d);
        }
        drop(tensors);
        assert_eq!(dev.device_syncs(), 3, "no free, no device-wide wait");
        assert_eq!(dev.pending(), 0);

        // A consumer that hands back too little is refused before any copy.
        let short = ExternalMemory::new(&dev, |len: usize| {
            Ok(Borrowed {
                ptr: arena.ptr(),
                len: len - 1,
            })
        });
        let err = read_packet(&short, &mut &packet[..], &DecodeOptions::default()).unwrap_err();
        assert!(matches!(err, GpuError::BadLength { .. }), "{err}");
        drop(arena);
    }

    #[test]
    fn bundles_round_trip_and_consecutive_packets_are_not_over_read() {
        let dev = FakeDevice::new(32);
        for opts in options() {
            let a = body(DType::Float32, 30);
            let b = body(DType::BFloat16, 7);
            let tree = Item::Bundle(vec![
                ("weights", leaf(DType::Float32, &[5, 6], &a)),
                ("ß", leaf(DType::BFloat16, &[7], &b)),
            ]);
            let packet = encode(&tree, &opts).unwrap();
            let mut stream = packet.clone();
            stream.extend_from_slice(&dense(DType::UInt8, &[3], &[1, 2, 3], &opts));
            let mut reader = &stream[..];
            let Some(Received::Bundle(entries)) =
                read_packet(&dev, &mut reader, &DecodeOptions::default()).unwrap()
            else {
                panic!("bundle expected")
            };
            assert_eq!(
                reader.len(),
                stream.len() - packet.len(),
                "stops at the packet's end"
            );
            let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, ["weights", "ß"]);
            assert_eq!(dev.read(entries[0].1.buf.ptr(), a.len()), a);
            assert_eq!(dev.read(entries[1].1.buf.ptr(), b.len()), b);
            let out = Outgoing::Bundle(
                entries
                    .iter()
                    .map(|(k, t)| {
                        (
                            k.clone(),
                            SourceTensor {
                                dtype: t.dtype,
                                shape: t.shape.clone(),
                                ptr: t.buf.ptr(),
                            },
                        )
                    })
                    .collect(),
            );
            assert_eq!(write_back(&dev, &out, &opts), packet);
            let Some(Received::Dense(next)) =
                read_packet(&dev, &mut reader, &DecodeOptions::default()).unwrap()
            else {
                panic!("the next packet")
            };
            assert_eq!(dev.read(next.buf.ptr(), 3), [1, 2, 3]);
            assert!(read_packet(&dev, &mut reader, &DecodeOptions::default())
                .unwrap()
                .is_none());
        }
        let empty = encode(&Item::Bundle(vec![]), &EncodeOptions::default()).unwrap();
        assert!(
            matches!(read_all(&dev, &empty).unwrap(), Some(Received::Bundle(e)) if e.is_empty())
        );
    }

    #[test]
    fn every_truncation_is_an_eof_error_and_frees_everything() {
        let dev = FakeDevice::new(16);
        let opts = EncodeOptions {
            integrity: true,
            alignment: 16,
            ..EncodeOptions::default()
        };
        let a = body(DType::Int64, 9);
        let tree = Item::Bundle(vec![
            ("a", leaf(DType::Int64, &[9], &a)),
            ("b", leaf(DType::Int64, &[9], &a)),
        ]);
        for packet in [
            encode(&tree, &opts).unwrap(),
            dense(DType::Int64, &[9], &a, &opts),
        ] {
            assert!(read_all(&dev, &packet[..0]).unwrap().is_none());
            for cut in 1..packet.len() {
                match read_all(&dev, &packet[..cut]) {
                    Err(GpuError::Format(e)) => assert!(e.is_truncation(), "cut {cut}: {e}"),
                    other => panic!("cut {cut}: {other:?}"),
                }
                assert_eq!(
                    (dev.allocations(), dev.pending(), dev.lost()),
                    (0, 0, 0),
                    "cut {cut}"
                );
            }
        }
        assert_eq!(dev.staging().idle(), 2);
    }

    #[test]
    fn hostile_bytes_are_errors_never_panics() {
        let dev = FakeDevice::new(8);
        let opts = EncodeOptions {
            integrity: true,
            ..EncodeOptions::default()
        };
        let a = body(DType::Float32, 12);
        let tree = Item::Bundle(vec![("k", leaf(DType::Float32, &[3, 4], &a))]);
        for packet in [
            encode(&tree, &opts).unwrap(),
            dense(DType::Float32, &[3, 4], &a, &opts),
        ] {
            for i in 0..packet.len() {
                for flip in [0x01u8, 0x80, 0xFF] {
                    let mut bad = packet.clone();
                    bad[i] ^= flip;
                    let _ = read_all(&dev, &bad); // any answer but a panic
                    assert_eq!((dev.allocations(), dev.pending(), dev.lost()), (0, 0, 0));
                }
            }
            // A flipped body byte is caught by the footer.
            let mut bad = packet.clone();
            let at = packet.len() - 9;
            bad[at] ^= 1;
            assert!(matches!(
                read_all(&dev, &bad),
                Err(GpuError::Format(FormatError::Integrity { .. }))
            ));
            assert_eq!(dev.lost(), 0, "no copy outlived the buffer it wrote");
        }
        // A shape over the element limit is refused before any allocation; one under it, on a short stream, is an
        // EOF error that keeps no device memory.
        let mut liar = dense(DType::Float64, &[1], &[0; 8], &EncodeOptions::default());
        liar[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_all(&dev, &liar),
            Err(GpuError::Format(FormatError::TooManyElements { .. }))
        ));
        liar[10..14].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(read_all(&dev, &liar), Err(GpuError::Format(e)) if e.is_truncation()));
        // A bool body must hold 0 and 1 only.
        let bools = dense(DType::Bool, &[4], &[0, 1, 2, 1], &EncodeOptions::default());
        assert!(matches!(read_all(&dev, &bools), Err(GpuError::Format(_))));
        assert_eq!(dev.allocations(), 0);
    }

    #[test]
    fn other_kinds_are_unsupported() {
        let dev = FakeDevice::new(8);
        let codes = [1u8, 2, 3, 4];
        let q = Item::Quantized {
            qdtype: QDType::QInt8,
            scheme: QuantScheme::PerTensor,
            axis: 0,
            group_size: 0,
            shape: vec![4],
            scales: &[0.5],
            zero_points: &[0.0],
            codes: &codes,
        };
        let packet = encode(&q, &EncodeOptions::default()).unwrap();
        assert!(matches!(
            read_all(&dev, &packet),
            Err(GpuError::Unsupported { .. })
        ));
        let nested = Item::Bundle(vec![("inner", Item::Bundle(vec![]))]);
        let packet = encode(&nested, &EncodeOptions::default()).unwrap();
        let err = read_all(&dev, &packet).unwrap_err();
        assert!(err.to_string().contains("nested"), "{err}");
        let z = leaf(DType::UInt8, &[64], &[0; 64]);
        let packet = encode(
            &z,
            &EncodeOptions {
                compress: true,
                ..EncodeOptions::default()
            },
        )
        .unwrap();
        assert!(matches!(
            read_all(&dev, &packet),
            Err(GpuError::Unsupported { .. })
        ));
    }

    #[test]
    fn v3_chunked_footers_of_large_bodies_verify() {
        let dev = FakeDevice::new(1 << 20);
        let n = CHUNKED_HASH_CHUNK + 4096 + 3;
        let data = body(DType::UInt8, n);
        let opts = EncodeOptions {
            version: Version::V3,
            integrity: true,
            ..EncodeOptions::default()
        };
        let mut packet = dense(DType::UInt8, &[n as u64], &data, &opts);
        let at = packet.len() - 8;
        packet[at..].copy_from_slice(&tenso_format::hash::xxh3_64_chunked(&data).to_le_bytes());
        let Some(Received::Dense(t)) = read_all(&dev, &packet).unwrap() else {
            panic!()
        };
        assert_eq!(dev.read(t.buf.ptr(), n), data);
        packet[at] ^= 1;
        assert!(matches!(
            read_all(&dev, &packet),
            Err(GpuError::Format(FormatError::Integrity { .. }))
        ));
    }
}
