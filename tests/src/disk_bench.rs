//! Disk conversion benchmark: Parvis's converter against `qemu-img convert` on the same
//! inputs in the same run (issue 3's figures).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use parvis_disk::convert::{ConvertOptions, convert};
use parvis_disk::image::{self, CreateOptions, OpenOptions, Variant};
use parvis_disk::{BlockDevice, ImageFormat};

/// One measured case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// What was converted.
    pub name: String,
    /// Best of the runs, Parvis.
    pub parvis: Duration,
    /// Best of the runs, qemu-img.
    pub qemu: Duration,
}

/// Write back everything dirty first, so one run's writeback is not billed to the next.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Both sides are timed until the output is durable: Parvis's converter flushes the image,
/// and the qemu-img run is followed by an fsync of its output.
fn qemu_convert(src: &Path, sfmt: &str, dst: &Path, dfmt: &str, opts: &[&str]) -> Result<Duration> {
    let _ = std::fs::remove_file(dst);
    settle();
    let t = Instant::now();
    let o = Command::new("qemu-img")
        .args(["convert", "-f", sfmt, "-O", dfmt])
        .args(opts)
        .arg(src)
        .arg(dst)
        .output()
        .context("qemu-img is needed (tests/setup-host.sh)")?;
    std::fs::File::open(dst)?.sync_all()?;
    let d = t.elapsed();
    if !o.status.success() {
        bail!(
            "qemu-img convert failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(d)
}

fn parvis_convert(src: &Path, dst: &Path, format: ImageFormat) -> Result<Duration> {
    let _ = std::fs::remove_file(dst);
    settle();
    let t = Instant::now();
    let s = image::open(
        src,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )?;
    let d = image::create(
        dst,
        &CreateOptions {
            format,
            variant: if format == ImageFormat::Raw {
                Variant::Fixed
            } else {
                Variant::Dynamic
            },
            size: s.size(),
            block_size: None,
            logical_sector_size: s.logical_sector_size(),
        },
    )?;
    convert(
        &s,
        &d,
        ConvertOptions::default(),
        &AtomicBool::new(false),
        &|_, _| {},
    )?;
    Ok(t.elapsed())
}

/// A sparse raw file of `size` bytes with every other 64 MiB extent filled with data.
fn half_allocated_raw(path: &Path, size: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut buf = vec![0u8; 4 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut off = 0;
    while off < size {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        if (off >> 26) % 2 == 0 {
            f.write_all_at(&buf, off)?;
        }
        off += buf.len() as u64;
    }
    f.sync_all()?;
    Ok(())
}

fn same(a: &Path, b: &Path) -> Result<()> {
    let o = Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()?;
    if !o.status.success() {
        bail!(
            "outputs differ: {} vs {}: {}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&o.stdout)
        );
    }
    Ok(())
}

fn best(runs: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..runs {
        best = best.min(f()?);
    }
    Ok(best)
}

/// Run every case in `dir` (needs a few GiB free), `runs` times each, best time kept.
pub fn run(dir: &Path, size_gib: u64, runs: usize) -> Result<Vec<CaseResult>> {
    let p = |n: &str| -> PathBuf { dir.join(n) };
    let size = size_gib << 30;
    eprintln!(
        "disk bench: making a {size_gib} GiB half-allocated source in {}",
        dir.display()
    );
    half_allocated_raw(&p("src.raw"), size)?;
    qemu_convert(
        &p("src.raw"),
        "raw",
        &p("src.vhdx"),
        "vhdx",
        &["-o", "subformat=dynamic"],
    )?;
    let mut out = Vec::new();

    let q = best(runs, || {
        qemu_convert(&p("src.vhdx"), "vhdx", &p("q.raw"), "raw", &[])
    })?;
    let v = best(runs, || {
        parvis_convert(&p("src.vhdx"), &p("p.raw"), ImageFormat::Raw)
    })?;
    same(&p("q.raw"), &p("p.raw"))?;
    out.push(CaseResult {
        name: format!("{size_gib} GiB dynamic VHDX (half allocated) -> raw"),
        parvis: v,
        qemu: q,
    });
    let _ = std::fs::remove_file(p("q.raw"));
    let _ = std::fs::remove_file(p("p.raw"));

    let q = best(runs, || {
        qemu_convert(
            &p("src.raw"),
            "raw",
            &p("q.vhdx"),
            "vhdx",
            &["-o", "subformat=dynamic"],
        )
    })?;
    let v = best(runs, || {
        parvis_convert(&p("src.raw"), &p("p.vhdx"), ImageFormat::Vhdx)
    })?;
    same(&p("q.vhdx"), &p("p.vhdx"))?;
    out.push(CaseResult {
        name: format!("{size_gib} GiB raw (half allocated) -> dynamic VHDX"),
        parvis: v,
        qemu: q,
    });
    for f in ["q.vhdx", "p.vhdx", "src.raw", "src.vhdx"] {
        let _ = std::fs::remove_file(p(f));
    }

    let e = image::create(
        &p("empty.vhdx"),
        &CreateOptions {
            format: ImageFormat::Vhdx,
            variant: Variant::Dynamic,
            size: 100 << 30,
            block_size: None,
            logical_sector_size: 512,
        },
    )?;
    e.flush()?;
    drop(e);
    let q = best(runs, || {
        qemu_convert(&p("empty.vhdx"), "vhdx", &p("q.raw"), "raw", &[])
    })?;
    let v = best(runs, || {
        parvis_convert(&p("empty.vhdx"), &p("p.raw"), ImageFormat::Raw)
    })?;
    out.push(CaseResult {
        name: "empty 100 GiB dynamic VHDX -> raw".into(),
        parvis: v,
        qemu: q,
    });
    for f in ["q.raw", "p.raw", "empty.vhdx"] {
        let _ = std::fs::remove_file(p(f));
    }
    Ok(out)
}

/// Print the table.
pub fn print(results: &[CaseResult]) {
    println!("\n== disk conversion: parvis vs qemu-img convert (best of runs, same inputs) ==");
    println!(
        "{:<48} {:>10} {:>10} {:>14}",
        "case", "parvis s", "qemu-img s", "speed-up"
    );
    for r in results {
        println!(
            "{:<48} {:>10.3} {:>10.3} {:>13.2}x",
            r.name,
            r.parvis.as_secs_f64(),
            r.qemu.as_secs_f64(),
            r.qemu.as_secs_f64() / r.parvis.as_secs_f64()
        );
    }
    println!(
        "both timed until the output is durable (qemu-img followed by fsync); sync before each run"
    );
    println!("target: parvis at least 1.5x qemu-img's speed");
}
