//! On-wire codes: protocol versions, element dtypes, quantized dtypes, schemes and sparse formats.
//!
//! Every enum writes its discriminants explicitly (they are wire codes) and converts with `from_*`/`code`.

use crate::consts::*;
use crate::error::FormatError;

/// Protocol version of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Protocol v3 (tenso <= 0.20): 8-byte header, u8 flags.
    V3 = 3,
    /// Protocol v4 (tenso >= 0.21): 10-byte header, u16 flags.
    V4 = 4,
}

impl Version {
    /// The version for a version byte; anything but 3 and 4 is rejected.
    pub fn from_byte(b: u8) -> Result<Version, FormatError> {
        match b {
            3 => Ok(Version::V3),
            4 => Ok(Version::V4),
            found => Err(FormatError::UnsupportedVersion { found }),
        }
    }

    /// The version byte.
    pub fn byte(self) -> u8 {
        self as u8
    }

    /// Header size: 8 for v3, 10 for v4.
    pub fn header_len(self) -> usize {
        match self {
            Version::V3 => HEADER_SIZE_V3,
            Version::V4 => HEADER_SIZE_V4,
        }
    }
}

/// Element type of a dense array (codes 1..15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE-754 binary32.
    Float32 = 1,
    /// Two's complement 32-bit.
    Int32 = 2,
    /// IEEE-754 binary64.
    Float64 = 3,
    /// Two's complement 64-bit.
    Int64 = 4,
    /// Unsigned 8-bit.
    UInt8 = 5,
    /// Unsigned 16-bit.
    UInt16 = 6,
    /// One byte per element (`00`/`01` as written; other values are not checked on read).
    Bool = 7,
    /// IEEE-754 binary16.
    Float16 = 8,
    /// Two's complement 8-bit.
    Int8 = 9,
    /// Two's complement 16-bit.
    Int16 = 10,
    /// Unsigned 32-bit.
    UInt32 = 11,
    /// Unsigned 64-bit.
    UInt64 = 12,
    /// Two binary32 (real, imaginary).
    Complex64 = 13,
    /// Two binary64 (real, imaginary).
    Complex128 = 14,
    /// The upper 16 bits of a binary32.
    BFloat16 = 15,
}

impl DType {
    /// Every dtype in code order.
    pub const ALL: [DType; 15] = [
        DType::Float32,
        DType::Int32,
        DType::Float64,
        DType::Int64,
        DType::UInt8,
        DType::UInt16,
        DType::Bool,
        DType::Float16,
        DType::Int8,
        DType::Int16,
        DType::UInt32,
        DType::UInt64,
        DType::Complex64,
        DType::Complex128,
        DType::BFloat16,
    ];

    /// The dtype of a dense dtype code (1..15).
    pub fn from_code(code: u8) -> Result<DType, FormatError> {
        match code {
            1..=15 => Ok(DType::ALL[usize::from(code) - 1]),
            _ => Err(FormatError::UnknownDType { code }),
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        use DType::*;
        match self {
            UInt8 | Int8 | Bool => 1,
            UInt16 | Int16 | Float16 | BFloat16 => 2,
            Float32 | Int32 | UInt32 => 4,
            Float64 | Int64 | UInt64 | Complex64 => 8,
            Complex128 => 16,
        }
    }

    /// The NumPy name (`"bfloat16"` for code 15).
    pub fn name(self) -> &'static str {
        use DType::*;
        match self {
            Float32 => "float32",
            Int32 => "int32",
            Float64 => "float64",
            Int64 => "int64",
            UInt8 => "uint8",
            UInt16 => "uint16",
            Bool => "bool",
            Float16 => "float16",
            Int8 => "int8",
            Int16 => "int16",
            UInt32 => "uint32",
            UInt64 => "uint64",
            Complex64 => "complex64",
            Complex128 => "complex128",
            BFloat16 => "bfloat16",
        }
    }

    /// The dtype with this NumPy name, if any.
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// True for the integer dtypes accepted as sparse index arrays (int32, int64, uint32, uint64).
    pub fn is_sparse_index(self) -> bool {
        matches!(
            self,
            DType::Int32 | DType::Int64 | DType::UInt32 | DType::UInt64
        )
    }
}

/// Code type of a quantized tensor (codes 16..19).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QDType {
    /// Signed 8-bit codes, -128..127.
    QInt8 = 16,
    /// Unsigned 8-bit codes, 0..255.
    QUInt8 = 17,
    /// Signed 4-bit codes, -8..7, two per byte.
    QInt4 = 18,
    /// Unsigned 4-bit codes, 0..15, two per byte.
    QUInt4 = 19,
}

impl QDType {
    /// The quantized dtype of a code (16..19).
    pub fn from_code(code: u8) -> Result<QDType, FormatError> {
        match code {
            QDTYPE_QINT8 => Ok(QDType::QInt8),
            QDTYPE_QUINT8 => Ok(QDType::QUInt8),
            QDTYPE_QINT4 => Ok(QDType::QInt4),
            QDTYPE_QUINT4 => Ok(QDType::QUInt4),
            _ => Err(FormatError::UnknownDType { code }),
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// `"qint8"`, `"quint8"`, `"qint4"` or `"quint4"`.
    pub fn name(self) -> &'static str {
        match self {
            QDType::QInt8 => "qint8",
            QDType::QUInt8 => "quint8",
            QDType::QInt4 => "qint4",
            QDType::QUInt4 => "quint4",
        }
    }

    /// True for the two-codes-per-byte types.
    pub fn is_4bit(self) -> bool {
        matches!(self, QDType::QInt4 | QDType::QUInt4)
    }

    /// True for the two's complement types.
    pub fn is_signed(self) -> bool {
        matches!(self, QDType::QInt8 | QDType::QInt4)
    }

    /// The code range `(qmin, qmax)`.
    pub fn qmin_qmax(self) -> (i32, i32) {
        match self {
            QDType::QInt8 => (-128, 127),
            QDType::QUInt8 => (0, 255),
            QDType::QInt4 => (-8, 7),
            QDType::QUInt4 => (0, 15),
        }
    }

    /// Bytes of packed codes for `n_elements` elements (`ceil(n/2)` for 4-bit types), saturating at `usize::MAX`.
    pub fn packed_len(self, n_elements: u64) -> usize {
        let n = if self.is_4bit() {
            n_elements.div_ceil(2)
        } else {
            n_elements
        };
        usize::try_from(n).unwrap_or(usize::MAX)
    }
}

/// Quantization scheme (how many scale/zero-point pairs and which elements each covers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantScheme {
    /// One pair for the whole tensor.
    PerTensor = 0,
    /// One pair per index along the channel axis.
    PerChannel = 1,
    /// One pair per `group_size` consecutive elements in C order.
    PerGroup = 2,
}

impl QuantScheme {
    /// The scheme of a code; unknown codes are rejected.
    pub fn from_code(code: u8) -> Result<QuantScheme, FormatError> {
        match code {
            QUANT_PER_TENSOR => Ok(QuantScheme::PerTensor),
            QUANT_PER_CHANNEL => Ok(QuantScheme::PerChannel),
            QUANT_PER_GROUP => Ok(QuantScheme::PerGroup),
            _ => Err(FormatError::BadQuant {
                reason: "unknown quantization scheme",
            }),
        }
    }

    /// The wire code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// `"per_tensor"`, `"per_channel"` or `"per_group"`.
    pub fn name(self) -> &'static str {
        match self {
            QuantScheme::PerTensor => "per_tensor",
            QuantScheme::PerChannel => "per_channel",
            QuantScheme::PerGroup => "per_group",
        }
    }

    /// The number of scale/zero-point pairs this scheme needs for `shape`, checking the
    /// scheme's parameters (axis within the shape, positive group size).
    pub fn expected_num_scales(
        self,
        shape: &[u64],
        group_size: u32,
        axis: usize,
    ) -> Result<u64, FormatError> {
        match self {
            QuantScheme::PerTensor => Ok(1),
            QuantScheme::PerChannel => shape.get(axis).copied().ok_or(FormatError::BadQuant {
                reason: "per-channel axis is outside the shape",
            }),
            QuantScheme::PerGroup => {
                if group_size == 0 {
                    return Err(FormatError::BadQuant {
                        reason: "per-group quantization needs group_size > 0",
                    });
                }
                let n = shape
                    .iter()
                    .try_fold(1u64, |a, &d| a.checked_mul(d))
                    .ok_or(FormatError::TooManyElements {
                        count: u128::MAX,
                        limit: MAX_ELEMENTS,
                    })?;
                Ok(n.div_ceil(u64::from(group_size)))
            }
        }
    }
}

/// Storage format of a sparse matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SparseFormat {
    /// Coordinate list: `data`, `row`, `col`.
    Coo,
    /// Compressed sparse rows: `data`, `indices`, `indptr`.
    Csr,
    /// Compressed sparse columns: `data`, `indices`, `indptr`.
    Csc,
}

impl SparseFormat {
    /// The header flag selecting this format.
    pub fn flag(self) -> u16 {
        match self {
            SparseFormat::Coo => FLAG_SPARSE,
            SparseFormat::Csr => FLAG_SPARSE_CSR,
            SparseFormat::Csc => FLAG_SPARSE_CSC,
        }
    }

    /// `"coo"`, `"csr"` or `"csc"`.
    pub fn name(self) -> &'static str {
        match self {
            SparseFormat::Coo => "coo",
            SparseFormat::Csr => "csr",
            SparseFormat::Csc => "csc",
        }
    }

    /// The format with this name.
    pub fn from_name(name: &str) -> Option<SparseFormat> {
        match name {
            "coo" => Some(SparseFormat::Coo),
            "csr" => Some(SparseFormat::Csr),
            "csc" => Some(SparseFormat::Csc),
            _ => None,
        }
    }

    /// Names of the three components in wire order (SciPy attribute names).
    pub fn component_names(self) -> [&'static str; 3] {
        match self {
            SparseFormat::Coo => ["data", "row", "col"],
            SparseFormat::Csr | SparseFormat::Csc => ["data", "indices", "indptr"],
        }
    }

    /// The format selected by `flags`: exactly one sparse flag must be set.
    pub fn from_flags(flags: u16) -> Result<SparseFormat, FormatError> {
        match flags & SPARSE_FLAGS {
            FLAG_SPARSE => Ok(SparseFormat::Coo),
            FLAG_SPARSE_CSR => Ok(SparseFormat::Csr),
            FLAG_SPARSE_CSC => Ok(SparseFormat::Csc),
            _ => Err(FormatError::BadFlags { flags }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_codes_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()).unwrap(), d);
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        for bad in [0u8, 16, 20, 21, 22, 255] {
            assert!(DType::from_code(bad).is_err());
        }
        assert_eq!(DType::Complex128.itemsize(), 16);
        assert_eq!(DType::BFloat16.name(), "bfloat16");
    }

    #[test]
    fn qdtype_and_scheme() {
        for c in 16..=19u8 {
            assert_eq!(QDType::from_code(c).unwrap().code(), c);
        }
        assert!(QDType::from_code(20).is_err());
        assert_eq!(QDType::QInt4.packed_len(5), 3);
        assert_eq!(QDType::QUInt8.packed_len(5), 5);
        assert_eq!(QDType::QInt4.qmin_qmax(), (-8, 7));
        assert!(QuantScheme::from_code(9).is_err());
        assert_eq!(
            QuantScheme::PerGroup
                .expected_num_scales(&[5, 3], 4, 0)
                .unwrap(),
            4
        );
        assert_eq!(
            QuantScheme::PerChannel
                .expected_num_scales(&[5, 3], 0, 1)
                .unwrap(),
            3
        );
        assert!(QuantScheme::PerChannel
            .expected_num_scales(&[5, 3], 0, 2)
            .is_err());
        assert!(QuantScheme::PerGroup
            .expected_num_scales(&[5], 0, 0)
            .is_err());
    }

    #[test]
    fn sparse_flags() {
        assert_eq!(
            SparseFormat::from_flags(FLAG_SPARSE_CSR).unwrap(),
            SparseFormat::Csr
        );
        assert!(SparseFormat::from_flags(FLAG_SPARSE | FLAG_SPARSE_CSR).is_err());
        assert!(SparseFormat::from_flags(0).is_err());
        assert_eq!(SparseFormat::Coo.component_names(), ["data", "row", "col"]);
    }

    #[test]
    fn versions() {
        assert_eq!(Version::from_byte(3).unwrap().header_len(), 8);
        assert_eq!(Version::from_byte(4).unwrap().header_len(), 10);
        assert!(Version::from_byte(2).is_err());
        assert!(Version::from_byte(5).is_err());
    }
}
