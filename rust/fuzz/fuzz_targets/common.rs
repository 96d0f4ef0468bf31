//! Shared checks: decode a packet every way the crate offers and walk the result.
#![allow(
    dead_code,
    reason = "each target uses a different subset of these helpers"
)]

use tenso_format::{decode, decode_with, packet_info, Body, DecodeOptions, Packet};

/// Decodes `data`, inspects it and decompresses small compressed bodies; none of it may panic.
pub fn exercise(data: &[u8]) {
    let _ = packet_info(data);
    let strict = decode(data);
    let lax = decode_with(
        data,
        &DecodeOptions {
            verify_integrity: false,
            ..DecodeOptions::default()
        },
    );
    if strict.is_ok() {
        assert!(
            lax.is_ok(),
            "skipping integrity checks cannot make a valid packet invalid"
        );
    }
    if let Ok(p) = strict {
        walk(&p);
    }
}

fn walk(p: &Packet<'_>) {
    match p {
        Packet::Dense(d) => {
            assert_eq!(d.body.decoded_len(), d.nbytes());
            if let Body::Raw(b) = d.body {
                assert_eq!(b.len(), d.nbytes());
            } else if d.nbytes() <= 1 << 24 {
                let _ = d.body.to_vec();
            }
        }
        Packet::Bundle(entries) => entries.iter().for_each(|(_, v)| walk(v)),
        Packet::Sparse(s) => s
            .components
            .iter()
            .for_each(|c| assert!(!c.body.is_compressed())),
        Packet::Quantized(q) => {
            assert_eq!(q.scales.len(), q.zero_points.len());
            assert_eq!(q.codes.len(), q.qdtype.packed_len(q.num_elements()));
            if q.num_elements() <= 1 << 20 {
                let mut out = vec![0f32; q.num_elements() as usize];
                tenso_format::quant::dequantize(
                    q.codes,
                    &q.shape,
                    q.qdtype,
                    q.scheme,
                    q.group_size,
                    usize::from(q.axis),
                    &q.scales,
                    &q.zero_points,
                    &mut out,
                )
                .expect("a decoded quantized packet dequantizes");
            }
        }
        Packet::Strings(s) => {
            for i in 0..s.len() {
                assert!(s.get(i).is_some());
            }
        }
    }
}

/// Rewrites the header of `data` (when long enough) to a valid magic and version 3 or 4.
pub fn with_header(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 10 {
        return None;
    }
    let mut v = data.to_vec();
    v[..4].copy_from_slice(b"TNSO");
    v[4] = if v[4] & 1 == 0 { 4 } else { 3 };
    Some(v)
}

/// Offset of the flags, dtype and ndim bytes for the version byte already in `v`.
pub fn offsets(v: &[u8]) -> (usize, usize, usize) {
    if v[4] == 3 {
        (5, 6, 7)
    } else {
        (5, 7, 8)
    }
}

/// Writes `flags` in the version's width.
pub fn set_flags(v: &mut [u8], flags: u16) {
    if v[4] == 3 {
        v[5] = flags as u8;
    } else {
        v[5..7].copy_from_slice(&flags.to_le_bytes());
    }
}
