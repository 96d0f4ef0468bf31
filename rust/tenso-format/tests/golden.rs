//! Conformance against the fixture corpus in `tests/golden/{v3-0.19.4,v4-0.24.0}` (packets written by the
//! reference implementations): every packet decodes, its structure matches the `layout` section of its
//! JSON, and re-encoding the decoded value with the recorded options gives the same bytes (compressed
//! packets: the same decoded values; the v3 chunked-footer case: the same bytes except the footer).

use serde_json::Value;
use std::path::{Path, PathBuf};
use tenso_format::*;

const FULL: bool = cfg!(all(feature = "lz4", feature = "xxh3"));

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden")
}

fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("u64"))
        .collect()
}

/// Checks a decoded packet against its layout description; `start` is the packet's first byte.
fn check_layout(p: &Packet<'_>, layout: &Value, start: &[u8], ctx: &str) {
    assert_eq!(
        p.kind_name(),
        layout["kind"].as_str().unwrap(),
        "{ctx}: kind"
    );
    match p {
        Packet::Dense(d) => {
            assert_eq!(
                d.dtype.name(),
                layout["dtype"].as_str().unwrap(),
                "{ctx}: dtype"
            );
            assert_eq!(
                d.dtype.code() as u64,
                layout["dtype_code"].as_u64().unwrap(),
                "{ctx}"
            );
            assert_eq!(d.shape, u64s(&layout["shape"]), "{ctx}: shape");
            assert_eq!(
                d.alignment as u64,
                layout["alignment"].as_u64().unwrap(),
                "{ctx}: alignment"
            );
            let body = match d.body {
                Body::Raw(b) => b,
                Body::Lz4Frame { frame, .. } => frame,
                Body::Lz4Block { block, .. } => block,
            };
            assert_eq!(
                offset_in(start, body) as u64,
                layout["body_offset"].as_u64().unwrap(),
                "{ctx}: body offset"
            );
            assert_eq!(
                body.len() as u64,
                layout["body_len"].as_u64().unwrap(),
                "{ctx}: body len"
            );
            assert_eq!(
                d.body.is_compressed(),
                layout.get("compression").is_some(),
                "{ctx}: compression"
            );
        }
        Packet::Bundle(entries) => {
            let want = layout["entries"].as_array().unwrap();
            assert_eq!(entries.len(), want.len(), "{ctx}: entry count");
            for ((k, v), w) in entries.iter().zip(want) {
                assert_eq!(*k, w[0].as_str().unwrap(), "{ctx}: key");
                let sub = &start[w[1]["offset"].as_u64().unwrap() as usize..];
                check_layout(v, &w[1], sub, &format!("{ctx}/{k}"));
            }
        }
        Packet::Sparse(s) => {
            assert_eq!(
                s.format.name(),
                layout["format"].as_str().unwrap(),
                "{ctx}: format"
            );
            assert_eq!(s.shape.to_vec(), u64s(&layout["shape"]), "{ctx}: shape");
            for (i, (c, w)) in s
                .components
                .iter()
                .zip(layout["components"].as_array().unwrap())
                .enumerate()
            {
                let sub = &start[w["offset"].as_u64().unwrap() as usize..];
                check_layout(
                    &Packet::Dense(c.clone()),
                    w,
                    sub,
                    &format!("{ctx}/component{i}"),
                );
            }
        }
        Packet::Quantized(q) => {
            assert_eq!(
                q.qdtype.code() as u64,
                layout["dtype_code"].as_u64().unwrap(),
                "{ctx}"
            );
            assert_eq!(q.shape, u64s(&layout["shape"]), "{ctx}: shape");
            assert_eq!(
                q.scheme.code() as u64,
                layout["scheme"].as_u64().unwrap(),
                "{ctx}: scheme"
            );
            assert_eq!(
                q.group_size as u64,
                layout["group_size"].as_u64().unwrap(),
                "{ctx}: group size"
            );
            assert_eq!(
                q.scales.len() as u64,
                layout["num_scales"].as_u64().unwrap(),
                "{ctx}: num_scales"
            );
            assert_eq!(q.zero_points.len(), q.scales.len());
            match layout["axis"].as_u64() {
                Some(a) => assert_eq!(q.axis as u64, a, "{ctx}: axis"),
                None => assert_eq!(q.version, Version::V3, "{ctx}: only v3 has no axis"),
            }
            assert_eq!(
                offset_in(start, q.codes) as u64,
                layout["body_offset"].as_u64().unwrap(),
                "{ctx}"
            );
            assert_eq!(
                q.codes.len() as u64,
                layout["body_len"].as_u64().unwrap(),
                "{ctx}"
            );
        }
        Packet::Strings(s) => {
            assert_eq!(vec![s.len() as u64], u64s(&layout["shape"]), "{ctx}: shape");
            assert_eq!(
                offset_in(start, s.offsets_bytes) as u64,
                layout["body_offset"].as_u64().unwrap(),
                "{ctx}"
            );
            assert_eq!(
                (s.offsets_bytes.len() + s.payload.len()) as u64,
                layout["body_len"].as_u64().unwrap(),
                "{ctx}: body len"
            );
        }
    }
}

/// Every dense body of the tree, uncompressed, in depth-first order.
fn bodies(p: &Packet<'_>, out: &mut Vec<Vec<u8>>) {
    match p {
        Packet::Dense(d) => out.push(d.body.to_vec().expect("body decodes")),
        Packet::Bundle(e) => e.iter().for_each(|(_, v)| bodies(v, out)),
        Packet::Sparse(s) => s
            .components
            .iter()
            .for_each(|c| out.push(c.body.to_vec().unwrap())),
        _ => {}
    }
}

fn dense_item<'a>(d: &Dense<'_>, arena: &'a [Vec<u8>], idx: &mut usize) -> Item<'a> {
    let body = BodySrc::Bytes(&arena[*idx]);
    *idx += 1;
    Item::Dense {
        dtype: d.dtype,
        shape: d.shape.clone(),
        body,
    }
}

/// The item that re-encodes `p`, with bodies taken from `arena` (see [`bodies`]).
fn to_item<'a>(p: &'a Packet<'a>, arena: &'a [Vec<u8>], idx: &mut usize) -> Item<'a> {
    match p {
        Packet::Dense(d) => dense_item(d, arena, idx),
        Packet::Bundle(e) => Item::Bundle(
            e.iter()
                .map(|(k, v)| (*k, to_item(v, arena, idx)))
                .collect(),
        ),
        Packet::Sparse(s) => {
            let [a, b, c] = &s.components;
            let components = Box::new([
                dense_item(a, arena, idx),
                dense_item(b, arena, idx),
                dense_item(c, arena, idx),
            ]);
            Item::Sparse {
                format: s.format,
                shape: s.shape,
                components,
            }
        }
        Packet::Quantized(q) => Item::Quantized {
            qdtype: q.qdtype,
            scheme: q.scheme,
            axis: q.axis,
            group_size: q.group_size,
            shape: q.shape.clone(),
            scales: &q.scales,
            zero_points: &q.zero_points,
            codes: q.codes,
        },
        Packet::Strings(s) => Item::Strings {
            offsets: &s.offsets,
            payload: s.payload,
        },
    }
}

/// A printable form of the decoded values (bodies uncompressed), for comparing compressed cases.
fn describe(p: &Packet<'_>) -> String {
    match p {
        Packet::Dense(d) => format!(
            "{}{:?}={:?}",
            d.dtype.name(),
            d.shape,
            d.body.to_vec().unwrap()
        ),
        Packet::Bundle(e) => {
            let parts: Vec<String> = e
                .iter()
                .map(|(k, v)| format!("{k:?}:{}", describe(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        other => format!("{other:?}"),
    }
}

struct Case {
    version: Version,
    name: String,
    bytes: Vec<u8>,
    json: Value,
}

fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for (folder, version) in [("v3-0.19.4", Version::V3), ("v4-0.24.0", Version::V4)] {
        let dir = corpus_dir().join(folder);
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "tenso"))
            .collect();
        names.sort();
        for p in names {
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            let json: Value =
                serde_json::from_slice(&std::fs::read(p.with_extension("json")).unwrap()).unwrap();
            out.push(Case {
                version,
                name,
                bytes: std::fs::read(&p).unwrap(),
                json,
            });
        }
    }
    out
}

#[test]
fn corpus_decodes_matches_layout_and_reencodes() {
    let cases = cases();
    let (mut v3, mut v4, mut exact, mut by_value, mut skipped) = (0, 0, 0, 0, 0);
    for c in &cases {
        let ctx = format!("{:?}/{}", c.version, c.name);
        match c.version {
            Version::V3 => v3 += 1,
            Version::V4 => v4 += 1,
        }
        let packet = match decode(&c.bytes) {
            Ok(p) => p,
            // Built without lz4/xxh3: compressed and integrity packets are refused cleanly.
            Err(FormatError::Unsupported { .. }) if !FULL => {
                skipped += 1;
                continue;
            }
            Err(e) => panic!("{ctx}: decode failed: {e}"),
        };
        check_layout(&packet, &c.json["layout"], &c.bytes, &ctx);
        assert_eq!(
            c.json["layout"]["end"].as_u64().unwrap() as usize,
            c.bytes.len(),
            "{ctx}: end"
        );

        let o = &c.json["options"];
        let opts = EncodeOptions {
            version: c.version,
            alignment: o["alignment"].as_u64().unwrap() as usize,
            integrity: o["check_integrity"].as_bool().unwrap(),
            compress: o["compress"].as_bool().unwrap(),
            ..EncodeOptions::default()
        };
        let mut arena = Vec::new();
        bodies(&packet, &mut arena);
        let item = to_item(&packet, &arena, &mut 0);
        let ours = encode(&item, &opts).unwrap_or_else(|e| panic!("{ctx}: encode failed: {e}"));
        if opts.compress {
            let back = decode(&ours).unwrap();
            assert_eq!(
                describe(&back),
                describe(&packet),
                "{ctx}: compressed round trip"
            );
            by_value += 1;
        } else if c.version == Version::V3 && c.name == "large_uint8_1100000_integrity" {
            // 0.19.4 wrote the chunked footer (FORMAT.md §5.3); we write the plain one.
            let n = c.bytes.len();
            assert_eq!(ours.len(), n, "{ctx}");
            assert_eq!(
                ours[..n - 8],
                c.bytes[..n - 8],
                "{ctx}: everything but the footer"
            );
            assert_ne!(
                ours[n - 8..],
                c.bytes[n - 8..],
                "{ctx}: the footer is plain, not chunked"
            );
            decode(&ours).unwrap();
            by_value += 1;
        } else {
            assert!(ours == c.bytes, "{ctx}: re-encoded bytes differ");
            exact += 1;
        }
        // The packet frames to its exact length unless it is a top-level compressed dense packet.
        let top_compressed = matches!(&packet, Packet::Dense(d) if d.body.is_compressed());
        match frame(&c.bytes, &DecodeOptions::default()) {
            Ok(Frame::Complete(n)) => assert_eq!(n, c.bytes.len(), "{ctx}: frame"),
            Ok(Frame::Need(n)) => panic!("{ctx}: frame asks for {n} of a complete packet"),
            Err(e) => assert!(
                top_compressed && matches!(e, FormatError::Unframeable { .. }),
                "{ctx}: {e}"
            ),
        }
        let info = packet_info(&c.bytes).unwrap();
        assert_eq!(
            info.flags as u64,
            c.json["layout"]["flags"].as_u64().unwrap(),
            "{ctx}"
        );
    }
    assert_eq!((v3, v4), (55, 58), "corpus size");
    eprintln!(
        "golden: {v3} v3 + {v4} v4 cases; {exact} byte-identical, {by_value} compared by value, \
         {skipped} skipped (features)"
    );
    if FULL {
        assert_eq!(skipped, 0);
    }
}

#[test]
fn corpus_frames_incrementally() {
    for c in cases() {
        let opts = DecodeOptions::default();
        let mut have = 0usize;
        let mut steps = 0;
        loop {
            match frame(&c.bytes[..have], &opts) {
                Ok(Frame::Need(n)) => {
                    assert!(
                        n > have && n <= c.bytes.len(),
                        "{}: need {n} with {have}",
                        c.name
                    );
                    have = n;
                }
                Ok(Frame::Complete(n)) => {
                    assert_eq!(n, c.bytes.len(), "{}", c.name);
                    break;
                }
                Err(FormatError::Unframeable { .. }) => break,
                Err(e) => panic!("{}: {e}", c.name),
            }
            steps += 1;
            assert!(steps < 10_000);
        }
    }
}

#[test]
fn corpus_truncations_are_clean_errors() {
    for c in cases() {
        if c.bytes.len() > 100_000 {
            continue;
        }
        let compressed = c.json["options"]["compress"].as_bool().unwrap();
        for cut in 0..c.bytes.len() {
            let r = decode(&c.bytes[..cut]);
            if !compressed {
                assert!(r.is_err(), "{}: truncated to {cut} still decodes", c.name);
            }
        }
    }
}

/// `check_padding` against the decoder itself: every fixture is canonical, and in every small fixture, a byte is
/// reported as non-zero padding after it is changed exactly when the decoder ignores it (the packet decodes to the
/// same value as before the change).
#[test]
fn corpus_padding_is_canonical_and_exactly_the_ignored_bytes() {
    let opts = DecodeOptions::default();
    let mut checked = 0;
    for c in cases() {
        let report = check_padding(&c.bytes, &opts).unwrap_or_else(|e| panic!("{}: {e}", c.name));
        assert!(
            report.nonzero.is_empty(),
            "{}: {:?}",
            c.name,
            report.nonzero
        );
        let compressed = c.json["options"]["compress"].as_bool().unwrap();
        assert!(
            report.end == Some(c.bytes.len()) || (compressed && report.end.is_none()),
            "{}: end {:?} of {}",
            c.name,
            report.end,
            c.bytes.len()
        );
        if c.bytes.len() > 2048 {
            continue;
        }
        let value = decode(&c.bytes).unwrap();
        let mut bytes = c.bytes.clone();
        for at in 0..bytes.len() {
            let old = bytes[at];
            bytes[at] = if old == 0 { 0x5a } else { 0 };
            let ignored = decode(&bytes).is_ok_and(|v| v == value);
            let reported = check_padding(&bytes, &opts).is_ok_and(|r| {
                r.nonzero
                    .iter()
                    .any(|n| n.first_nonzero == at && n.nonzero == 1)
            });
            // A byte that was zero and is reported now was padding; a non-zero byte set to zero never is.
            assert_eq!(
                ignored,
                reported && old == 0,
                "{} ({:?}): byte {at} (was {old:#x}): ignored by the decoder {ignored}, reported {reported}",
                c.name,
                c.version
            );
            bytes[at] = old;
            checked += 1;
        }
    }
    assert!(checked > 10_000, "only {checked} byte positions checked");
}
