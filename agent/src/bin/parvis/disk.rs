//! `parvis disk info|create|convert|resize|check|compare`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use parvis_disk::convert::{ConvertOptions, convert, first_difference};
use parvis_disk::image::{
    self, CreateOptions, OpenOptions, Variant, format_from_extension, parse_format,
};
use parvis_disk::{ImageFormat, ImageInfo};
use serde_json::json;

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Show an image's format, sizes and structure.
    Info {
        /// The image.
        path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create an empty image.
    Create {
        /// The new image (must not exist).
        path: PathBuf,
        /// Virtual size, e.g. 20G (not for differencing images).
        #[arg(long)]
        size: Option<String>,
        /// raw, vhd or vhdx (default: from the extension).
        #[arg(long)]
        format: Option<String>,
        /// fixed or dynamic (default dynamic; raw is always fixed).
        #[arg(long, default_value = "dynamic")]
        variant: String,
        /// Create a differencing image on top of this parent.
        #[arg(long, conflicts_with = "size")]
        parent: Option<PathBuf>,
        /// Block size, e.g. 2M or 32M.
        #[arg(long)]
        block_size: Option<String>,
        /// Logical sector size: 512 or 4096 (VHDX, raw).
        #[arg(long, default_value_t = 512)]
        sector_size: u32,
    },
    /// Convert an image to another format or variant (sparse-aware). With one argument
    /// (a disk id or name) and --format, convert a disk on the agent's host instead.
    Convert {
        /// Source image (or, with no DST, a disk on the host).
        src: PathBuf,
        /// Destination image (must not exist). Without it the conversion is remote.
        dst: Option<PathBuf>,
        /// Destination format (default: from the extension; needed for a remote convert).
        #[arg(long)]
        format: Option<String>,
        /// fixed or dynamic (default: dynamic; raw is always fixed).
        #[arg(long)]
        variant: Option<String>,
        /// Name of the new disk (remote convert; default: the source's name with the new
        /// format).
        #[arg(long)]
        name: Option<String>,
        /// Destination block size.
        #[arg(long)]
        block_size: Option<String>,
        /// Worker threads.
        #[arg(long)]
        threads: Option<usize>,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
        /// Machine-readable output: the new disk (remote), or what the conversion did
        /// (local).
        #[arg(long)]
        json: bool,
    },
    /// Change an image's virtual size (VHDX: grow or shrink; VHD: grow).
    Resize {
        /// The image.
        path: PathBuf,
        /// New virtual size.
        size: String,
    },
    /// Check an image's metadata for consistency.
    Check {
        /// The image.
        path: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Compare the contents of two images (any formats).
    Compare {
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
}

/// Run a disk command; returns the exit status.
pub fn run(cmd: DiskCommand) -> Result<i32> {
    match cmd {
        DiskCommand::Info { path, json } => info(&path, json),
        DiskCommand::Create {
            path,
            size,
            format,
            variant,
            parent,
            block_size,
            sector_size,
        } => {
            let format = pick_format(format.as_deref(), &path)?;
            let (variant, size) = match parent {
                Some(p) => {
                    let parent_size = open_ro(&p)?.device().size();
                    (Variant::Differencing { parent: p }, parent_size)
                }
                None => {
                    let size = size.context("--size is needed (or --parent)")?;
                    (parse_variant(&variant, format)?, parse_size(&size)?)
                }
            };
            image::create(
                &path,
                &CreateOptions {
                    format,
                    variant,
                    size,
                    block_size: block_size.as_deref().map(parse_block).transpose()?,
                    logical_sector_size: sector_size,
                },
            )
            .with_context(|| format!("cannot create {}", path.display()))?;
            Ok(0)
        }
        DiskCommand::Convert {
            src,
            dst,
            format,
            variant,
            name,
            block_size,
            threads,
            quiet,
            json,
        } => {
            // One argument means a remote conversion, which `main` dispatches.
            let Some(dst) = dst else {
                bail!("a local conversion needs SRC and DST");
            };
            if name.is_some() {
                bail!("--name is for converting a disk on the host (give no DST)");
            }
            let variant = variant.unwrap_or_else(|| "dynamic".into());
            let format = pick_format(format.as_deref(), &dst)?;
            let s = open_ro(&src)?;
            let sdev = s.device();
            let d = image::create(
                &dst,
                &CreateOptions {
                    format,
                    variant: parse_variant(&variant, format)?,
                    size: sdev.size(),
                    block_size: block_size.as_deref().map(parse_block).transpose()?,
                    logical_sector_size: if format == ImageFormat::Vhd {
                        512
                    } else {
                        sdev.logical_sector_size()
                    },
                },
            )
            .with_context(|| format!("cannot create {}", dst.display()))?;
            let bar = progress(sdev.size(), quiet, "converting");
            let cancel = cancel_on_ctrl_c();
            let mut opts = ConvertOptions::default();
            if let Some(t) = threads {
                opts.threads = t.max(1);
            }
            let start = Instant::now();
            let result = convert(sdev, d.device(), opts, &cancel, &|done, _| {
                bar.set_position(done)
            });
            bar.finish_and_clear();
            match result {
                Ok(st) => {
                    if json {
                        let i = d.info(&dst);
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&json!({
                                "src": src.display().to_string(),
                                "dst": dst.display().to_string(),
                                "format": i.format.to_string(),
                                "variant": i.variant,
                                "virtual_size": i.virtual_size,
                                "file_size": i.file_size,
                                "seconds": start.elapsed().as_secs_f64(),
                                "read": st.read,
                                "written": st.written,
                                "skipped_unallocated": st.skipped_unallocated,
                                "skipped_zero": st.skipped_zero,
                            }))?
                        );
                    } else if !quiet {
                        eprintln!(
                            "converted {} in {:.2} s: read {}, wrote {}, skipped {} unallocated and {} zero",
                            human(sdev.size()),
                            start.elapsed().as_secs_f64(),
                            human(st.read),
                            human(st.written),
                            human(st.skipped_unallocated),
                            human(st.skipped_zero)
                        );
                    }
                    Ok(0)
                }
                Err(e) => {
                    drop(d);
                    // Never leave a half-written image that looks complete.
                    let _ = std::fs::remove_file(&dst);
                    Err(anyhow::Error::new(e).context(format!(
                        "converting {} to {} failed; the partial destination was removed",
                        src.display(),
                        dst.display()
                    )))
                }
            }
        }
        DiskCommand::Resize { path, size } => {
            let img = image::open(&path, &OpenOptions::default())
                .with_context(|| format!("cannot open {}", path.display()))?;
            img.resize(parse_size(&size)?)
                .with_context(|| format!("cannot resize {}", path.display()))?;
            img.device().flush()?;
            Ok(0)
        }
        DiskCommand::Check { path, json } => {
            let img = open_ro(&path)?;
            let r = img.check()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "path": path.display().to_string(),
                        "ok": r.errors.is_empty(),
                        "errors": r.errors,
                        "warnings": r.warnings,
                    }))?
                );
            } else {
                for e in &r.errors {
                    println!("error: {e}");
                }
                for w in &r.warnings {
                    println!("warning: {w}");
                }
                if r.errors.is_empty() {
                    println!("No errors were found on the image.");
                }
            }
            Ok(if r.errors.is_empty() { 0 } else { 2 })
        }
        DiskCommand::Compare { a, b, quiet } => {
            let ia = open_ro(&a)?;
            let ib = open_ro(&b)?;
            let (da, db) = (ia.device(), ib.device());
            let len = da.size().min(db.size());
            let bar = progress(len, quiet, "comparing");
            let cancel = cancel_on_ctrl_c();
            let diff = first_difference(da, db, 0..len, &cancel, &|d, _| bar.set_position(d))?;
            bar.finish_and_clear();
            if cancel.load(Ordering::Relaxed) {
                bail!("cancelled");
            }
            if let Some(off) = diff {
                println!("Content mismatch at offset {off}");
                return Ok(1);
            }
            if da.size() != db.size() {
                let (longer, big) = if da.size() > db.size() {
                    (da, &a)
                } else {
                    (db, &b)
                };
                // Only the tail beyond the common size is left to check, against zeros.
                let extra = first_difference(
                    longer,
                    &Zeros(longer.size()),
                    len..longer.size(),
                    &cancel,
                    &|_, _| {},
                )?;
                if let Some(off) = extra {
                    println!(
                        "Content mismatch at offset {off} ({} is larger)",
                        big.display()
                    );
                    return Ok(1);
                }
                println!(
                    "Images are identical (the larger one is zero beyond the smaller one's size)."
                );
                return Ok(0);
            }
            println!("Images are identical.");
            Ok(0)
        }
    }
}

/// A virtual disk of zeros, to compare a tail against.
struct Zeros(u64);

impl parvis_disk::BlockDevice for Zeros {
    fn size(&self) -> u64 {
        self.0
    }
    fn logical_sector_size(&self) -> u32 {
        512
    }
    fn physical_sector_size(&self) -> u32 {
        512
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<(), parvis_disk::DiskError> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<(), parvis_disk::DiskError> {
        Err(parvis_disk::DiskError::ReadOnly)
    }
    fn flush(&self) -> Result<(), parvis_disk::DiskError> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), parvis_disk::DiskError> {
        Err(parvis_disk::DiskError::ReadOnly)
    }
    fn allocation(
        &self,
        _offset: u64,
        len: u64,
    ) -> Result<parvis_disk::Allocation, parvis_disk::DiskError> {
        Ok(parvis_disk::Allocation {
            state: parvis_disk::AllocationState::Unallocated,
            len,
        })
    }
}

fn open_ro(path: &Path) -> Result<image::Image> {
    image::open(
        path,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .with_context(|| format!("cannot open {}", path.display()))
}

fn info(path: &Path, json: bool) -> Result<i32> {
    let img = open_ro(path)?;
    let i: ImageInfo = img.info(path);
    if json {
        let details: serde_json::Map<String, serde_json::Value> = i
            .details
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "path": path.display().to_string(),
                "format": i.format.to_string(),
                "variant": i.variant,
                "virtual_size": i.virtual_size,
                "file_size": i.file_size,
                "allocated": i.allocated,
                "block_size": i.block_size,
                "logical_sector_size": i.logical_sector_size,
                "physical_sector_size": i.physical_sector_size,
                "parent": i.parent.as_ref().map(|p| p.display().to_string()),
                "details": details,
            }))?
        );
    } else {
        println!("image:            {}", path.display());
        println!("format:           {} ({})", i.format, i.variant);
        println!(
            "virtual size:     {} ({} bytes)",
            human(i.virtual_size),
            i.virtual_size
        );
        println!("file size:        {}", human(i.file_size));
        println!("allocated:        {}", human(i.allocated));
        if let Some(b) = i.block_size {
            println!("block size:       {}", human(u64::from(b)));
        }
        println!(
            "sector size:      {} logical, {} physical",
            i.logical_sector_size, i.physical_sector_size
        );
        if let Some(p) = &i.parent {
            println!("parent:           {}", p.display());
        }
        for (k, v) in &i.details {
            println!("{:<18}{v}", format!("{k}:"));
        }
    }
    Ok(0)
}

fn pick_format(given: Option<&str>, path: &Path) -> Result<ImageFormat> {
    match given {
        Some(f) => {
            parse_format(f).with_context(|| format!("unknown format '{f}' (raw, vhd, vhdx)"))
        }
        None => format_from_extension(path).with_context(|| {
            format!(
                "cannot tell the format from {}; give --format",
                path.display()
            )
        }),
    }
}

fn parse_variant(v: &str, format: ImageFormat) -> Result<Variant> {
    match (v, format) {
        (_, ImageFormat::Raw) => Ok(Variant::Fixed),
        ("fixed", _) => Ok(Variant::Fixed),
        ("dynamic", _) => Ok(Variant::Dynamic),
        _ => bail!("unknown variant '{v}' (fixed or dynamic)"),
    }
}

/// Parse `20G`, `512M`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("'{s}' is not a size"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        u => bail!("unknown size unit '{u}'"),
    };
    n.checked_mul(1 << shift)
        .with_context(|| format!("size '{s}' is too large"))
}

fn parse_block(s: &str) -> Result<u32> {
    u32::try_from(parse_size(s)?).context("block size too large")
}

pub fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A bytes progress bar on stderr (hidden with `quiet`).
pub(crate) fn progress(total: u64, quiet: bool, what: &'static str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(what);
    bar
}

/// A flag set by Ctrl-C, so long operations stop cleanly (and remove partial output)
/// instead of dying half-way.
fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let f = Arc::new(AtomicBool::new(false));
        let g = f.clone();
        if let Err(e) = ctrlc::set_handler(move || g.store(true, Ordering::Relaxed)) {
            eprintln!("parvis: warning: Ctrl-C will not cancel cleanly: {e}");
        }
        f
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_names() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("1X").is_err());
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(
            pick_format(None, Path::new("a.VHDX")).unwrap(),
            ImageFormat::Vhdx
        );
        assert!(pick_format(None, Path::new("a.qcow2")).is_err());
    }
}
