//! Quantization arithmetic for `tenso.QuantizedTensor` (the math lives in `tenso_format::quant`).

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tenso_format::{QDType, QuantScheme};

use crate::errors::encode_error;

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(_dequantize, m)?)?;
    Ok(())
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
