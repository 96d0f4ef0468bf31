//! Header inspection without decoding the body (FORMAT.md Appendix A, 0.24.0 semantics).

use crate::consts::*;
use crate::decode::read_shape;
use crate::dtype::{DType, QDType, Version};
use crate::error::FormatError;
pub use crate::header::PacketKind;
use crate::header::{checked_elements, parse_header};

/// What the header and shape of a packet say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PacketInfo {
    /// Protocol version.
    pub version: Version,
    /// Raw flags (v3's u8 widened).
    pub flags: u16,
    /// Dtype code.
    pub dtype_code: u8,
    /// The `ndim` header byte (the entry count for bundles).
    pub ndim: u8,
    /// Shape (`()` for bundles; the logical shape for sparse; `(count,)` for strings).
    pub shape: Vec<u64>,
    /// Product of the shape (0 for bundles).
    pub total_elements: u64,
    /// The `ALIGNED` bit only (a `CUST_ALIGN` packet reports false).
    pub aligned: bool,
    /// The `INTEGRITY` bit.
    pub integrity_protected: bool,
    /// Kind selected by the header.
    pub kind: PacketKind,
    /// Entry count, for bundles.
    pub entry_count: Option<u8>,
    /// Uncompressed body size: `N·itemsize`, `ceil(N/2)` for 4-bit codes, `N` for 8-bit codes, 0 for
    /// kinds without a fixed item size (bundle, sparse, string).
    pub data_size_bytes: u64,
    /// The quantized dtype, for quantized packets.
    pub quantized: Option<QDType>,
    /// The element dtype, for dense packets.
    pub dtype: Option<DType>,
}

/// Reads the header and shape of a packet (O(ndim), no body access, no integrity check).
pub fn packet_info(buf: &[u8]) -> Result<PacketInfo, FormatError> {
    let h = parse_header(buf)?;
    let f = h.flags;
    let kind = h.kind()?;
    let mut info = PacketInfo {
        version: h.version,
        flags: f,
        dtype_code: h.dtype_code,
        ndim: h.count,
        shape: Vec::new(),
        total_elements: 0,
        aligned: f & FLAG_ALIGNED != 0,
        integrity_protected: f & FLAG_INTEGRITY != 0,
        kind,
        entry_count: None,
        data_size_bytes: 0,
        quantized: None,
        dtype: None,
    };
    match kind {
        PacketKind::Bundle => info.entry_count = Some(h.count),
        PacketKind::GpuIpcRef => {}
        PacketKind::Sparse(_) | PacketKind::Strings | PacketKind::Ragged => {
            info.shape = read_shape(buf, h.len(), usize::from(h.count))?;
            info.total_elements = checked_elements(&info.shape, u64::MAX)?;
        }
        PacketKind::Quantized => {
            let q = QDType::from_code(h.dtype_code)?;
            info.shape = read_shape(buf, h.len(), usize::from(h.count))?;
            info.total_elements = checked_elements(&info.shape, MAX_ELEMENTS)?;
            info.quantized = Some(q);
            info.data_size_bytes = q.packed_len(info.total_elements) as u64;
        }
        PacketKind::Dense => {
            let d = DType::from_code(h.dtype_code)?;
            info.shape = read_shape(buf, h.len(), usize::from(h.count))?;
            info.total_elements = checked_elements(&info.shape, MAX_ELEMENTS)?;
            info.dtype = Some(d);
            info.data_size_bytes = info.total_elements * d.itemsize() as u64;
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::{encode, BodySrc, EncodeOptions, Item};

    #[test]
    fn appendix_a_semantics() {
        let body = [0u8; 12];
        let item = Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Bytes(&body),
        };
        let i = packet_info(&encode(&item, &EncodeOptions::default()).unwrap()).unwrap();
        assert_eq!(
            (i.kind, i.aligned, i.total_elements, i.data_size_bytes),
            (PacketKind::Dense, true, 3, 12)
        );
        assert_eq!(i.dtype, Some(DType::Float32));
        let o = EncodeOptions {
            alignment: 16,
            ..EncodeOptions::default()
        };
        let i = packet_info(&encode(&item, &o).unwrap()).unwrap();
        assert!(!i.aligned, "CUST_ALIGN reports aligned: false");

        let b = Item::Bundle(vec![("a", item.clone()), ("b", item)]);
        let i = packet_info(&encode(&b, &EncodeOptions::default()).unwrap()).unwrap();
        assert_eq!(
            (i.kind, i.entry_count, i.shape.len(), i.total_elements),
            (PacketKind::Bundle, Some(2), 0, 0)
        );

        let q = Item::Quantized {
            qdtype: QDType::QUInt4,
            scheme: crate::QuantScheme::PerTensor,
            axis: 0,
            group_size: 0,
            shape: vec![5],
            scales: &[1.0],
            zero_points: &[0.0],
            codes: &[0, 0, 0],
        };
        let i = packet_info(&encode(&q, &EncodeOptions::default()).unwrap()).unwrap();
        assert_eq!(
            (i.kind.name(), i.quantized, i.dtype, i.data_size_bytes),
            ("quantized", Some(QDType::QUInt4), None, 3)
        );

        let s = Item::Strings {
            offsets: &[0, 1],
            payload: b"x",
        };
        let i = packet_info(&encode(&s, &EncodeOptions::default()).unwrap()).unwrap();
        assert_eq!((i.kind, i.shape.clone()), (PacketKind::Strings, vec![1]));
    }
}
