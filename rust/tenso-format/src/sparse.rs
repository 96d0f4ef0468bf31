//! Validation of sparse packets (FORMAT.md §8), strict enough that consumers such as SciPy can index
//! the components without bounds checks.
//!
//! ```text
//! off          size   field
//! 0            H      header: exactly one of SPARSE_COO/CSR/CSC, dtype 0, ndim 2
//! H            8      logical shape: rows u32, cols u32
//! H+8          4+n0   n0 (u32), dense packet: data
//! …            4+n1   n1 (u32), dense packet: row (COO) / indices (CSR, CSC)
//! …            4+n2   n2 (u32), dense packet: col (COO) / indptr  (CSR, CSC)
//! ```
//!
//! Checks: components are 1-D, uncompressed; index components are int32/int64/uint32/uint64 with no
//! negative value; `len(data) == nnz`; COO: `len(row) == len(col) == nnz`, `row < rows`, `col < cols`;
//! CSR/CSC: `len(indptr) == major + 1`, `indptr[0] == 0`, non-decreasing, `indptr[last] == nnz`,
//! `indices < minor`. The logical shape is not subject to `MAX_ELEMENTS` (the components are).

//!
//! This module sees components as [`Component`]s (dtype, shape, raw body), so it depends on no decoder
//! type: `decode` calls it, never the other way round.

use crate::dtype::{DType, SparseFormat};
use crate::error::FormatError;

/// One component of a sparse packet as validation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Component<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape of the component packet.
    pub shape: &'a [u64],
    /// The raw body, or `None` when the component is compressed.
    pub raw: Option<&'a [u8]>,
}

fn bad(reason: &'static str) -> FormatError {
    FormatError::BadSparse { reason }
}

/// The raw body of a 1-D uncompressed component.
fn body<'a>(d: &Component<'a>) -> Result<&'a [u8], FormatError> {
    if d.shape.len() != 1 {
        return Err(bad("components must be 1-D"));
    }
    d.raw.ok_or(bad("components must not be compressed"))
}

/// Index `i` of an index component as u64 (None when negative).
fn index(b: &[u8], dtype: DType, i: usize) -> Option<u64> {
    match dtype {
        DType::Int32 => {
            let v = i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().expect("4-byte slice"));
            u64::try_from(v).ok()
        }
        DType::UInt32 => Some(u64::from(u32::from_le_bytes(
            b[4 * i..4 * i + 4].try_into().expect("4-byte slice"),
        ))),
        DType::Int64 => {
            let v = i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8-byte slice"));
            u64::try_from(v).ok()
        }
        DType::UInt64 => Some(u64::from_le_bytes(
            b[8 * i..8 * i + 8].try_into().expect("8-byte slice"),
        )),
        _ => None,
    }
}

struct Index<'a> {
    body: &'a [u8],
    dtype: DType,
    len: usize,
}

impl<'a> Index<'a> {
    fn new(d: &Component<'a>) -> Result<Self, FormatError> {
        let body = body(d)?;
        if !d.dtype.is_sparse_index() {
            return Err(bad("index arrays must be int32, int64, uint32 or uint64"));
        }
        Ok(Index {
            body,
            dtype: d.dtype,
            len: d.shape[0] as usize,
        })
    }

    fn get(&self, i: usize) -> Result<u64, FormatError> {
        index(self.body, self.dtype, i).ok_or(bad("negative index"))
    }

    fn all_below(&self, bound: u64, reason: &'static str) -> Result<(), FormatError> {
        for i in 0..self.len {
            if self.get(i)? >= bound {
                return Err(bad(reason));
            }
        }
        Ok(())
    }
}

/// Checks the components of a sparse packet of logical `shape` (see the module docs), in wire order
/// (COO: data, row, col; CSR/CSC: data, indices, indptr).
pub fn validate(
    format: SparseFormat,
    shape: [u64; 2],
    components: [Component<'_>; 3],
) -> Result<(), FormatError> {
    let [data, a, b] = &components;
    body(data)?;
    let nnz = data.shape[0];
    let [rows, cols] = shape;
    match format {
        SparseFormat::Coo => {
            let row = Index::new(a)?;
            let col = Index::new(b)?;
            if row.len as u64 != nnz || col.len as u64 != nnz {
                return Err(bad("row, col and data must have the same length"));
            }
            row.all_below(rows, "row index out of range")?;
            col.all_below(cols, "column index out of range")?;
        }
        SparseFormat::Csr | SparseFormat::Csc => {
            let (major, minor) = if format == SparseFormat::Csr {
                (rows, cols)
            } else {
                (cols, rows)
            };
            let indices = Index::new(a)?;
            let indptr = Index::new(b)?;
            if indices.len as u64 != nnz {
                return Err(bad("indices and data must have the same length"));
            }
            if indptr.len as u64 != major + 1 {
                return Err(bad(
                    "indptr must have one more entry than the major dimension",
                ));
            }
            if indptr.get(0)? != 0 {
                return Err(bad("indptr must start at 0"));
            }
            let mut prev = 0u64;
            for i in 1..indptr.len {
                let v = indptr.get(i)?;
                if v < prev {
                    return Err(bad("indptr must be non-decreasing"));
                }
                prev = v;
            }
            if prev != nnz {
                return Err(bad("indptr must end at the number of stored values"));
            }
            indices.all_below(minor, "index out of range")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Owned {
        dtype: DType,
        shape: [u64; 1],
        body: Vec<u8>,
    }

    impl Owned {
        fn comp(&self) -> Component<'_> {
            Component {
                dtype: self.dtype,
                shape: &self.shape,
                raw: Some(&self.body),
            }
        }
    }

    fn comp(dtype: DType, body: Vec<u8>) -> Owned {
        let n = (body.len() / dtype.itemsize()) as u64;
        Owned {
            dtype,
            shape: [n],
            body,
        }
    }

    fn le(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn check(format: SparseFormat, shape: [u64; 2], c: &[Owned; 3]) -> Result<(), FormatError> {
        validate(format, shape, [c[0].comp(), c[1].comp(), c[2].comp()])
    }

    #[test]
    fn csr_checks() {
        let parts = |ptr: &[i64]| {
            [
                comp(DType::Float64, vec![0u8; 16]),
                comp(DType::Int64, le(&[1, 0])),
                comp(DType::Int64, le(ptr)),
            ]
        };
        let ok = parts(&[0, 1, 2]);
        check(SparseFormat::Csr, [2, 2], &ok).unwrap();
        assert!(
            check(SparseFormat::Csr, [2, 1], &ok).is_err(),
            "index 1 out of range for 1 column"
        );
        assert!(
            check(SparseFormat::Csr, [3, 2], &ok).is_err(),
            "indptr length"
        );
        assert!(
            check(SparseFormat::Csr, [2, 2], &parts(&[0, 5, 2])).is_err(),
            "the upstream segfault case"
        );
        check(SparseFormat::Csc, [2, 2], &ok).unwrap();
        let mut compressed = [ok[0].comp(), ok[1].comp(), ok[2].comp()];
        compressed[0].raw = None;
        assert!(validate(SparseFormat::Csr, [2, 2], compressed).is_err());
    }

    #[test]
    fn coo_checks() {
        let c = [
            comp(DType::Float32, vec![0u8; 8]),
            comp(DType::Int64, le(&[0, 1])),
            comp(DType::Int64, le(&[-1, 1])),
        ];
        assert_eq!(
            check(SparseFormat::Coo, [2, 2], &c).unwrap_err(),
            FormatError::BadSparse {
                reason: "negative index"
            }
        );
    }
}
