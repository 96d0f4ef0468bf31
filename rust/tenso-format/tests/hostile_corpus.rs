//! The shared hostile corpus (`tests/hostile/`): every case must be refused with a clean error of the
//! expected class (integrity cases with an integrity error), the valid references must decode, and
//! framing and decoding must agree on every case and on byte-flipped variants of it. This doubles as a
//! stable-toolchain smoke run of the properties checked by the cargo-fuzz targets in `rust/fuzz`.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tenso_format::*;

const FULL: bool = cfg!(all(feature = "lz4", feature = "xxh3"));

/// Cases whose expected class cannot be produced by any decoder, with the reason.
/// `quant_integrity_meta_flip`: the generator flips byte 20, which is `num_scales` (1 → 17), not a
/// scale (those start at byte 24); the metadata then no longer matches the scheme, so the packet is
/// refused as malformed before a footer position even exists.
fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/hostile")
}

fn manifest() -> Option<Value> {
    let text = std::fs::read(dir().join("manifest.json")).ok()?;
    Some(serde_json::from_slice(&text).expect("manifest.json parses"))
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join("corpus").join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Decodes fully, decompressing bodies and checking bool bytes, as the Python layer does.
fn decode_all(buf: &[u8]) -> Result<(), FormatError> {
    fn walk(p: &Packet<'_>) -> Result<(), FormatError> {
        match p {
            Packet::Dense(d) => {
                let body = d.body.to_vec()?;
                if d.dtype == DType::Bool {
                    check_bool_body(&body)?;
                }
                Ok(())
            }
            Packet::Bundle(e) => e.iter().try_for_each(|(_, v)| walk(v)),
            _ => Ok(()),
        }
    }
    walk(&decode(buf)?)
}

#[test]
fn hostile_cases_are_refused() {
    let Some(m) = manifest() else {
        eprintln!("tests/hostile/manifest.json not present; skipped");
        return;
    };
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in m["cases"].as_array().unwrap() {
        let name = case["file"].as_str().unwrap();
        let bytes = read(name);
        let r = decode_all(&bytes);
        let expected = case["expected"].as_str().unwrap();
        match r {
            Ok(()) => failures.push(format!("{name} ({}) decodes", case["description"])),
            Err(FormatError::Unsupported { .. }) if !FULL => {}
            Err(e) if expected == "TensoIntegrityError" => {
                assert!(e.is_integrity(), "{name}: {e}")
            }
            Err(e) => assert!(
                !e.is_integrity(),
                "{name}: integrity error where a format error is expected: {e}"
            ),
        }
        checked += 1;
    }
    assert!(failures.is_empty(), "{failures:#?}");
    for (label, file) in m["valid"].as_object().unwrap() {
        let bytes = read(file.as_str().unwrap());
        match decode_all(&bytes) {
            Ok(()) => {}
            Err(FormatError::Unsupported { .. }) if !FULL => {}
            Err(e) => panic!("valid case {label} fails: {e}"),
        }
    }
    eprintln!("hostile: {checked} cases refused");
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let roots = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/v3-0.19.4"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/v4-0.24.0"),
        dir().join("corpus"),
    ];
    for r in roots {
        let Ok(rd) = std::fs::read_dir(&r) else {
            continue;
        };
        let mut files: Vec<PathBuf> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "tenso"))
            .collect();
        files.sort();
        for f in files {
            let b = std::fs::read(&f).unwrap();
            if b.len() <= 20_000 {
                out.push(b);
            }
        }
    }
    out
}

/// The `fuzz_frame` property: driven from zero bytes, `frame` only asks for more than it has, never for
/// more than the packet turns out to need, and a framed packet that decodes ends where framing said.
fn frame_property(data: &[u8]) {
    let opts = DecodeOptions::default();
    let mut have = 0usize;
    for _ in 0..100_000 {
        match frame(&data[..have], &opts) {
            Ok(Frame::Need(n)) => {
                assert!(n > have, "asked for {n} with {have}");
                if n > data.len() {
                    assert!(
                        !matches!(frame(data, &opts), Ok(Frame::Complete(_))),
                        "need {n}, yet {} frame",
                        data.len()
                    );
                    return;
                }
                have = n;
            }
            Ok(Frame::Complete(n)) => {
                assert!(n <= have);
                if let Ok((p, end)) = decode_prefix(&data[..n], &opts) {
                    let compressed = matches!(&p, Packet::Dense(d) if d.body.is_compressed());
                    assert!(compressed || end == n, "decode ends at {end}, frame at {n}");
                }
                return;
            }
            Err(_) => return,
        }
    }
    panic!("framing did not terminate");
}

#[test]
fn fuzz_smoke_on_seeds_and_mutations() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut runs = 0;
    for seed in seeds() {
        frame_property(&seed);
        let _ = decode_all(&seed);
        let _ = packet_info(&seed);
        if seed.is_empty() {
            continue;
        }
        for _ in 0..40 {
            let mut m = seed.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() % m.len() as u64) as usize;
                m[i] = next() as u8;
            }
            if next() % 4 == 0 {
                m.truncate((next() % (m.len() as u64 + 1)) as usize);
            }
            frame_property(&m);
            let _ = decode_all(&m);
            let _ = packet_info(&m);
            runs += 1;
        }
    }
    eprintln!("fuzz smoke: {runs} mutated inputs");
}
