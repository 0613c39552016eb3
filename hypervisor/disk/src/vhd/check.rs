//! Consistency check of an open VHD, re-reading its structures from the file.

use super::dynamic::{self, DynHeader, HEADER_SIZE, Region, UNALLOCATED};
use super::footer::{self, DiskType, FOOTER_SIZE, Footer};
use super::{Vhd, io_err};
use crate::{CheckReport, DiskError};

impl Vhd {
    /// Check the image: footer checksums and the footer copy, the dynamic header checksum,
    /// every BAT entry (inside the file, no overlap with metadata or other blocks), blocks
    /// mapped beyond the virtual size, trailing bytes, and the differencing parent's
    /// timestamp. Problems are reported in the [`CheckReport`]; only I/O failures are errors.
    pub fn check(&self) -> Result<CheckReport, DiskError> {
        let mut r = CheckReport::default();
        let st = self.read_state();
        if !st.dirty.is_empty() {
            r.warnings.push(format!(
                "{} BAT sector(s) not yet flushed; the on-disk BAT lags the open image",
                st.dirty.len()
            ));
        }
        let len = self.storage.len().map_err(io_err("stat", 0))?;
        let s = self.storage.as_ref();
        // Trailing footer.
        let mut end_footer = None;
        for flen in [FOOTER_SIZE, footer::OLD_FOOTER_SIZE] {
            let Some(at) = len.checked_sub(flen as u64) else {
                continue;
            };
            let mut b = vec![0u8; flen];
            s.read_at(&mut b, at)
                .map_err(io_err("read VHD footer", at))?;
            if let Ok(f) = Footer::parse(&b, at) {
                end_footer = Some(f);
                break;
            }
        }
        match &end_footer {
            None => r
                .errors
                .push("no valid footer at the end of the file".into()),
            Some(f) if f.raw != st.footer.raw => r
                .errors
                .push("the footer at the end of the file differs from the open image's".into()),
            Some(f) if f.raw.len() == footer::OLD_FOOTER_SIZE => {
                r.warnings.push("old 511-byte footer".into())
            }
            _ => {}
        }
        if st.footer.saved_state {
            r.warnings.push("the saved-state flag is set".into());
        }
        let Some(d) = &self.dynamic else {
            if st.next_free > st.size {
                r.warnings.push(format!(
                    "{} bytes of data beyond the virtual size (CHS-sized image)",
                    st.next_free - st.size
                ));
            }
            return Ok(r);
        };
        // Footer copy at 0.
        let mut b = [0u8; FOOTER_SIZE];
        s.read_at(&mut b, 0)
            .map_err(io_err("read VHD footer copy", 0))?;
        match Footer::parse(&b, 0) {
            Err(e) => r.errors.push(format!("footer copy at offset 0: {e}")),
            Ok(f) if f.raw != st.footer.raw => r
                .warnings
                .push("the footer copy at offset 0 differs from the footer".into()),
            Ok(_) => {}
        }
        // Dynamic header.
        let mut hb = [0u8; HEADER_SIZE];
        s.read_at(&mut hb, d.header_offset)
            .map_err(io_err("read VHD dynamic header", d.header_offset))?;
        match DynHeader::parse(&hb, d.header_offset) {
            Err(e) => r.errors.push(e.to_string()),
            Ok(h) if h.max_table_entries as usize != st.bat.len() => r.errors.push(format!(
                "dynamic header lists {} BAT entries, the open image {}",
                h.max_table_entries,
                st.bat.len()
            )),
            Ok(h) if h.table_offset != st.table_offset => r.errors.push(format!(
                "dynamic header puts the BAT at {:#x}, the open image at {:#x}",
                h.table_offset, st.table_offset
            )),
            Ok(_) => {}
        }
        // BAT, as on disk.
        let toff = st.table_offset;
        let bat = dynamic::read_bat(s, toff, st.bat.len() as u32)?;
        if st.dirty.is_empty() && bat != st.bat {
            r.errors
                .push("the BAT on disk differs from the open image's".into());
        }
        let mut regions = vec![
            Region {
                name: "VHD footer copy".into(),
                start: 0,
                end: FOOTER_SIZE as u64,
            },
            Region {
                name: "VHD dynamic header".into(),
                start: d.header_offset,
                end: d.header_offset + HEADER_SIZE as u64,
            },
            Region {
                name: "VHD BAT".into(),
                start: toff,
                end: toff + 4 * bat.len() as u64,
            },
        ];
        if self.disk_type == DiskType::Differencing {
            for (i, l) in d
                .header
                .locators
                .iter()
                .enumerate()
                .filter(|(_, l)| l.data_length > 0)
            {
                regions.push(Region {
                    name: format!("VHD parent locator {i}"),
                    start: l.data_offset,
                    end: l.data_offset + u64::from(l.data_length),
                });
            }
        }
        let data_end = len - end_footer.as_ref().map_or(0, |_| FOOTER_SIZE as u64);
        match dynamic::validate_bat(
            &st.bat,
            toff,
            d.header.block_size,
            data_end.max(st.next_free),
            &regions,
        ) {
            Err(e) => r.errors.push(e.to_string()),
            Ok(last) => {
                let used = last.max(regions.iter().map(|x| x.end).max().unwrap_or(0));
                if end_footer.is_some() && data_end > used.div_ceil(512) * 512 {
                    r.warnings.push(format!(
                        "{} unused bytes before the trailing footer",
                        data_end - used.div_ceil(512) * 512
                    ));
                }
            }
        }
        let first_beyond = st.size.div_ceil(d.block_size) as usize;
        let beyond = st
            .bat
            .iter()
            .skip(first_beyond)
            .filter(|&&e| e != UNALLOCATED)
            .count();
        if beyond > 0 {
            r.warnings.push(format!(
                "{beyond} block(s) allocated beyond the virtual size"
            ));
        }
        if let (Some(_), Some(path)) = (&self.parent, &self.parent_path) {
            let mtime = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .map(footer::to_timestamp);
            if mtime.is_some_and(|t| t != d.header.parent_timestamp) {
                r.warnings.push(format!(
                    "parent {} was modified after the child recorded it (timestamp mismatch)",
                    path.display()
                ));
            }
        } else if self.disk_type == DiskType::Differencing {
            r.warnings
                .push("the parent was not opened; reads fall back to zeros".into());
        }
        Ok(r)
    }
}
