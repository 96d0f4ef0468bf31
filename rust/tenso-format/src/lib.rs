//! The tenso tensor wire format, protocol v3 and v4: parsing, validation and writing, without Python.
//!
//! The normative description of every byte is [`docs/FORMAT.md`](../../../docs/FORMAT.md) in the
//! repository; section numbers (§) in these docs refer to it. This crate reads both protocol versions
//! (everything but GPU IPC references and the never-written `RAGGED` framing) and writes either version
//! byte for byte as tenso 0.24.0 (v4) and 0.19.4 (v3, with the plain XXH3 footer) do.
//!
//! A packet is a fixed header followed by a kind-specific layout:
//!
//! ```text
//! v3 header (8 bytes)                        v4 header (10 bytes)
//! +------+---+-----+-----+-----+             +------+---+---------+-----+-----+-----+
//! | TNSO | 3 | flg | dt  | nd  |             | TNSO | 4 | flags16 | dt  | nd  | rsv |
//! +------+---+-----+-----+-----+             +------+---+---------+-----+-----+-----+
//!  0      4   5     6     7                   0      4   5         7     8     9
//!
//! dense     | header | shape: nd × u32 | [exp u8] | pad to 2^exp or 64 | body N·itemsize | [xxh3 u64] |
//! quantized | header | shape | scheme | [axis, v4] | group u32 | n u32 | n×f32 | n×f32 | [exp] | pad | codes | [xxh3] |
//! bundle    | header (nd = entry count) | { klen u32 | key | vlen u32 | packet } × count |
//! sparse    | header (nd = 2) | rows u32 | cols u32 | { n u32 | dense packet } × 3 |
//! string    | v4 header | count u32 | pad to 64 | (count+1) × u64 offsets | payload | [xxh3] |
//! ```
//!
//! Padding is relative to the start of each packet, so nested bodies are aligned only relative to their
//! own packet. All integers are little-endian.
//!
//! Entry points:
//! * [`decode()`] / [`decode_with`]: borrowing, zero-copy, fully validated decoding (limits, checked
//!   arithmetic, nesting depth, integrity before decompression, sparse and string validation);
//! * [`plan`] / [`encode_into`] / [`seal`] / [`encode()`]: writing, with bodies either given or copied by the
//!   caller into [`Slot`]s; [`skeleton`]: everything but the bodies, for writers that stream bodies from elsewhere;
//! * [`frame()`]: incremental stream framing;
//! * [`packet_info`]: header inspection;
//! * [`check_padding`]: non-zero padding and the packet's end, for validators;
//! * [`quant`]: quantization arithmetic; `lz4` and `hash` (features `lz4`, `xxh3`; [`hash::Xxh3Fn`] plugs in a faster
//!   XXH3).
//!
//! Built with `--no-default-features`, compressed bodies and integrity footers give
//! [`FormatError::Unsupported`] (unless integrity verification is switched off).
//!
//! ```
//! use tenso_format::{decode, encode, BodySrc, DType, EncodeOptions, Item, Packet};
//!
//! let body: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
//! let item = Item::Dense { dtype: DType::Float32, shape: vec![3], body: BodySrc::Bytes(&body) };
//! let bytes = encode(&item, &EncodeOptions::default()).unwrap();
//! assert_eq!(bytes.len(), 76);
//! match decode(&bytes).unwrap() {
//!     Packet::Dense(d) => assert_eq!(d.raw(), Some(&body[..])),
//!     _ => unreachable!(),
//! }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod consts;
pub mod decode;
pub mod dtype;
pub mod encode;
pub mod error;
pub mod frame;
pub mod hash;
pub mod header;
pub mod info;
#[cfg(feature = "lz4")]
pub mod lz4;
pub mod padding;
pub mod quant;
pub mod sparse;

pub use consts::*;
pub use decode::{
    check_bool_body, decode, decode_exact, decode_prefix, decode_with, Body, DecodeOptions, Dense,
    Packet, Quantized, Sparse, Strings,
};
pub use dtype::{DType, QDType, QuantScheme, SparseFormat, Version};
pub use encode::{
    dense_prefix_len, encode, encode_into, plan, seal, seal_with, skeleton, BodySrc, EncodeOptions,
    Item, Plan, Skeleton, Slot,
};
pub use error::FormatError;
pub use frame::{frame, Frame};
pub use header::{parse_header, Header};
pub use info::{packet_info, PacketInfo, PacketKind};
pub use padding::{check_padding, NonZeroPadding, PaddingKind, PaddingReport, PathStep};
