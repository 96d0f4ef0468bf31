//! The DLPack names of tenso's element types ([`dlpark`]'s ABI structs), for capsules of device tensors.
//!
//! Every wire dtype has a DLPack code: bfloat16 is `kDLBfloat`, bool is `kDLBool` (one byte), complex is
//! `kDLComplex` with the width of the pair. The mapping is one-to-one, so a tensor read with
//! [`crate::packet::read_packet`] and exported keeps its dtype, and a device tensor imported for
//! [`crate::packet::write_packet`] is written under the dtype it has.

pub use dlpark::ffi::{DLDataType, DLDataTypeCode, DLDevice, DLDeviceType};
use tenso_format::DType;

/// The DLPack type of a wire dtype (one lane).
pub fn dl_dtype(dtype: DType) -> DLDataType {
    use DLDataTypeCode as C;
    let code = match dtype {
        DType::Float32 | DType::Float64 | DType::Float16 => C::FLOAT,
        DType::Int8 | DType::Int16 | DType::Int32 | DType::Int64 => C::INT,
        DType::UInt8 | DType::UInt16 | DType::UInt32 | DType::UInt64 => C::UINT,
        DType::Bool => C::BOOL,
        DType::Complex64 | DType::Complex128 => C::COMPLEX,
        DType::BFloat16 => C::BFLOAT,
    };
    DLDataType {
        code,
        bits: (8 * dtype.itemsize()) as u8,
        lanes: 1,
    }
}

/// The wire dtype of a DLPack type, if tenso has one (single lane only).
pub fn wire_dtype(dl: DLDataType) -> Option<DType> {
    if dl.lanes != 1 {
        return None;
    }
    DType::ALL.into_iter().find(|&d| dl_dtype(d) == dl)
}

/// Whether a DLPack layout (`strides` in elements, `None` meaning C order) is C-contiguous, as NumPy and torch define
/// it: the stride of a dimension of size 1 does not matter (torch exports a contiguous `(n, 1)` tensor made by `.t()`
/// with strides `(1, n)`), and an empty tensor is contiguous whatever its strides.
pub fn is_c_contiguous(shape: &[i64], strides: Option<&[i64]>) -> bool {
    let Some(strides) = strides else {
        return true;
    };
    if strides.len() != shape.len() {
        return false;
    }
    if shape.contains(&0) {
        return true;
    }
    let mut expected: i64 = 1;
    for (&dim, &stride) in shape.iter().zip(strides).rev() {
        if dim != 1 && stride != expected {
            return false;
        }
        expected = match expected.checked_mul(dim) {
            Some(e) => e,
            None => return false,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity_ignores_unit_dimensions_as_torch_and_numpy_do() {
        assert!(is_c_contiguous(&[2, 3], None));
        assert!(is_c_contiguous(&[2, 3], Some(&[3, 1])));
        assert!(!is_c_contiguous(&[2, 3], Some(&[1, 2])), "Fortran order");
        assert!(!is_c_contiguous(&[2, 3], Some(&[6, 2])), "a step");
        // torch: torch.ones(1, 5).t() is contiguous, exported with strides (1, 5).
        assert!(is_c_contiguous(&[5, 1], Some(&[1, 5])));
        assert!(is_c_contiguous(&[1, 2, 3], Some(&[1, 3, 1])));
        assert!(is_c_contiguous(&[1, 1], Some(&[7, 9])));
        // torch.ones(4, 5).t()[:1]: not contiguous.
        assert!(!is_c_contiguous(&[1, 4], Some(&[1, 5])));
        assert!(is_c_contiguous(&[0, 3], Some(&[9, 9])), "empty");
        assert!(is_c_contiguous(&[], Some(&[])), "0-d");
        assert!(!is_c_contiguous(&[2], Some(&[1, 1])), "length mismatch");
    }

    #[test]
    fn every_dtype_round_trips_and_codes_are_distinct() {
        for d in DType::ALL {
            assert_eq!(wire_dtype(dl_dtype(d)), Some(d), "{d:?}");
        }
        let bf16 = dl_dtype(DType::BFloat16);
        assert_eq!((bf16.code, bf16.bits), (DLDataTypeCode::BFLOAT, 16));
        let b = dl_dtype(DType::Bool);
        assert_eq!((b.code, b.bits), (DLDataTypeCode::BOOL, 8));
        let c = dl_dtype(DType::Complex64);
        assert_eq!((c.code, c.bits), (DLDataTypeCode::COMPLEX, 64));
        let vec4 = DLDataType {
            lanes: 4,
            ..dl_dtype(DType::Float32)
        };
        assert_eq!(wire_dtype(vec4), None);
        let fp8 = DLDataType {
            code: DLDataTypeCode::FLOAT8_E4M3FN,
            bits: 8,
            lanes: 1,
        };
        assert_eq!(wire_dtype(fp8), None);
    }
}
