//! Property tests: encode → decode round trips over dtype × shape (0-d and zero-size included) × options
//! × version, for dense leaves, bundles, quantized tensors and string tensors, plus the plan/fill/seal
//! path agreeing with `encode`, and framing agreeing with decoding.

use proptest::prelude::*;
use tenso_format::*;

fn version() -> impl Strategy<Value = Version> {
    prop_oneof![Just(Version::V3), Just(Version::V4)]
}

fn dtype() -> impl Strategy<Value = DType> {
    (0usize..15).prop_map(|i| DType::ALL[i])
}

fn shape() -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(0u64..5, 0..4)
}

fn options() -> impl Strategy<Value = EncodeOptions> {
    let alignment = prop_oneof![
        Just(64usize),
        Just(1),
        Just(2),
        Just(8),
        Just(16),
        Just(128),
        Just(4096)
    ];
    let compress = if cfg!(feature = "lz4") {
        any::<bool>().boxed()
    } else {
        Just(false).boxed()
    };
    let integrity = if cfg!(feature = "xxh3") {
        any::<bool>().boxed()
    } else {
        Just(false).boxed()
    };
    (version(), alignment, integrity, compress).prop_map(
        |(version, alignment, integrity, compress)| EncodeOptions {
            version,
            alignment,
            integrity,
            compress,
            ..EncodeOptions::default()
        },
    )
}

fn dense_case() -> impl Strategy<Value = (DType, Vec<u64>, Vec<u8>)> {
    (dtype(), shape()).prop_flat_map(|(d, s)| {
        let n = s.iter().product::<u64>() as usize * d.itemsize();
        (Just(d), Just(s), prop::collection::vec(any::<u8>(), n))
    })
}

fn check_dense(p: &Packet<'_>, dtype: DType, shape: &[u64], body: &[u8], alignment: usize) {
    let Packet::Dense(d) = p else {
        panic!("not dense: {p:?}")
    };
    assert_eq!((d.dtype, &d.shape[..]), (dtype, shape));
    assert_eq!(d.body.to_vec().unwrap(), body);
    assert_eq!(d.alignment, alignment);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dense_round_trip((dtype, shape, body) in dense_case(), opts in options(), trailing in 0usize..3) {
        let item = Item::Dense { dtype, shape: shape.clone(), body: BodySrc::Bytes(&body) };
        let bytes = encode(&item, &opts).unwrap();
        check_dense(&decode(&bytes).unwrap(), dtype, &shape, &body, opts.alignment);
        let info = packet_info(&bytes).unwrap();
        prop_assert_eq!(info.shape, shape.clone());
        prop_assert_eq!(info.data_size_bytes, body.len() as u64);
        prop_assert_eq!(info.aligned, opts.alignment == 64);
        if !opts.compress {
            prop_assert_eq!(bytes.len(), dense_prefix_len(opts.version, shape.len(), opts.alignment) + body.len() + if opts.integrity { 8 } else { 0 });
            let mut padded = bytes.clone();
            padded.extend(std::iter::repeat_n(0xAB, trailing));
            prop_assert_eq!(frame(&padded, &DecodeOptions::default()).unwrap(), Frame::Complete(bytes.len()));
            check_dense(&decode(&padded).unwrap(), dtype, &shape, &body, opts.alignment);
            // Deferred path: same bytes.
            let deferred = Item::Dense { dtype, shape: shape.clone(), body: BodySrc::Deferred };
            let plan = plan(&deferred, &opts).unwrap();
            let mut out = vec![0x5Au8; plan.len];
            encode_into(&deferred, &opts, &mut out).unwrap();
            out[plan.slots[0].body.clone()].copy_from_slice(&body);
            seal(&mut out, &plan.slots);
            prop_assert_eq!(out, bytes);
        }
    }

    #[test]
    fn bundle_round_trip(leaves in prop::collection::vec(dense_case(), 0..5), opts in options(), nest in any::<bool>()) {
        let keys: Vec<String> = (0..leaves.len()).map(|i| format!("k{i}é")).collect();
        let entries: Vec<(&str, Item)> = leaves.iter().zip(&keys).map(|((d, s, b), k)| {
            (k.as_str(), Item::Dense { dtype: *d, shape: s.clone(), body: BodySrc::Bytes(b) })
        }).collect();
        let item = if nest { Item::Bundle(vec![("outer", Item::Bundle(entries))]) } else { Item::Bundle(entries) };
        let bytes = encode(&item, &opts).unwrap();
        let mut p = decode(&bytes).unwrap();
        if nest {
            let Packet::Bundle(mut e) = p else { panic!() };
            prop_assert_eq!(e.len(), 1);
            p = e.remove(0).1;
        }
        let Packet::Bundle(e) = p else { panic!() };
        prop_assert_eq!(e.len(), leaves.len());
        for ((k, v), ((d, s, b), want)) in e.iter().zip(leaves.iter().zip(&keys)) {
            prop_assert_eq!(*k, want.as_str());
            check_dense(v, *d, s, b, opts.alignment);
        }
        prop_assert_eq!(frame(&bytes, &DecodeOptions::default()).unwrap(), Frame::Complete(bytes.len()));
    }

    #[test]
    fn quantized_round_trip(
        shape in prop::collection::vec(1u64..5, 1..4),
        q in 16u8..20,
        scheme in 0u8..3,
        group_size in 1u32..6,
        axis_pick in any::<prop::sample::Index>(),
        opts in options(),
        seed in any::<u64>(),
    ) {
        let qdtype = QDType::from_code(q).unwrap();
        let scheme = QuantScheme::from_code(scheme).unwrap();
        let axis = if opts.version == Version::V3 { 0 } else { axis_pick.index(shape.len()) };
        let n: u64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed)) % 1000) as f32 / 7.0 - 50.0).collect();
        let qp = quant::quantize(&values, &shape, qdtype, scheme, group_size, axis).unwrap();
        let item = Item::Quantized {
            qdtype, scheme, axis: axis as u8, group_size, shape: shape.clone(),
            scales: &qp.scales, zero_points: &qp.zero_points, codes: &qp.codes,
        };
        let bytes = encode(&item, &opts).unwrap();
        let Packet::Quantized(d) = decode(&bytes).unwrap() else { panic!() };
        prop_assert_eq!(d.codes, &qp.codes[..]);
        prop_assert_eq!(&d.scales, &qp.scales);
        prop_assert_eq!(&d.zero_points, &qp.zero_points);
        prop_assert_eq!(d.axis as usize, axis);
        prop_assert_eq!(frame(&bytes, &DecodeOptions::default()).unwrap(), Frame::Complete(bytes.len()));
        let mut out = vec![0f32; n as usize];
        quant::dequantize(d.codes, &d.shape, d.qdtype, d.scheme, d.group_size, d.axis as usize, &d.scales, &d.zero_points, &mut out).unwrap();
        for (i, (a, b)) in out.iter().zip(&values).enumerate() {
            let p = match scheme {
                QuantScheme::PerTensor => 0,
                QuantScheme::PerGroup => i / group_size as usize,
                QuantScheme::PerChannel => {
                    let inner: u64 = shape[axis + 1..].iter().product();
                    (i / inner as usize) % shape[axis] as usize
                }
            };
            // A constant pair gets scale 1 and zero point 0, so values outside the code range clamp.
            if qp.scales[p] == 1.0 && qp.zero_points[p] == 0.0 {
                continue;
            }
            prop_assert!((a - b).abs() <= qp.scales[p] * 0.5001 + 1e-4, "{} vs {}", a, b);
        }
    }

    #[test]
    fn strings_round_trip(strings in prop::collection::vec(".{0,6}", 0..6), integrity in any::<bool>()) {
        let integrity = integrity && cfg!(feature = "xxh3");
        let mut offsets = vec![0u64];
        let mut payload = Vec::new();
        for s in &strings {
            payload.extend_from_slice(s.as_bytes());
            offsets.push(payload.len() as u64);
        }
        let opts = EncodeOptions { integrity, ..EncodeOptions::default() };
        let bytes = encode(&Item::Strings { offsets: &offsets, payload: &payload }, &opts).unwrap();
        let Packet::Strings(s) = decode(&bytes).unwrap() else { panic!() };
        prop_assert_eq!(s.len(), strings.len());
        for (i, want) in strings.iter().enumerate() {
            prop_assert_eq!(s.get(i), Some(want.as_str()));
        }
        prop_assert_eq!(frame(&bytes, &DecodeOptions::default()).unwrap(), Frame::Complete(bytes.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), v4 in any::<bool>()) {
        let mut b = bytes;
        if b.len() >= 5 {
            b[..4].copy_from_slice(b"TNSO");
            b[4] = if v4 { 4 } else { 3 };
        }
        let _ = decode(&b);
        let _ = packet_info(&b);
        match frame(&b, &DecodeOptions::default()) {
            Ok(Frame::Need(n)) => prop_assert!(n > b.len()),
            Ok(Frame::Complete(n)) => prop_assert!(n <= b.len()),
            Err(_) => {}
        }
    }
}

fn index_bytes(dtype: DType, v: &[u64]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| match dtype {
            DType::Int32 => (x as i32).to_le_bytes().to_vec(),
            DType::UInt32 => (x as u32).to_le_bytes().to_vec(),
            DType::Int64 => (x as i64).to_le_bytes().to_vec(),
            _ => x.to_le_bytes().to_vec(),
        })
        .collect()
}

fn index_dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::Int32),
        Just(DType::Int64),
        Just(DType::UInt32),
        Just(DType::UInt64)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Valid sparse matrices of every format, in a bundle next to a quantized tensor, round-trip.
    #[test]
    fn sparse_and_mixed_round_trip(
        rows in 1u64..6,
        cols in 1u64..6,
        mask in any::<u64>(),
        fmt in 0usize..3,
        idt in index_dtype(),
        pdt in index_dtype(),
        opts in options(),
    ) {
        let format = [SparseFormat::Coo, SparseFormat::Csr, SparseFormat::Csc][fmt];
        // Non-zero cells in major order for the format.
        let (major, minor) = if format == SparseFormat::Csc { (cols, rows) } else { (rows, cols) };
        let mut cells = Vec::new();
        for a in 0..major {
            for b in 0..minor {
                if mask >> ((a * minor + b) % 64) & 1 == 1 {
                    cells.push((a, b));
                }
            }
        }
        let nnz = cells.len();
        let data: Vec<u8> = (0..nnz).flat_map(|i| (i as f64).to_le_bytes()).collect();
        let (c1, c2) = match format {
            SparseFormat::Coo => {
                let r: Vec<u64> = cells.iter().map(|c| c.0).collect();
                let c: Vec<u64> = cells.iter().map(|c| c.1).collect();
                (index_bytes(idt, &r), index_bytes(pdt, &c))
            }
            _ => {
                let ind: Vec<u64> = cells.iter().map(|c| c.1).collect();
                let mut ptr = vec![0u64; major as usize + 1];
                for c in &cells {
                    ptr[c.0 as usize + 1] += 1;
                }
                for i in 1..ptr.len() {
                    ptr[i] += ptr[i - 1];
                }
                (index_bytes(idt, &ind), index_bytes(pdt, &ptr))
            }
        };
        let n1 = (c1.len() / idt.itemsize()) as u64;
        let n2 = (c2.len() / pdt.itemsize()) as u64;
        let sparse = Item::Sparse {
            format,
            shape: [rows, cols],
            components: Box::new([
                Item::Dense { dtype: DType::Float64, shape: vec![nnz as u64], body: BodySrc::Bytes(&data) },
                Item::Dense { dtype: idt, shape: vec![n1], body: BodySrc::Bytes(&c1) },
                Item::Dense { dtype: pdt, shape: vec![n2], body: BodySrc::Bytes(&c2) },
            ]),
        };
        let q = Item::Quantized {
            qdtype: QDType::QInt8, scheme: QuantScheme::PerTensor, axis: 0, group_size: 0, shape: vec![2],
            scales: &[0.5], zero_points: &[1.0], codes: &[3, 4],
        };
        let item = Item::Bundle(vec![("m", sparse), ("q", q)]);
        let bytes = encode(&item, &opts).unwrap();
        let Packet::Bundle(e) = decode(&bytes).unwrap() else { panic!() };
        let Packet::Sparse(s) = &e[0].1 else { panic!() };
        prop_assert_eq!((s.format, s.shape), (format, [rows, cols]));
        prop_assert_eq!(s.components[0].raw().unwrap(), &data[..]);
        prop_assert_eq!(s.components[1].raw().unwrap(), &c1[..]);
        prop_assert_eq!(s.components[2].raw().unwrap(), &c2[..]);
        let want_align = if opts.version == Version::V3 { opts.alignment } else { 64 };
        prop_assert_eq!(s.components[0].alignment, want_align);
        let Packet::Quantized(qd) = &e[1].1 else { panic!() };
        prop_assert_eq!(qd.codes, &[3u8, 4][..]);
        prop_assert_eq!(frame(&bytes, &DecodeOptions::default()).unwrap(), Frame::Complete(bytes.len()));
    }
}
