//! Quantization arithmetic (FORMAT.md §9.4) with tenso 0.24.0 semantics: min/max affine quantization,
//! zero point not clamped.
//!
//! For each tensor / channel / group of `f32` values:
//!
//! ```text
//! dmin, dmax = min, max of the values
//! dmin == dmax  →  scale = 1.0, zero_point = 0.0
//! otherwise     →  scale = f32((f64(dmax) − f64(dmin)) / f64(qmax − qmin))
//!                  zero_point = f32(qmin) − dmin / scale            (f32 arithmetic)
//! q = clamp(round_half_even(x / scale + zero_point), qmin, qmax)  (f32 arithmetic)
//! x' = (q − zero_point) · scale                                   (dequantize, f32)
//! ```
//!
//! Per-channel pairs follow the index along `axis` (any axis); per-group pairs cover consecutive
//! `group_size` elements in C order (the last group may be shorter). 4-bit codes are packed two per byte,
//! even index in the low nibble, odd index in the high nibble; for odd N the last high nibble is 0.

use crate::dtype::{QDType, QuantScheme, Version};
use crate::error::FormatError;

/// The channel axis of a quantized packet being read (FORMAT.md §9.3).
///
/// v4 records it (`wire_axis`). v3 has no axis byte: 0.19.4 quantizes along any axis but writes only the
/// scales, and its own `dequantize` assumes axis 0. A v3 per-channel packet is therefore valid when
/// `num_scales` equals the length of some axis, and its axis is the **first** such axis: unambiguous
/// when one axis matches, and the same as 0.19.4 (axis 0) whenever axis 0 matches. When several axes
/// match and the writer used a later one, the packet does not say so and the values dequantize along
/// the first (as they do with 0.19.4). Other v3 schemes get axis 0.
pub fn channel_axis(
    version: Version,
    scheme: QuantScheme,
    wire_axis: Option<u8>,
    shape: &[u64],
    num_scales: u32,
) -> Result<u8, FormatError> {
    match (version, wire_axis) {
        (Version::V4, Some(axis)) => Ok(axis),
        _ if scheme != QuantScheme::PerChannel => Ok(0),
        _ => shape
            .iter()
            .position(|&d| d == u64::from(num_scales))
            // ndim <= MAX_NDIM (32) was checked when the shape was read.
            .map(|a| a as u8)
            .ok_or(bad("num_scales does not equal the length of any axis")),
    }
}

/// Scales, zero points and packed codes of a quantized tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantParams {
    /// One scale per pair.
    pub scales: Vec<f32>,
    /// One zero point per pair.
    pub zero_points: Vec<f32>,
    /// Packed codes (`qdtype.packed_len(N)` bytes).
    pub codes: Vec<u8>,
}

fn bad(reason: &'static str) -> FormatError {
    FormatError::BadQuant { reason }
}

/// Maps element index → pair index for a scheme.
struct Pairs {
    scheme: QuantScheme,
    count: usize,
    inner: usize,
    channels: usize,
    group: usize,
}

impl Pairs {
    fn new(
        shape: &[u64],
        n: usize,
        scheme: QuantScheme,
        group_size: u32,
        axis: usize,
    ) -> Result<Pairs, FormatError> {
        let count = scheme.expected_num_scales(shape, group_size, axis)?;
        let count = usize::try_from(count).map_err(|_| bad("too many scale/zero-point pairs"))?;
        let (inner, channels) = if scheme == QuantScheme::PerChannel {
            let inner: u64 = shape[axis + 1..].iter().product();
            (inner.max(1) as usize, shape[axis] as usize)
        } else {
            (1, 1)
        };
        let _ = n;
        Ok(Pairs {
            scheme,
            count,
            inner,
            channels,
            group: group_size.max(1) as usize,
        })
    }

    fn of(&self, i: usize) -> usize {
        match self.scheme {
            QuantScheme::PerTensor => 0,
            QuantScheme::PerChannel => (i / self.inner) % self.channels,
            QuantScheme::PerGroup => i / self.group,
        }
    }
}

fn element_count(shape: &[u64]) -> Result<usize, FormatError> {
    let n = crate::header::checked_elements(shape, crate::consts::MAX_ELEMENTS)?;
    Ok(n as usize)
}

/// Quantizes `values` (C order, `shape`) with the given scheme.
pub fn quantize(
    values: &[f32],
    shape: &[u64],
    qdtype: QDType,
    scheme: QuantScheme,
    group_size: u32,
    axis: usize,
) -> Result<QuantParams, FormatError> {
    let n = element_count(shape)?;
    if values.len() != n {
        return Err(FormatError::BodyLength {
            expected: n,
            found: values.len(),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(bad("input contains nan or infinity"));
    }
    let pairs = Pairs::new(shape, n, scheme, group_size, axis)?;
    let mut lo = vec![f32::INFINITY; pairs.count];
    let mut hi = vec![f32::NEG_INFINITY; pairs.count];
    for (i, &v) in values.iter().enumerate() {
        let p = pairs.of(i);
        lo[p] = lo[p].min(v);
        hi[p] = hi[p].max(v);
    }
    let (qmin, qmax) = qdtype.qmin_qmax();
    let mut scales = Vec::with_capacity(pairs.count);
    let mut zero_points = Vec::with_capacity(pairs.count);
    for (&dmin, &dmax) in lo.iter().zip(&hi) {
        // An empty pair (no elements) and a constant one both get scale 1, zero point 0.
        if dmin >= dmax {
            scales.push(1.0f32);
            zero_points.push(0.0f32);
        } else {
            let scale = ((f64::from(dmax) - f64::from(dmin)) / f64::from(qmax - qmin)) as f32;
            scales.push(scale);
            zero_points.push(qmin as f32 - dmin / scale);
        }
    }
    let q: Vec<i32> = values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let p = pairs.of(i);
            let r = (x / scales[p] + zero_points[p]).round_ties_even();
            // NaN cannot occur: inputs are finite and scales are positive and finite.
            (r.clamp(qmin as f32, qmax as f32)) as i32
        })
        .collect();
    let codes = if qdtype.is_4bit() {
        let nibbles: Vec<i8> = q.iter().map(|&v| v as i8).collect();
        pack_nibbles(&nibbles)
    } else {
        q.iter().map(|&v| v as u8).collect()
    };
    Ok(QuantParams {
        scales,
        zero_points,
        codes,
    })
}

/// Dequantizes packed `codes` into `out` (`N` floats).
#[expect(
    clippy::too_many_arguments,
    reason = "the fields of a quantized tensor"
)]
pub fn dequantize(
    codes: &[u8],
    shape: &[u64],
    qdtype: QDType,
    scheme: QuantScheme,
    group_size: u32,
    axis: usize,
    scales: &[f32],
    zero_points: &[f32],
    out: &mut [f32],
) -> Result<(), FormatError> {
    let n = element_count(shape)?;
    if out.len() != n {
        return Err(FormatError::OutputSize {
            expected: n,
            found: out.len(),
        });
    }
    let len = qdtype.packed_len(n as u64);
    if codes.len() != len {
        return Err(FormatError::BodyLength {
            expected: len,
            found: codes.len(),
        });
    }
    let pairs = Pairs::new(shape, n, scheme, group_size, axis)?;
    if scales.len() != pairs.count || zero_points.len() != pairs.count {
        return Err(bad(
            "number of scales/zero points does not match the scheme and shape",
        ));
    }
    let signed = qdtype.is_signed();
    for (i, o) in out.iter_mut().enumerate() {
        let q: i32 = if qdtype.is_4bit() {
            let byte = codes[i / 2];
            let nib = if i % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            if signed {
                i32::from(((nib << 4) as i8) >> 4)
            } else {
                i32::from(nib)
            }
        } else if signed {
            i32::from(codes[i] as i8)
        } else {
            i32::from(codes[i])
        };
        let p = pairs.of(i);
        *o = (q as f32 - zero_points[p]) * scales[p];
    }
    Ok(())
}

/// Packs 4-bit codes two per byte: even index in the low nibble, odd in the high nibble.
pub fn pack_nibbles(codes: &[i8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|pair| {
            let lo = (pair[0] as u8) & 0x0F;
            let hi = pair.get(1).map_or(0, |&v| (v as u8) & 0x0F);
            lo | (hi << 4)
        })
        .collect()
}

/// Unpacks `n` 4-bit codes (sign-extended when `signed`). Missing bytes read as zero nibbles.
pub fn unpack_nibbles(packed: &[u8], n: usize, signed: bool) -> Vec<i8> {
    (0..n)
        .map(|i| {
            let byte = packed.get(i / 2).copied().unwrap_or(0);
            let nib = if i % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            if signed {
                ((nib << 4) as i8) >> 4
            } else {
                nib as i8
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_channel_axis_is_the_first_matching_axis() {
        let pc = QuantScheme::PerChannel;
        assert_eq!(
            channel_axis(Version::V3, pc, None, &[7, 3, 2], 3).unwrap(),
            1
        );
        assert_eq!(
            channel_axis(Version::V3, pc, None, &[7, 3, 2], 2).unwrap(),
            2
        );
        assert_eq!(
            channel_axis(Version::V3, pc, None, &[7, 3, 2], 7).unwrap(),
            0
        );
        // Several matches: the first, which is 0.19.4's own reading when axis 0 matches.
        assert_eq!(channel_axis(Version::V3, pc, None, &[4, 4], 4).unwrap(), 0);
        assert_eq!(
            channel_axis(Version::V3, pc, None, &[5, 4, 4], 4).unwrap(),
            1
        );
        assert!(channel_axis(Version::V3, pc, None, &[7, 3, 2], 5).is_err());
        assert!(channel_axis(Version::V3, pc, None, &[], 1).is_err());
        let pt = QuantScheme::PerTensor;
        assert_eq!(channel_axis(Version::V3, pt, None, &[7, 3], 1).unwrap(), 0);
        assert_eq!(
            channel_axis(Version::V4, pc, Some(2), &[7, 3], 3).unwrap(),
            2
        );
    }

    #[test]
    fn nibbles_match_the_spec_example() {
        // FORMAT.md §9.5: [-8, -4, -1, 3, 7] → c8 3f 07.
        let packed = pack_nibbles(&[-8, -4, -1, 3, 7]);
        assert_eq!(packed, [0xc8, 0x3f, 0x07]);
        assert_eq!(unpack_nibbles(&packed, 5, true), [-8, -4, -1, 3, 7]);
        assert_eq!(unpack_nibbles(&[0xf0], 2, false), [0, 15]);
    }

    #[test]
    fn per_tensor_uint8() {
        let v = [0.0f32, 1.0, 2.0, 3.0];
        let p = quantize(&v, &[4], QDType::QUInt8, QuantScheme::PerTensor, 0, 0).unwrap();
        let scale = (3.0f64 / 255.0) as f32;
        assert_eq!(p.scales, [scale]);
        assert_eq!(p.zero_points, [0.0]);
        assert_eq!(p.codes[0], 0);
        assert_eq!(p.codes[3], 255);
        let mut out = [0f32; 4];
        dequantize(
            &p.codes,
            &[4],
            QDType::QUInt8,
            QuantScheme::PerTensor,
            0,
            0,
            &p.scales,
            &p.zero_points,
            &mut out,
        )
        .unwrap();
        for (a, b) in out.iter().zip(v) {
            assert!((a - b).abs() <= scale);
        }
    }

    #[test]
    fn constant_input_and_zero_point_not_clamped() {
        let p = quantize(&[2.0; 3], &[3], QDType::QInt8, QuantScheme::PerTensor, 0, 0).unwrap();
        assert_eq!((p.scales[0], p.zero_points[0]), (1.0, 0.0));
        assert_eq!(p.codes, [2, 2, 2]);
        // All positive values: 0.24.0 leaves the zero point below qmin.
        let p = quantize(
            &[10.0, 20.0],
            &[2],
            QDType::QInt8,
            QuantScheme::PerTensor,
            0,
            0,
        )
        .unwrap();
        assert!(p.zero_points[0] < -128.0);
        assert_eq!(p.codes, [(-128i8) as u8, 127]);
    }

    #[test]
    fn per_channel_any_axis_and_groups() {
        let v: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let p = quantize(&v, &[2, 3], QDType::QInt4, QuantScheme::PerChannel, 0, 1).unwrap();
        assert_eq!(p.scales.len(), 3);
        assert_eq!(p.codes.len(), 3);
        let p0 = quantize(&v, &[2, 3], QDType::QInt8, QuantScheme::PerChannel, 0, 0).unwrap();
        assert_eq!(p0.scales.len(), 2);
        let g = quantize(&v, &[2, 3], QDType::QUInt4, QuantScheme::PerGroup, 4, 0).unwrap();
        assert_eq!(g.scales.len(), 2);
        assert!(quantize(&v, &[2, 3], QDType::QUInt4, QuantScheme::PerGroup, 0, 0).is_err());
        assert!(quantize(&v, &[2, 3], QDType::QUInt4, QuantScheme::PerChannel, 0, 2).is_err());
        let mut out = vec![0f32; 6];
        dequantize(
            &p.codes,
            &[2, 3],
            QDType::QInt4,
            QuantScheme::PerChannel,
            0,
            1,
            &p.scales,
            &p.zero_points,
            &mut out,
        )
        .unwrap();
        for (a, b) in out.iter().zip(&v) {
            assert!((a - b).abs() < 0.5, "{a} {b}");
        }
    }

    #[test]
    fn rejects_non_finite_and_bad_sizes() {
        assert!(quantize(
            &[f32::NAN],
            &[1],
            QDType::QInt8,
            QuantScheme::PerTensor,
            0,
            0
        )
        .is_err());
        assert!(quantize(
            &[f32::INFINITY],
            &[1],
            QDType::QInt8,
            QuantScheme::PerTensor,
            0,
            0
        )
        .is_err());
        assert!(quantize(&[1.0], &[2], QDType::QInt8, QuantScheme::PerTensor, 0, 0).is_err());
        let mut out = [0f32; 2];
        assert!(dequantize(
            &[1],
            &[2],
            QDType::QInt8,
            QuantScheme::PerTensor,
            0,
            0,
            &[1.0],
            &[0.0],
            &mut out
        )
        .is_err());
        assert!(dequantize(
            &[1, 2],
            &[2],
            QDType::QInt8,
            QuantScheme::PerTensor,
            0,
            0,
            &[],
            &[],
            &mut out
        )
        .is_err());
    }
}
