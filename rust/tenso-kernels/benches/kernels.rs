//! Criterion benches of the kernels, each variant next to its baseline:
//!
//! * `xxh3/<path>`: XXH3-64 of 1 MiB and 16 MiB on every path this CPU runs (`portable` is `xxhash-rust`);
//! * `gather/rows` vs `gather/transposed` (and `gather/transposed_portable`): 4096 x 1024 float32 (16 MiB), C order
//!   vs its transpose;
//! * `lz4/single` vs `lz4/parallel`: a 32 MiB compressible body on one thread and on every core.
//!
//! `cargo bench -p tenso-kernels`; add `-- xxh3` to run one group.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tenso_kernels::gather::{Path as GatherPath, Strided};
use tenso_kernels::lz4;
use tenso_kernels::xxh3::{xxh3_64_on, Path as Xxh3Path};

fn data(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(0x9E37_79B1) >> 7) as u8)
        .collect()
}

fn bench_xxh3(c: &mut Criterion) {
    let mut group = c.benchmark_group("xxh3");
    for len in [1 << 20, 16 << 20] {
        let bytes = data(len);
        group.throughput(Throughput::Bytes(len as u64));
        for path in Xxh3Path::ALL.into_iter().filter(|p| p.available()) {
            group.bench_with_input(BenchmarkId::new(path.name(), len), &bytes, |b, bytes| {
                b.iter(|| xxh3_64_on(path, black_box(bytes)))
            });
        }
    }
    group.finish();
}

fn bench_gather(c: &mut Criterion) {
    const ROWS: usize = 4096;
    const COLS: usize = 1024;
    let src = data(ROWS * COLS * 4);
    let mut dst = vec![0u8; src.len()];
    let mut group = c.benchmark_group("gather");
    group.throughput(Throughput::Bytes(src.len() as u64));
    let rows =
        Strided::try_new(&src, 0, &[ROWS, COLS], &[COLS as isize * 4, 4], 4).expect("C order");
    // The transpose of a COLS x ROWS C-order array.
    let transposed =
        Strided::try_new(&src, 0, &[ROWS, COLS], &[4, ROWS as isize * 4], 4).expect("transpose");
    group.bench_function("rows", |b| {
        b.iter(|| rows.gather_on(GatherPath::Specialized, black_box(&mut dst)))
    });
    group.bench_function("transposed", |b| {
        b.iter(|| transposed.gather_on(GatherPath::Specialized, black_box(&mut dst)))
    });
    group.bench_function("transposed_portable", |b| {
        b.iter(|| transposed.gather_on(GatherPath::Portable, black_box(&mut dst)))
    });
    group.finish();
}

fn bench_lz4(c: &mut Criterion) {
    let body: Vec<u8> = (0..32usize << 20)
        .map(|i| (i / 256 % 7) as u8 ^ (i % 3) as u8)
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut group = c.benchmark_group("lz4");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.sample_size(10);
    group.bench_function("single", |b| {
        b.iter(|| lz4::compress_blocks(black_box(&body), 1))
    });
    group.bench_function("parallel", |b| {
        b.iter(|| lz4::compress_blocks(black_box(&body), threads))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: these are A/B comparisons on one machine, not a regression record.
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = bench_xxh3, bench_gather, bench_lz4
}
criterion_main!(benches);
