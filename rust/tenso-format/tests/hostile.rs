//! The hostile battery: every row of FORMAT.md §14 plus lying lengths, overflowing shapes, LZ4 bombs and
//! deep nesting. Each input must give a clean `FormatError` (never a panic, a crash or a huge allocation).

use tenso_format::*;

fn enc(item: &Item<'_>, version: Version) -> Vec<u8> {
    encode(
        item,
        &EncodeOptions {
            version,
            ..EncodeOptions::default()
        },
    )
    .unwrap()
}

fn f32_vec(n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

fn dense(version: Version) -> Vec<u8> {
    let body = f32_vec(3);
    enc(
        &Item::Dense {
            dtype: DType::Float32,
            shape: vec![3],
            body: BodySrc::Bytes(&body),
        },
        version,
    )
}

fn with_integrity(version: Version) -> Vec<u8> {
    let body = f32_vec(3);
    let item = Item::Dense {
        dtype: DType::Float32,
        shape: vec![3],
        body: BodySrc::Bytes(&body),
    };
    encode(
        &item,
        &EncodeOptions {
            version,
            integrity: true,
            ..EncodeOptions::default()
        },
    )
    .unwrap()
}

/// Offsets of the dtype and ndim bytes of a header.
fn dt(v: Version) -> usize {
    if v == Version::V3 {
        6
    } else {
        7
    }
}

const BOTH: [Version; 2] = [Version::V3, Version::V4];

#[test]
fn short_magic_version() {
    for n in 0..8 {
        assert!(decode(&dense(Version::V3)[..n])
            .unwrap_err()
            .is_truncation());
    }
    assert!(decode(&dense(Version::V4)[..9])
        .unwrap_err()
        .is_truncation());
    let mut p = dense(Version::V4);
    p[0] = b'X';
    assert!(matches!(decode(&p), Err(FormatError::BadMagic { .. })));
    for v in [0u8, 1, 2, 5, 255] {
        let mut p = dense(Version::V4);
        p[4] = v;
        assert_eq!(
            decode(&p).unwrap_err(),
            FormatError::UnsupportedVersion { found: v }
        );
    }
}

#[test]
fn dtypes_and_dims() {
    for v in BOTH {
        for code in [0u8, 20, 21, 22, 255] {
            let mut p = dense(v);
            p[dt(v)] = code;
            assert!(
                matches!(decode(&p), Err(FormatError::UnknownDType { .. })),
                "{code}"
            );
        }
        let mut p = dense(v);
        p[dt(v) + 1] = 33;
        assert!(matches!(
            decode(&p),
            Err(FormatError::TooManyDims { ndim: 33, .. })
        ));
        assert!(packet_info(&p).is_err());
    }
}

fn raw_dense(version: Version, flags: u16, dtype: u8, shape: &[u32], tail: &[u8]) -> Vec<u8> {
    let mut p = b"TNSO".to_vec();
    p.push(version as u8);
    match version {
        Version::V3 => p.push(flags as u8),
        Version::V4 => p.extend_from_slice(&flags.to_le_bytes()),
    }
    p.push(dtype);
    p.push(shape.len() as u8);
    if version == Version::V4 {
        p.push(0);
    }
    for d in shape {
        p.extend_from_slice(&d.to_le_bytes());
    }
    p.extend_from_slice(tail);
    p
}

#[test]
fn overflowing_shapes() {
    for v in BOTH {
        // 2^16 four times is 2^64: wraps to 0 in unchecked u64 arithmetic.
        let p = raw_dense(v, 0, 5, &[65536; 4], &[]);
        assert!(matches!(
            decode(&p),
            Err(FormatError::TooManyElements { .. })
        ));
        let p = raw_dense(v, 0, 5, &[u32::MAX; 32], &[]);
        assert!(matches!(
            decode(&p),
            Err(FormatError::TooManyElements { .. })
        ));
        let p = raw_dense(v, 0, 14, &[1_000_000_001], &[]);
        assert!(matches!(
            decode(&p),
            Err(FormatError::TooManyElements { .. })
        ));
        // A zero dimension anywhere makes the product 0, even after huge ones.
        let p = raw_dense(v, 0, 5, &[u32::MAX, u32::MAX, u32::MAX, 0], &[]);
        assert!(decode(&p).is_ok());
        // Limits are options.
        let p = raw_dense(v, 0, 5, &[11], &[0; 11]);
        let o = DecodeOptions {
            max_elements: 10,
            ..DecodeOptions::default()
        };
        assert!(matches!(
            decode_with(&p, &o),
            Err(FormatError::TooManyElements { .. })
        ));
    }
}

#[test]
fn truncations_and_footers() {
    for v in BOTH {
        let p = dense(v);
        let h = v.header_len();
        assert!(
            decode(&p[..h + 2]).unwrap_err().is_truncation(),
            "shape truncated"
        );
        assert!(
            decode(&p[..p.len() - 1]).unwrap_err().is_truncation(),
            "body truncated"
        );
        if cfg!(feature = "xxh3") {
            let p = with_integrity(v);
            assert!(
                decode(&p[..p.len() - 8]).unwrap_err().is_truncation(),
                "footer missing"
            );
            assert!(
                decode(&p[..p.len() - 1]).unwrap_err().is_truncation(),
                "footer short"
            );
            let mut bad = p.clone();
            *bad.last_mut().unwrap() ^= 1;
            assert!(decode(&bad).unwrap_err().is_integrity());
            let mut bad = p.clone();
            bad[64] ^= 1;
            assert!(decode(&bad).unwrap_err().is_integrity(), "body corrupted");
            let o = DecodeOptions {
                verify_integrity: false,
                ..DecodeOptions::default()
            };
            assert!(decode_with(&bad, &o).is_ok());
        }
        // Trailing bytes at top level are fine.
        let mut t = dense(v);
        t.extend_from_slice(&[0xEE; 100]);
        assert!(decode(&t).is_ok());
        assert_eq!(decode_prefix(&t, &DecodeOptions::default()).unwrap().1, 76);
        assert!(matches!(
            decode_exact(&t, &DecodeOptions::default()),
            Err(FormatError::TrailingBytes { offset: 76 })
        ));
    }
}

#[test]
fn alignment_flags() {
    for v in BOTH {
        let s = v.header_len() + 4;
        for e in [64u8, 200, 255] {
            let mut tail = vec![e];
            tail.resize(200, 0);
            let p = raw_dense(v, FLAG_CUST_ALIGN, 5, &[1], &tail);
            assert_eq!(
                decode(&p).unwrap_err(),
                FormatError::BadAlignExponent { exponent: e }
            );
        }
        // Exponent 63 is legal but the body would start at 2^63.
        let p = raw_dense(v, FLAG_CUST_ALIGN, 5, &[1], &[63, 0, 0]);
        assert!(decode(&p).is_err());
        // Both flags: custom wins.
        let mut tail = vec![3u8];
        tail.resize(16 - s - 1 + s % 8, 0);
        let p = raw_dense(
            v,
            FLAG_CUST_ALIGN | FLAG_ALIGNED,
            5,
            &[1],
            &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        );
        let Packet::Dense(d) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!(d.alignment, 8);
        // Neither flag: alignment 1, body right after the shape.
        let p = raw_dense(v, 0, 5, &[2], &[7, 8]);
        let Packet::Dense(d) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!((d.alignment, d.raw().unwrap()), (1, &[7u8, 8][..]));
    }
}

#[test]
fn unknown_and_inapplicable_flags() {
    for bit in [0x0800u16, 0x1000, 0x8000] {
        let p = raw_dense(Version::V4, FLAG_ALIGNED | bit, 5, &[0], &[0; 60]);
        assert_eq!(
            decode(&p).unwrap_err(),
            FormatError::BadFlags {
                flags: FLAG_ALIGNED | bit
            }
        );
        assert!(frame(&p, &DecodeOptions::default()).is_err());
    }
    // INTEGRITY on a bundle header.
    let mut b = enc(&Item::Bundle(vec![]), Version::V4);
    b[5] |= FLAG_INTEGRITY as u8;
    assert!(matches!(decode(&b), Err(FormatError::BadFlags { .. })));
    // ALIGNED with a sparse flag, two sparse flags.
    for flags in [
        FLAG_SPARSE | FLAG_ALIGNED,
        FLAG_SPARSE | FLAG_SPARSE_CSR,
        FLAG_SPARSE_CSR | FLAG_SPARSE_CSC,
    ] {
        let p = raw_dense(Version::V4, flags, 0, &[2, 2], &[0; 40]);
        assert!(
            matches!(decode(&p), Err(FormatError::BadFlags { .. })),
            "{flags:#x}"
        );
    }
}

fn quant(version: Version, integrity: bool) -> Vec<u8> {
    let codes = [1u8, 2, 3, 4];
    let item = Item::Quantized {
        qdtype: QDType::QInt8,
        scheme: QuantScheme::PerTensor,
        axis: 0,
        group_size: 0,
        shape: vec![4],
        scales: &[1.0],
        zero_points: &[0.0],
        codes: &codes,
    };
    encode(
        &item,
        &EncodeOptions {
            version,
            integrity,
            ..EncodeOptions::default()
        },
    )
    .unwrap()
}

#[test]
fn quantized_rows() {
    for v in BOTH {
        let h = v.header_len();
        let m = h + 4;
        let fixed = if v == Version::V3 { 1 } else { 2 };
        let p = quant(v, false);
        assert!(
            decode(&p[..p.len() - 1]).unwrap_err().is_truncation(),
            "codes truncated"
        );
        let mut bad = p.clone();
        bad[5] |= FLAG_COMPRESSION as u8;
        assert!(
            matches!(decode(&bad), Err(FormatError::BadFlags { .. })),
            "compression on quantized"
        );
        let mut bad = p.clone();
        bad[m] = 9;
        assert!(
            matches!(decode(&bad), Err(FormatError::BadQuant { .. })),
            "scheme 9"
        );
        let mut bad = p.clone();
        bad[m + fixed + 4..m + fixed + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            matches!(decode(&bad), Err(FormatError::BadQuant { .. })),
            "num_scales huge"
        );
        // per-group with group_size 0.
        let mut bad = p.clone();
        bad[m] = 2;
        assert!(matches!(decode(&bad), Err(FormatError::BadQuant { .. })));
        // per-channel with the axis outside the shape (v4).
        if v == Version::V4 {
            let mut bad = p.clone();
            bad[m] = 1;
            bad[m + 1] = 5;
            assert!(matches!(decode(&bad), Err(FormatError::BadQuant { .. })));
        }
        // ndim 40 and N = 2e9.
        let mut bad = p.clone();
        bad[dt(v) + 1] = 40;
        assert!(matches!(decode(&bad), Err(FormatError::TooManyDims { .. })));
        let mut bad = p.clone();
        bad[h..h + 4].copy_from_slice(&2_000_000_000u32.to_le_bytes());
        assert!(matches!(
            decode(&bad),
            Err(FormatError::TooManyElements { .. })
        ));
        if cfg!(feature = "xxh3") {
            let p = quant(v, true);
            let mut bad = p.clone();
            bad[m + fixed + 8] ^= 1; // a scale byte: protected in v4 only
            match v {
                Version::V3 => assert!(decode(&bad).is_ok()),
                Version::V4 => assert!(decode(&bad).unwrap_err().is_integrity()),
            }
        }
    }
}

fn bundle_of(leaf: &[u8], version: Version, key: &[u8]) -> Vec<u8> {
    let mut p = b"TNSO".to_vec();
    p.push(version as u8);
    match version {
        Version::V3 => p.extend_from_slice(&[0x10, 0, 1]),
        Version::V4 => p.extend_from_slice(&[0x10, 0, 0, 1, 0]),
    }
    p.extend_from_slice(&(key.len() as u32).to_le_bytes());
    p.extend_from_slice(key);
    p.extend_from_slice(&(leaf.len() as u32).to_le_bytes());
    p.extend_from_slice(leaf);
    p
}

#[test]
fn bundle_rows() {
    for v in BOTH {
        let leaf = dense(v);
        let good = bundle_of(&leaf, v, b"a");
        assert!(decode(&good).is_ok());
        for cut in v.header_len()..good.len() {
            assert!(
                decode(&good[..cut]).unwrap_err().is_truncation(),
                "cut {cut}"
            );
        }
        // vlen beyond the end.
        let mut bad = good.clone();
        let vl = v.header_len() + 5;
        bad[vl..vl + 4].copy_from_slice(&(leaf.len() as u32 + 1).to_le_bytes());
        assert!(decode(&bad).unwrap_err().is_truncation());
        // vlen shorter than the packet, and longer (trailing bytes in the slice).
        let mut short = bundle_of(&leaf[..leaf.len() - 1], v, b"a");
        assert!(decode(&short).is_err());
        short = bundle_of(&[&leaf[..], &[0]].concat(), v, b"a");
        assert!(matches!(
            decode(&short),
            Err(FormatError::TrailingBytes { .. })
        ));
        // klen lies.
        let mut bad = good.clone();
        bad[v.header_len()..v.header_len() + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&bad).unwrap_err().is_truncation());
        // key not UTF-8.
        let bad = bundle_of(&leaf, v, &[0xff, 0xfe]);
        assert_eq!(
            decode(&bad).unwrap_err(),
            FormatError::BadKey {
                offset: v.header_len() + 4
            }
        );
        // count larger than the entries present.
        let mut bad = good.clone();
        bad[dt(v) + 1] = 2;
        assert!(decode(&bad).unwrap_err().is_truncation());
        // dtype code on a bundle header.
        let mut bad = good.clone();
        bad[dt(v)] = 1;
        assert!(decode(&bad).is_err());
        // Duplicate keys are kept in wire order.
        let a = enc(
            &Item::Dense {
                dtype: DType::UInt8,
                shape: vec![1],
                body: BodySrc::Bytes(&[1]),
            },
            v,
        );
        let b = enc(
            &Item::Dense {
                dtype: DType::UInt8,
                shape: vec![1],
                body: BodySrc::Bytes(&[2]),
            },
            v,
        );
        let mut dup = bundle_of(&a, v, b"k");
        dup[dt(v) + 1] = 2;
        dup.extend_from_slice(&1u32.to_le_bytes());
        dup.push(b'k');
        dup.extend_from_slice(&(b.len() as u32).to_le_bytes());
        dup.extend_from_slice(&b);
        let Packet::Bundle(e) = decode(&dup).unwrap() else {
            panic!()
        };
        assert_eq!(e.len(), 2);
        // Reserved byte set (no IPC flag) is accepted in v4.
        if v == Version::V4 {
            let mut r = dense(v);
            r[9] = 7;
            assert!(decode(&r).is_ok());
        }
    }
}

/// `levels` nested bundles, each holding the next under the key "", built front to back in O(n).
fn nested_bundles(levels: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(levels * 18 + 10);
    for i in 0..levels {
        p.extend_from_slice(&[b'T', b'N', b'S', b'O', 4, 0x10, 0, 0, 1, 0]);
        p.extend_from_slice(&0u32.to_le_bytes());
        let inner = (levels - i - 1) * 18 + 10;
        p.extend_from_slice(&(inner as u32).to_le_bytes());
    }
    p.extend_from_slice(&[b'T', b'N', b'S', b'O', 4, 0x10, 0, 0, 0, 0]);
    p
}

#[test]
fn nesting_depth() {
    assert!(
        decode(&nested_bundles(63)).is_ok(),
        "64 container levels decode"
    );
    assert_eq!(
        decode(&nested_bundles(64)).unwrap_err(),
        FormatError::NestingTooDeep { limit: 64 }
    );
    assert!(matches!(
        decode(&nested_bundles(100)),
        Err(FormatError::NestingTooDeep { .. })
    ));
    let deep = nested_bundles(100_000);
    assert!(deep.len() > 1_600_000);
    assert!(matches!(
        decode(&deep),
        Err(FormatError::NestingTooDeep { .. })
    ));
    assert!(
        matches!(frame(&deep, &DecodeOptions::default()), Ok(Frame::Complete(n)) if n == deep.len())
    );
}

fn sparse_packet(
    format: SparseFormat,
    shape: [u64; 2],
    comps: [(DType, Vec<u8>); 3],
    version: Version,
) -> Vec<u8> {
    let items = comps.map(|(dtype, body)| (dtype, body));
    let mk = |i: usize| {
        let (d, ref b) = items[i];
        Item::Dense {
            dtype: d,
            shape: vec![(b.len() / d.itemsize()) as u64],
            body: BodySrc::Bytes(b),
        }
    };
    let item = Item::Sparse {
        format,
        shape,
        components: Box::new([mk(0), mk(1), mk(2)]),
    };
    enc(&item, version)
}

fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn sparse_rows() {
    use SparseFormat::*;
    let data = f32_vec(2);
    for v in BOTH {
        let csr = |indptr: &[i32], indices: &[i32], shape| {
            sparse_packet(
                Csr,
                shape,
                [
                    (DType::Float32, data.clone()),
                    (DType::Int32, i32s(indices)),
                    (DType::Int32, i32s(indptr)),
                ],
                v,
            )
        };
        assert!(decode(&csr(&[0, 1, 2], &[1, 0], [2, 2])).is_ok());
        let bad = |p: Vec<u8>, what: &str| {
            assert!(
                matches!(decode(&p), Err(FormatError::BadSparse { .. })),
                "{what}"
            )
        };
        bad(csr(&[0, 2, 1], &[1, 0], [2, 2]), "non-monotonic indptr");
        bad(csr(&[1, 1, 2], &[1, 0], [2, 2]), "indptr not from 0");
        bad(csr(&[0, 1, 3], &[1, 0], [2, 2]), "indptr end != nnz");
        bad(csr(&[0, 1], &[1, 0], [2, 2]), "indptr too short");
        bad(csr(&[0, 1, 2], &[2, 0], [2, 2]), "index out of range");
        bad(csr(&[0, 1, 2], &[-1, 0], [2, 2]), "negative index");
        bad(csr(&[0, 1, 2], &[1], [2, 2]), "indices shorter than data");
        // Float index arrays.
        let p = sparse_packet(
            Csr,
            [2, 2],
            [
                (DType::Float32, data.clone()),
                (DType::Float32, f32_vec(2)),
                (DType::Int32, i32s(&[0, 1, 2])),
            ],
            v,
        );
        bad(p, "float indices");
        // CSC uses cols as the major dimension.
        let p = sparse_packet(
            Csc,
            [3, 2],
            [
                (DType::Float32, data.clone()),
                (
                    DType::Int64,
                    [2i64, 0].iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
                (DType::UInt32, i32s(&[0, 1, 2])),
            ],
            v,
        );
        assert!(decode(&p).is_ok());
        // COO out of range.
        let coo = |row: &[i32], col: &[i32]| {
            sparse_packet(
                Coo,
                [2, 3],
                [
                    (DType::Float32, data.clone()),
                    (DType::Int32, i32s(row)),
                    (DType::Int32, i32s(col)),
                ],
                v,
            )
        };
        assert!(decode(&coo(&[0, 1], &[2, 0])).is_ok());
        bad(coo(&[2, 1], &[2, 0]), "row out of range");
        bad(coo(&[0, 1], &[3, 0]), "col out of range");
        bad(coo(&[0], &[3, 0]), "row length");
        // Huge logical shape is fine (not subject to MAX_ELEMENTS).
        let p = sparse_packet(
            Coo,
            [100_000, 100_000],
            [
                (DType::Float32, f32_vec(1)),
                (DType::Int32, i32s(&[99_999])),
                (DType::Int32, i32s(&[5])),
            ],
            v,
        );
        assert!(decode(&p).is_ok());
        // 3-D logical shape.
        let mut p = csr(&[0, 1, 2], &[1, 0], [2, 2]);
        p[dt(v) + 1] = 3;
        bad(p, "3-d shape");
        // Two components only.
        let p = csr(&[0, 1, 2], &[1, 0], [2, 2]);
        let h = v.header_len() + 8;
        let n0 = u32::from_le_bytes(p[h..h + 4].try_into().unwrap()) as usize;
        let n1 = u32::from_le_bytes(p[h + 4 + n0..h + 8 + n0].try_into().unwrap()) as usize;
        assert!(decode(&p[..h + 8 + n0 + n1]).unwrap_err().is_truncation());
        // Component that is not dense (a bundle) and a 2-D component.
        let empty = enc(&Item::Bundle(vec![]), v);
        let mut q = p[..h].to_vec();
        q.extend_from_slice(&(empty.len() as u32).to_le_bytes());
        q.extend_from_slice(&empty);
        q.extend_from_slice(&p[h + 4 + n0..]);
        bad(q, "bundle component");
    }
}

#[test]
fn string_rows() {
    let good = encode(
        &Item::Strings {
            offsets: &[0, 2, 3],
            payload: b"hiy",
        },
        &EncodeOptions::default(),
    )
    .unwrap();
    assert!(decode(&good).is_ok());
    let mut bad = good.clone();
    bad[64] = 1;
    assert!(
        matches!(decode(&bad), Err(FormatError::Malformed { .. })),
        "offsets[0] != 0"
    );
    let mut bad = good.clone();
    bad[72] = 4;
    assert!(
        matches!(decode(&bad), Err(FormatError::Malformed { .. })),
        "decreasing"
    );
    let mut bad = good.clone();
    bad[80] = 9;
    assert!(
        decode(&bad).unwrap_err().is_truncation(),
        "payload shorter than offsets[C]"
    );
    let mut bad = good.clone();
    bad[88] = 0xff;
    assert_eq!(decode(&bad).unwrap_err(), FormatError::BadUtf8 { index: 0 });
    let mut bad = good.clone();
    bad[7] = 5;
    assert!(decode(&bad).is_err(), "dtype other than 20");
    let mut bad = good.clone();
    bad[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode(&bad).is_err(), "count lies");
}

#[test]
fn ragged_and_ipc_are_rejected() {
    let mut r = encode(
        &Item::Strings {
            offsets: &[0, 2],
            payload: b"hi",
        },
        &EncodeOptions::default(),
    )
    .unwrap();
    r[5] = 0x01;
    r[6] = 0x02;
    assert!(matches!(decode(&r), Err(FormatError::Unsupported { .. })));
    let mut ipc = vec![b'T', b'N', b'S', b'O', 4, 0x00, 0x04, 0, 0, 1];
    ipc.resize(106, 0);
    assert!(matches!(decode(&ipc), Err(FormatError::Unsupported { .. })));
    assert_eq!(packet_info(&ipc).unwrap().kind, PacketKind::GpuIpcRef);
}

#[cfg(feature = "lz4")]
#[test]
fn lz4_rows() {
    for v in BOTH {
        let garbage = raw_dense(v, FLAG_ALIGNED | FLAG_COMPRESSION, 5, &[4], &[]);
        let mut g = garbage.clone();
        g.resize(64, 0);
        g.extend_from_slice(&[1, 2, 3, 4, 5]);
        match (v, decode(&g)) {
            (Version::V3, Ok(Packet::Dense(d))) => {
                assert!(d.body.to_vec().is_err(), "raw block garbage")
            }
            (Version::V4, Err(FormatError::Lz4 { .. })) => {}
            other => panic!("{other:?}"),
        }
        // Empty compressed body: claims 4 bytes from nothing.
        let mut e = garbage.clone();
        e.resize(64, 0);
        assert!(decode(&e)
            .and_then(|p| match p {
                Packet::Dense(d) => d.body.to_vec().map(|_| ()),
                _ => Ok(()),
            })
            .is_err());
        // Decompressed size smaller / larger than N * itemsize.
        for n in [3usize, 5] {
            let frame = tenso_format::lz4::compress_frame(&vec![7u8; n]);
            let mut p = garbage.clone();
            p.resize(64, 0);
            p.extend_from_slice(&frame);
            let Packet::Dense(d) = decode(&p).unwrap() else {
                panic!()
            };
            assert!(
                matches!(d.body.to_vec(), Err(FormatError::DecompressedSize { .. })),
                "{n}"
            );
        }
        // A bomb: 100 MB of zeros compresses to ~400 KB; the shape says 10 bytes.
        let bomb = tenso_format::lz4::compress_frame(&vec![0u8; 100 << 20]);
        let mut p = raw_dense(v, FLAG_ALIGNED | FLAG_COMPRESSION, 5, &[10], &[]);
        p.resize(64, 0);
        p.extend_from_slice(&bomb);
        let Packet::Dense(d) = decode(&p).unwrap() else {
            panic!()
        };
        assert!(matches!(
            d.body.to_vec(),
            Err(FormatError::DecompressedSize { .. })
        ));
        // The other way round: a tiny body whose shape promises 8 GB is refused before anyone allocates.
        let mut p = raw_dense(v, FLAG_ALIGNED | FLAG_COMPRESSION, 3, &[1_000_000_000], &[]);
        p.resize(64, 0);
        p.extend_from_slice(&tenso_format::lz4::compress_frame(&[0; 16]));
        assert!(matches!(
            decode(&p),
            Err(FormatError::DecompressedSize { .. })
        ));
        // Integrity is checked on the compressed bytes, before decompression.
        let item = Item::Dense {
            dtype: DType::UInt8,
            shape: vec![100],
            body: BodySrc::Bytes(&[3; 100]),
        };
        let o = EncodeOptions {
            version: v,
            integrity: true,
            compress: true,
            ..EncodeOptions::default()
        };
        let mut p = encode(&item, &o).unwrap();
        assert!(decode(&p).is_ok());
        p[70] ^= 0x55;
        assert!(decode(&p).unwrap_err().is_integrity());
        // A compressed packet cannot be framed.
        assert!(matches!(
            frame(&p, &DecodeOptions::default()),
            Err(FormatError::Unframeable { .. })
        ));
    }
}

#[cfg(not(feature = "lz4"))]
#[test]
fn compressed_packets_need_the_feature() {
    let mut p = raw_dense(Version::V4, FLAG_ALIGNED | FLAG_COMPRESSION, 5, &[4], &[]);
    p.resize(80, 0);
    assert!(matches!(decode(&p), Err(FormatError::Unsupported { .. })));
}

#[cfg(not(feature = "xxh3"))]
#[test]
fn integrity_packets_need_the_feature() {
    let mut p = raw_dense(Version::V4, FLAG_ALIGNED | FLAG_INTEGRITY, 5, &[1], &[]);
    p.resize(73, 0);
    assert!(matches!(decode(&p), Err(FormatError::Unsupported { .. })));
    let o = DecodeOptions {
        verify_integrity: false,
        ..DecodeOptions::default()
    };
    assert!(decode_with(&p, &o).is_ok());
    let item = Item::Dense {
        dtype: DType::UInt8,
        shape: vec![1],
        body: BodySrc::Bytes(&[1]),
    };
    let o = EncodeOptions {
        integrity: true,
        ..EncodeOptions::default()
    };
    assert!(matches!(
        encode(&item, &o),
        Err(FormatError::Unsupported { .. })
    ));
}

#[test]
fn every_prefix_and_byte_flip_is_handled() {
    // A cheap in-process fuzz: flip each byte of a few packets and decode/frame/inspect without panicking.
    let samples = [
        dense(Version::V3),
        dense(Version::V4),
        quant(Version::V4, cfg!(feature = "xxh3")),
        quant(Version::V3, false),
        nested_bundles(3),
    ];
    for s in samples {
        for i in 0..s.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut m = s.clone();
                m[i] ^= x;
                let _ = decode(&m);
                let _ = packet_info(&m);
                let _ = frame(&m, &DecodeOptions::default());
            }
        }
    }
}

#[test]
fn depth_option_cannot_overflow_the_stack() {
    let o = DecodeOptions {
        max_depth: usize::MAX,
        ..DecodeOptions::default()
    };
    let deep = nested_bundles(100_000);
    let handle = std::thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(move || decode_with(&deep, &o).map(|_| ()))
        .unwrap();
    assert!(matches!(
        handle.join().unwrap(),
        Err(FormatError::NestingTooDeep { limit: 128 })
    ));
}
