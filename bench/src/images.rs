//! Generated images with a realistic mix of files: many small text files
//! (sources, metadata), mid-size shared libraries, and a few large,
//! incompressible weight files, like a Python/ML image.

use std::sync::Arc;

use stoker_testkit::image::{Entry, Generator, ImageBuilder};

/// Deterministic pseudo-random numbers (xorshift64*).
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545F4914F6CDD1D)
}

/// 8 MiB of word-salad text: compresses about 3x, never repeats within a chunk.
fn text_corpus() -> Arc<Vec<u8>> {
    const WORDS: &[&str] = &[
        "import",
        "def",
        "return",
        "self",
        "tensor",
        "numpy",
        "float32",
        "model",
        "layer",
        "weights",
        "class",
        "__init__",
        "config",
        "cuda",
        "device",
        "batch",
        "shape",
        "torch",
        "module",
        "forward",
        "if",
        "else",
        "for",
        "in",
        "None",
        "True",
        "False",
        "raise",
        "ValueError",
        "lambda",
        "yield",
        "async",
        "await",
        "print",
        "logging",
        "path",
        "os",
        "sys",
        "json",
        "dict",
        "list",
        "tuple",
    ];
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut out = Vec::with_capacity(8 << 20);
    while out.len() < 8 << 20 {
        let word = WORDS[(next(&mut state) % WORDS.len() as u64) as usize];
        out.extend_from_slice(word.as_bytes());
        out.push(match next(&mut state) % 10 {
            0 => b'\n',
            1 => b'(',
            2 => b'.',
            _ => b' ',
        });
    }
    Arc::new(out)
}

fn text(size: u64, seed: u64, corpus: &Arc<Vec<u8>>) -> Generator {
    let corpus = corpus.clone();
    let start = (seed.wrapping_mul(7919) % corpus.len() as u64) as usize;
    Generator::new(size, move |offset, buf| {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = corpus[(start + offset as usize + i) % corpus.len()];
        }
    })
}

/// Shared-library-like: 4 KiB blocks alternating text and random bytes.
fn binary(size: u64, seed: u64, corpus: &Arc<Vec<u8>>) -> Generator {
    let text = text(size, seed, corpus);
    let random = Generator::random(size, seed);
    Generator::new(size, move |offset, buf| {
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let block_end = ((at / 4096) + 1) * 4096;
            let n = ((block_end - at) as usize).min(buf.len() - done);
            if (at / 4096).is_multiple_of(2) {
                text.fill(at, &mut buf[done..done + n]);
            } else {
                random.fill(at, &mut buf[done..done + n]);
            }
            done += n;
        }
    })
}

/// Deterministic, incompressible bytes (xorshift), different for each seed.
pub fn incompressible(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sizes of the generated ML-like image.
#[derive(Clone, Copy, Debug)]
pub struct MlImageSize {
    pub small_files: usize,
    pub libraries: usize,
    pub weight_files: usize,
    pub weight_file_bytes: u64,
}

impl MlImageSize {
    /// About 1.6 GB uncompressed: 20,000 small files, 400 libraries, 2 × 200 MB weights.
    pub const FULL: MlImageSize = MlImageSize {
        small_files: 20_000,
        libraries: 400,
        weight_files: 2,
        weight_file_bytes: 200 << 20,
    };
    /// About 2.2 GB uncompressed, for the demo (issue 4 asks for at least 2 GB):
    /// [`FULL`](Self::FULL) with 2 × 500 MB weights.
    pub const DEMO: MlImageSize = MlImageSize {
        weight_file_bytes: 500 << 20,
        ..Self::FULL
    };
    /// About 100 MB, for a quick run.
    pub const QUICK: MlImageSize = MlImageSize {
        small_files: 2_000,
        libraries: 40,
        weight_files: 1,
        weight_file_bytes: 32 << 20,
    };
}

/// A three-layer image: OS-like base, Python packages, model weights.
pub fn ml_image(size: MlImageSize) -> (ImageBuilder, u64) {
    let corpus = text_corpus();
    let mut state = 42u64;
    let mut total = 0u64;
    let mut base = vec![
        Entry::dir("usr"),
        Entry::dir("usr/lib"),
        Entry::dir("usr/share"),
    ];
    let mut packages = vec![Entry::dir("opt"), Entry::dir("opt/venv")];
    for dir in 0..100 {
        base.push(Entry::dir(format!("usr/share/d{dir}")));
        packages.push(Entry::dir(format!("opt/venv/pkg{dir}")));
    }
    // File i lives in directory i % 100. The layers list each directory's files
    // together, as `docker build` and pip write them (a directory walk), not
    // interleaved across directories.
    let sizes: Vec<u64> = (0..size.small_files)
        .map(|_| 500 + next(&mut state) % 30_000)
        .collect();
    total += sizes.iter().sum::<u64>();
    for dir in 0..100 {
        for i in (dir..size.small_files).step_by(100) {
            let entry =
                |path: String| Entry::generated_file(path, text(sizes[i], i as u64, &corpus));
            if i.is_multiple_of(3) {
                base.push(entry(format!("usr/share/d{dir}/file{i}.txt")));
            } else {
                packages.push(entry(format!("opt/venv/pkg{dir}/module{i}.py")));
            }
        }
    }
    for i in 0..size.libraries {
        let bytes = 100_000 + next(&mut state) % 4_000_000;
        total += bytes;
        let content = binary(bytes, 1000 + i as u64, &corpus);
        if i.is_multiple_of(2) {
            base.push(Entry::generated_file(format!("usr/lib/lib{i}.so"), content));
        } else {
            packages.push(Entry::generated_file(
                format!("opt/venv/lib{i}.so"),
                content,
            ));
        }
    }
    let mut model = vec![Entry::dir("models")];
    for i in 0..size.weight_files {
        total += size.weight_file_bytes;
        model.push(Entry::generated_file(
            format!("models/weights{i}.bin"),
            Generator::random(size.weight_file_bytes, 77 + i as u64),
        ));
    }
    (
        ImageBuilder::new().layer(base).layer(packages).layer(model),
        total,
    )
}
