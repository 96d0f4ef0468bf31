//! Wire constants: magic, flag bits, codes and the limits every reader and writer enforces.
//!
//! The values come from `docs/FORMAT.md` §2. Flag bits are shared by both protocol versions; v3 stores
//! only the low byte.

/// The four magic bytes every packet starts with (ASCII `TNSO`).
pub const MAGIC: [u8; 4] = *b"TNSO";

/// Body aligned to 64 bytes relative to the packet start (no exponent byte).
pub const FLAG_ALIGNED: u16 = 0x0001;
/// An 8-byte XXH3-64 footer follows the body.
pub const FLAG_INTEGRITY: u16 = 0x0002;
/// The dense body is an LZ4 frame (v3 also: a raw LZ4 block).
pub const FLAG_COMPRESSION: u16 = 0x0004;
/// Sparse matrix in COO form.
pub const FLAG_SPARSE: u16 = 0x0008;
/// Bundle (an ordered map of string keys to packets).
pub const FLAG_BUNDLE: u16 = 0x0010;
/// Sparse matrix in CSR form.
pub const FLAG_SPARSE_CSR: u16 = 0x0020;
/// Sparse matrix in CSC form.
pub const FLAG_SPARSE_CSC: u16 = 0x0040;
/// Custom alignment: an exponent byte `e` follows the shape/metadata and the body is aligned to `2^e`.
pub const FLAG_CUST_ALIGN: u16 = 0x0080;
/// v4 string tensor.
pub const FLAG_STRING: u16 = 0x0100;
/// v4 direct ragged framing (decode-only upstream, rejected here).
pub const FLAG_RAGGED: u16 = 0x0200;
/// v4 GPU IPC reference (rejected by host decoders).
pub const FLAG_GPU_IPC_REF: u16 = 0x0400;
/// Every flag bit that has a meaning; the others (0x0800..0x8000) are rejected.
pub const KNOWN_FLAGS: u16 = 0x07FF;
/// Flags that select a sparse kind.
pub const SPARSE_FLAGS: u16 = FLAG_SPARSE | FLAG_SPARSE_CSR | FLAG_SPARSE_CSC;

/// Most shape entries a packet may declare.
pub const MAX_NDIM: usize = 32;
/// Most elements a dense, quantized or string packet (or a sparse component) may declare.
pub const MAX_ELEMENTS: u64 = 1_000_000_000;
/// Most nested container levels (bundles and sparse packets) a decoder follows.
pub const MAX_DEPTH: usize = 64;
/// Most entries a bundle can hold (the count is one byte).
pub const MAX_BUNDLE_ENTRIES: usize = 255;
/// The alignment flagged by `FLAG_ALIGNED` and used by default.
pub const DEFAULT_ALIGNMENT: usize = 64;
/// Largest alignment exponent a reader accepts (`2^63`).
pub const MAX_ALIGN_EXPONENT: u8 = 63;
/// Chunk size of the v3 chunked integrity hash (§5.3).
pub const CHUNKED_HASH_CHUNK: usize = 1 << 20;

/// Header size of protocol v3.
pub const HEADER_SIZE_V3: usize = 8;
/// Header size of protocol v4.
pub const HEADER_SIZE_V4: usize = 10;
/// The protocol version written by default.
pub const PROTOCOL_VERSION: u8 = 4;

/// Quantized dtype code: signed 8-bit codes.
pub const QDTYPE_QINT8: u8 = 16;
/// Quantized dtype code: unsigned 8-bit codes.
pub const QDTYPE_QUINT8: u8 = 17;
/// Quantized dtype code: signed 4-bit codes, two per byte.
pub const QDTYPE_QINT4: u8 = 18;
/// Quantized dtype code: unsigned 4-bit codes, two per byte.
pub const QDTYPE_QUINT4: u8 = 19;
/// Dtype code of a v4 string tensor.
pub const DTYPE_STRING: u8 = 20;
/// Dtype code reserved for bytes tensors (defined, never written).
pub const DTYPE_BYTES: u8 = 21;

/// Quantization scheme code: one scale/zero point for the whole tensor.
pub const QUANT_PER_TENSOR: u8 = 0;
/// Quantization scheme code: one pair per index along the channel axis.
pub const QUANT_PER_CHANNEL: u8 = 1;
/// Quantization scheme code: one pair per `group_size` consecutive elements (C order).
pub const QUANT_PER_GROUP: u8 = 2;

/// The LZ4 frame magic number as it appears on the wire.
pub const LZ4_FRAME_MAGIC: [u8; 4] = [0x04, 0x22, 0x4D, 0x18];
