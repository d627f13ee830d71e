//! Interoperation with the `infini-gram` Python package (2.6.0), used as a test oracle and
//! as the benchmark baseline: write the same documents in its v4 layout and run its
//! `rust_indexing` binary to build the suffix array.
//!
//! infini-gram's v4 layout (one shard, suffix `.0`): `tokenized.0` holds every document
//! preceded by a separator of all-`0xFF` bytes, tokens little-endian; `offset.0` holds the
//! `u64` byte offset of each document's separator; `table.0` holds the suffix array as byte
//! offsets in `ceil(log2(bytes) / 8)` bytes each, sorted in memcmp order of the bytes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Overlap between `make-part` ranges, as `indexing.py` uses.
const HACK_BYTES: u64 = 100_000;

/// Locates `rust_indexing` inside the installed `infini_gram` package.
pub fn find_rust_indexing(python: &str) -> Option<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import infini_gram, os; print(os.path.dirname(infini_gram.__file__))",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let dir = String::from_utf8(out.stdout).ok()?;
    let exe = Path::new(dir.trim()).join("rust_indexing");
    exe.is_file().then_some(exe)
}

/// Writes `tokenized.0` and `offset.0` for `docs` with 2- or 4-byte tokens; returns the
/// size of `tokenized.0`. Token ids must be below the separator of the width.
pub fn write_v4<'a>(
    dir: &Path,
    docs: impl IntoIterator<Item = &'a [u32]>,
    token_width: u8,
) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let ds_path = dir.join("tokenized.0");
    let od_path = dir.join("offset.0");
    let create = |p: &Path| -> Result<BufWriter<File>> {
        Ok(BufWriter::new(
            File::create(p).map_err(|e| Error::io(p, e))?,
        ))
    };
    let (mut ds, mut od) = (create(&ds_path)?, create(&od_path)?);
    let mut at = 0u64;
    let w = token_width as usize;
    for doc in docs {
        od.write_all(&at.to_le_bytes())
            .map_err(|e| Error::io(&od_path, e))?;
        let mut buf = vec![0xFFu8; w];
        for &t in doc {
            buf.extend_from_slice(&t.to_le_bytes()[..w]);
        }
        ds.write_all(&buf).map_err(|e| Error::io(&ds_path, e))?;
        at += buf.len() as u64;
    }
    ds.flush().map_err(|e| Error::io(&ds_path, e))?;
    od.flush().map_err(|e| Error::io(&od_path, e))?;
    Ok(at)
}

/// Runs `rust_indexing` make-part (`jobs` processes in parallel), merge and concat, as
/// infini-gram's `indexing.py` does, to write `table.0` beside `tokenized.0`. Returns the
/// wall time.
pub fn build_v4_table(
    rust_indexing: &Path,
    dir: &Path,
    token_width: u8,
    jobs: usize,
) -> Result<Duration> {
    let started = Instant::now();
    let ds = dir.join("tokenized.0");
    let size = std::fs::metadata(&ds).map_err(|e| Error::io(&ds, e))?.len();
    let ratio = ((size as f64).log2() / 8.0).ceil().max(1.0) as u64;
    let parts = dir.join("parts");
    let merged = dir.join("merged");
    for d in [&parts, &merged] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let w = token_width as u64;
    let jobs = jobs.max(1) as u64;
    let mut part = size / jobs;
    part += (w - part % w) % w;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let common = [
        "--ratio".to_string(),
        ratio.to_string(),
        "--token-width".to_string(),
        w.to_string(),
    ];
    let mut children = Vec::new();
    for i in 0..jobs {
        let (start, end) = (i * part, ((i + 1) * part + HACK_BYTES).min(size));
        if start >= size {
            break;
        }
        let child = Command::new(rust_indexing)
            .args([
                "make-part",
                "--data-file",
                &s(&ds),
                "--parts-dir",
                &s(&parts),
            ])
            .args([
                "--start-byte",
                &start.to_string(),
                "--end-byte",
                &end.to_string(),
            ])
            .args(&common)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| Error::io(rust_indexing, e))?;
        children.push(child);
    }
    for mut child in children {
        check(rust_indexing, "make-part", child.wait())?;
    }
    let status = Command::new(rust_indexing)
        .args(["merge", "--data-file", &s(&ds), "--parts-dir", &s(&parts)])
        .args([
            "--merged-dir",
            &s(&merged),
            "--num-threads",
            &jobs.to_string(),
        ])
        .args(["--hacksize", &HACK_BYTES.to_string()])
        .args(&common)
        .stdout(Stdio::null())
        .status();
    check(rust_indexing, "merge", status)?;
    let status = Command::new(rust_indexing)
        .args([
            "concat",
            "--data-file",
            &s(&ds),
            "--merged-dir",
            &s(&merged),
        ])
        .args(["--merged-file", &s(&dir.join("table.0"))])
        .args(["--num-threads", &jobs.to_string()])
        .args(&common)
        .stdout(Stdio::null())
        .status();
    check(rust_indexing, "concat", status)?;
    for d in [&parts, &merged] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(started.elapsed())
}

fn check(
    program: &Path,
    step: &str,
    status: std::io::Result<std::process::ExitStatus>,
) -> Result<()> {
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(Error::External {
            program: program.to_path_buf(),
            reason: format!("{step} exited with {s}"),
        }),
        Err(e) => Err(Error::io(program, e)),
    }
}
