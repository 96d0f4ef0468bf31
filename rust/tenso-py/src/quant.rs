//! Quantization arithmetic for `tenso.QuantizedTensor` (the math lives in `tenso_format::quant`).

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tenso_format::{QDType, QuantScheme};

use crate::errors::encode_error;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(_pack_int4, m)?)?;
    m.add_function(wrap_pyfunction!(_unpack_int4, m)?)?;
    Ok(())
}

/// Packs 4-bit codes (the low nibble of each byte) two per byte, even index in the low nibble (FORMAT.md §9.5).
#[pyfunction]
fn _pack_int4<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray1<'py, u8>,
) -> PyResult<Bound<'py, PyArray1<u8>>> {
    let nibbles: Vec<i8> = codes.as_slice()?.iter().map(|&c| c as i8).collect();
    Ok(PyArray1::from_vec(
        py,
        tenso_format::quant::pack_nibbles(&nibbles),
    ))
}

/// Unpacks `n` 4-bit codes: int8 (sign-extended) when `signed`, else uint8. Missing bytes read as zero nibbles.
#[pyfunction]
fn _unpack_int4<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray1<'py, u8>,
    n: usize,
    signed: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let bytes = packed.as_slice()?;
    if n > bytes.len().saturating_mul(2) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{n} 4-bit codes need {} packed bytes, got {}",
            n.div_ceil(2),
            bytes.len()
        )));
    }
    let codes = tenso_format::quant::unpack_nibbles(bytes, n, signed);
    Ok(if signed {
        PyArray1::from_vec(py, codes).into_any()
    } else {
        PyArray1::from_vec(py, codes.into_iter().map(|c| c as u8).collect::<Vec<u8>>()).into_any()
    })
}

/// Quantize an array: returns (packed uint8 codes, float32 scales, float32 zero points).
#[pyfunction]
#[pyo3(signature = (array, qdtype_code, scheme_code, group_size=0, axis=0))]
#[allow(clippy::type_complexity)]
fn _quantize<'py>(
    array: &Bound<'py, PyAny>,
    qdtype_code: u8,
    scheme_code: u8,
    group_size: u32,
    axis: usize,
) -> PyResult<(
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
)> {
    let py = array.py();
    let qdtype = QDType::from_code(qdtype_code).map_err(encode_error)?;
    let scheme = QuantScheme::from_code(scheme_code).map_err(encode_error)?;
    let numpy = py.import("numpy")?;
    let values = numpy
        .getattr("ascontiguousarray")?
        .call1((array, "float32"))?;
    let shape: Vec<u64> = values.getattr("shape")?.extract()?;
    let flat: PyReadonlyArray1<f32> = values.call_method1("reshape", (-1,))?.extract()?;
    let slice = flat.as_slice()?;
    let params = py
        .detach(|| tenso_format::quant::quantize(slice, &shape, qdtype, scheme, group_size, axis))
        .map_err(encode_error)?;
    Ok((
        PyArray1::from_vec(py, params.codes),
        PyArray1::from_vec(py, params.scales),
        PyArray1::from_vec(py, params.zero_points),
    ))
}

/// Reconstruct float32 values from packed codes.
#[pyfunction]
#[pyo3(signature = (data, scales, zero_points, shape, qdtype_code, scheme_code, group_size=0, axis=0))]
#[allow(clippy::too_many_arguments)]
fn _dequantize<'py>(
    data: &Bound<'py, PyAny>,
    scales: &Bound<'py, PyAny>,
    zero_points: &Bound<'py, PyAny>,
    shape: Vec<u64>,
    qdtype_code: u8,
    scheme_code: u8,
    group_size: u32,
    axis: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let py = data.py();
    let qdtype = QDType::from_code(qdtype_code).map_err(encode_error)?;
    let scheme = QuantScheme::from_code(scheme_code).map_err(encode_error)?;
    let numpy = py.import("numpy")?;
    let flat = |obj: &Bound<'py, PyAny>, dtype: &str| -> PyResult<Bound<'py, PyAny>> {
        numpy
            .getattr("ascontiguousarray")?
            .call1((obj, dtype))?
            .call_method1("reshape", (-1,))
    };
    let codes: PyReadonlyArray1<u8> = flat(data, "uint8")?.extract()?;
    let scales: PyReadonlyArray1<f32> = flat(scales, "float32")?.extract()?;
    let zero_points: PyReadonlyArray1<f32> = flat(zero_points, "float32")?.extract()?;
    let count = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
    let count = count.ok_or_else(|| pyo3::exceptions::PyValueError::new_err("shape too large"))?;
    let out = PyArray1::<f32>::zeros(py, count, false);
    {
        let mut out_rw = out.readwrite();
        let dst = out_rw.as_slice_mut()?;
        let (codes, scales, zero_points) = (
            codes.as_slice()?,
            scales.as_slice()?,
            zero_points.as_slice()?,
        );
        py.detach(|| {
            tenso_format::quant::dequantize(
                codes,
                &shape,
                qdtype,
                scheme,
                group_size,
                axis,
                scales,
                zero_points,
                dst,
            )
        })
        .map_err(encode_error)?;
    }
    let dims = PyTuple::new(py, &shape)?;
    out.call_method1("reshape", (dims,))
}
