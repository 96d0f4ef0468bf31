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

use crate::decode::{Dense, Sparse};
use crate::dtype::{DType, SparseFormat};
use crate::error::FormatError;

fn bad(reason: &'static str) -> FormatError {
    FormatError::BadSparse { reason }
}

/// The raw body of a 1-D uncompressed component.
fn body<'a>(d: &Dense<'a>) -> Result<&'a [u8], FormatError> {
    if d.shape.len() != 1 {
        return Err(bad("components must be 1-D"));
    }
    match d.body {
        crate::decode::Body::Raw(b) => Ok(b),
        _ => Err(bad("components must not be compressed")),
    }
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
    fn new(d: &Dense<'a>) -> Result<Self, FormatError> {
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

/// Checks a decoded sparse packet (see the module docs).
pub fn validate(s: &Sparse<'_>) -> Result<(), FormatError> {
    let [data, a, b] = &s.components;
    body(data)?;
    let nnz = data.shape[0];
    let [rows, cols] = s.shape;
    match s.format {
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
            let (major, minor) = if s.format == SparseFormat::Csr {
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
    use crate::decode::Body;
    use crate::dtype::Version;

    fn comp(dtype: DType, body: &[u8]) -> Dense<'_> {
        let n = (body.len() / dtype.itemsize()) as u64;
        Dense {
            version: Version::V4,
            dtype,
            shape: vec![n],
            alignment: 64,
            body: Body::Raw(body),
        }
    }

    fn le(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn csr_checks() {
        let data = [0u8; 16];
        let indices = le(&[1, 0]);
        let ok_ptr = le(&[0, 1, 2]);
        fn s<'a>(data: &'a [u8], indices: &'a [u8], ptr: &'a [u8], shape: [u64; 2]) -> Sparse<'a> {
            Sparse {
                format: SparseFormat::Csr,
                shape,
                components: [
                    comp(DType::Float64, data),
                    comp(DType::Int64, indices),
                    comp(DType::Int64, ptr),
                ],
            }
        }
        validate(&s(&data, &indices, &ok_ptr, [2, 2])).unwrap();
        assert!(
            validate(&s(&data, &indices, &ok_ptr, [2, 1])).is_err(),
            "index 1 out of range for 1 column"
        );
        assert!(
            validate(&s(&data, &indices, &ok_ptr, [3, 2])).is_err(),
            "indptr length"
        );
        assert!(
            validate(&s(&data, &indices, &le(&[0, 5, 2]), [2, 2])).is_err(),
            "the upstream segfault case"
        );
        let csc = Sparse {
            format: SparseFormat::Csc,
            ..s(&data, &indices, &ok_ptr, [2, 2])
        };
        validate(&csc).unwrap();
    }

    #[test]
    fn coo_checks() {
        let data = [0u8; 8];
        let rows = le(&[0, 1]);
        let cols = le(&[-1, 1]);
        let s = Sparse {
            format: SparseFormat::Coo,
            shape: [2, 2],
            components: [
                comp(DType::Float32, &data),
                comp(DType::Int64, &rows),
                comp(DType::Int64, &cols),
            ],
        };
        assert_eq!(
            validate(&s).unwrap_err(),
            FormatError::BadSparse {
                reason: "negative index"
            }
        );
    }
}
