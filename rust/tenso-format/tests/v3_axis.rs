//! Packets that tenso 0.19.4 wrote for per-channel quantized tensors along axes 1 and 2
//! (`tests/golden/v3-axis-0.19.4`, made by `tests/golden/make_v3_axis.py`). v3 has no axis byte
//! (FORMAT.md §9.3): the axis is inferred as the first one whose length equals the number of scales,
//! the values dequantize along it, and writing the tensor back as v3 gives 0.19.4's bytes.

use serde_json::Value;
use std::path::Path;
use tenso_format::*;

fn cases() -> (std::path::PathBuf, Vec<Value>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/v3-axis-0.19.4");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    (dir, manifest["cases"].as_array().unwrap().clone())
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The code of element `i`, read independently of the crate's unpacking.
fn code(q: &Quantized<'_>, i: usize) -> f32 {
    let signed = matches!(q.qdtype, QDType::QInt8 | QDType::QInt4);
    let v = match q.qdtype {
        QDType::QInt4 | QDType::QUInt4 => {
            let nib = (q.codes[i / 2] >> (4 * (i % 2))) & 0x0f;
            if signed && nib >= 8 {
                i32::from(nib) - 16
            } else {
                i32::from(nib)
            }
        }
        _ if signed => i32::from(q.codes[i] as i8),
        _ => i32::from(q.codes[i]),
    };
    v as f32
}

#[test]
fn reference_packets_along_other_axes_read_and_write_back() {
    let (dir, cases) = cases();
    assert_eq!(cases.len(), 10);
    let mut axes_seen = std::collections::BTreeSet::new();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let bytes = std::fs::read(dir.join(case["file"].as_str().unwrap())).unwrap();
        let integrity = case["check_integrity"].as_bool().unwrap();
        if integrity && !cfg!(feature = "xxh3") {
            continue;
        }
        let Packet::Quantized(q) = decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}")) else {
            panic!("{name}: not quantized")
        };
        let axis = case["inferred_axis"].as_u64().unwrap() as usize;
        axes_seen.insert(case["quantized_along"].as_u64().unwrap());
        assert_eq!(usize::from(q.axis), axis, "{name}: inferred axis");
        assert_eq!(q.scheme, QuantScheme::PerChannel, "{name}");
        assert_eq!(q.scales, f32s(&case["scales"]), "{name}: scales");
        assert_eq!(
            q.zero_points,
            f32s(&case["zero_points"]),
            "{name}: zero points"
        );
        let shape: Vec<usize> = q.shape.iter().map(|&d| d as usize).collect();
        assert_eq!(q.shape.len(), case["shape"].as_array().unwrap().len());
        // Dequantize along the inferred axis, checked against an independent element-by-element formula.
        let n: usize = shape.iter().product();
        let mut out = vec![0f32; n];
        quant::dequantize(
            q.codes,
            &q.shape,
            q.qdtype,
            q.scheme,
            q.group_size,
            axis,
            &q.scales,
            &q.zero_points,
            &mut out,
        )
        .unwrap();
        let inner: usize = shape[axis + 1..].iter().product();
        for (i, &got) in out.iter().enumerate() {
            let ch = (i / inner) % shape[axis];
            let want = (code(&q, i) - q.zero_points[ch]) * q.scales[ch];
            assert_eq!(got, want, "{name}: element {i}");
        }
        // Written back as v3 (the axis is not recorded): 0.19.4's bytes.
        let item = Item::Quantized {
            qdtype: q.qdtype,
            scheme: q.scheme,
            axis: q.axis,
            group_size: q.group_size,
            shape: q.shape.clone(),
            scales: &q.scales,
            zero_points: &q.zero_points,
            codes: q.codes,
        };
        let opts = EncodeOptions {
            version: Version::V3,
            integrity,
            ..EncodeOptions::default()
        };
        assert_eq!(
            plan(&item, &opts).unwrap().dropped_axes,
            usize::from(axis != 0),
            "{name}"
        );
        assert_eq!(encode(&item, &opts).unwrap(), bytes, "{name}: v3 bytes");
        // And framed incrementally from a stream.
        assert_eq!(
            frame(&bytes, &DecodeOptions::default()).unwrap(),
            Frame::Complete(bytes.len()),
            "{name}"
        );
    }
    assert_eq!(axes_seen.into_iter().collect::<Vec<_>>(), [1, 2]);
}
