//! `parvis disk info` and `parvis disk check` for VHDX images.

use super::bat::{self, FULLY_PRESENT, PARTIALLY_PRESENT};
use super::format::{MIB, io_err};
use super::{Vhdx, header};
use crate::{CheckReport, DiskError, ImageFormat, ImageInfo};

impl Vhdx {
    /// What `parvis disk info` shows.
    pub fn info(&self) -> ImageInfo {
        let st = self.read_state();
        let file_size = self.storage.len().unwrap_or(0);
        let geo = &st.geo;
        let size = st.meta.virtual_size;
        let mut allocated = 0u64;
        for block in 0..geo.data_blocks {
            let e = st.bat.get(geo.payload_index(block)).copied().unwrap_or(0);
            let extent = geo.block_extent(block, size);
            match bat::state(e) {
                FULLY_PRESENT => allocated += extent,
                PARTIALLY_PRESENT => {
                    let set = self
                        .bitmap_location(&st, block)
                        .and_then(|(bm, bit0)| {
                            self.read_bits(&st, bm, bit0, extent.div_ceil(geo.logical))
                        })
                        .map(|bits| bits.iter().filter(|b| **b).count() as u64)
                        .unwrap_or(0);
                    allocated += set * geo.logical;
                }
                _ => {}
            }
        }
        let h = &st.headers.current;
        let mut details = vec![
            ("creator".to_string(), self.creator.clone()),
            ("virtual disk id".to_string(), st.meta.page83.to_string()),
            ("data write guid".to_string(), h.data_write_guid.to_string()),
            ("file write guid".to_string(), h.file_write_guid.to_string()),
            ("header sequence".to_string(), h.sequence.to_string()),
            (
                "log".to_string(),
                format!(
                    "{} KiB at {:#x}, {}",
                    h.log_length / 1024,
                    h.log_offset,
                    if self.replayed {
                        "replayed at open"
                    } else {
                        "clean"
                    }
                ),
            ),
            ("chunk ratio".to_string(), geo.chunk_ratio.to_string()),
        ];
        if let Some(l) = st.meta.locator("parent_linkage") {
            details.push(("parent linkage".to_string(), l.to_string()));
        }
        ImageInfo {
            format: ImageFormat::Vhdx,
            variant: self.variant.name(),
            virtual_size: size,
            file_size,
            allocated,
            block_size: Some(st.meta.block_size),
            logical_sector_size: self.logical,
            physical_sector_size: self.physical,
            parent: self.parent_path.clone(),
            details,
        }
    }

    /// Check the image's consistency (the open already refused anything unsafe to use).
    pub fn check(&self) -> Result<CheckReport, DiskError> {
        let st = self.read_state();
        let s = self.storage.as_ref();
        let mut r = CheckReport::default();
        let file_len = s.len().map_err(io_err("stat", 0))?;
        let h = &st.headers.current;
        let log_end = h.log_offset + u64::from(h.log_length);
        let mut reserved = vec![bat::Reserved {
            start: h.log_offset,
            end: log_end,
            what: "log",
        }];
        reserved.extend(st.regions.entries.iter().map(|g| bat::Reserved {
            start: g.offset,
            end: g.end(),
            what: "region",
        }));
        if let Err(e) = bat::validate(
            &st.bat,
            &st.geo,
            st.meta.virtual_size,
            st.meta.has_parent,
            file_len,
            st.bat_offset,
            &reserved,
        ) {
            r.errors.push(e.to_string());
        }
        let mut used_end = log_end;
        for g in &st.regions.entries {
            used_end = used_end.max(g.end());
        }
        let mut not_present_in_fixed = 0u64;
        for (i, &e) in st.bat.iter().enumerate() {
            let state = bat::state(e);
            let bitmap = st.geo.is_bitmap_index(i as u64);
            if state == FULLY_PRESENT || state == PARTIALLY_PRESENT {
                let len = if bitmap { MIB } else { st.geo.block_size };
                used_end = used_end.max(bat::offset(e) + len);
            } else if !bitmap && st.meta.leave_allocated {
                not_present_in_fixed += 1;
            }
        }
        if not_present_in_fixed > 0 {
            r.warnings.push(format!(
                "{not_present_in_fixed} blocks of a fixed image are not allocated"
            ));
        }
        if file_len > used_end.next_multiple_of(MIB) {
            r.warnings.push(format!(
                "{} bytes at the end of the file are not used by any block (leaked)",
                file_len - used_end.next_multiple_of(MIB)
            ));
        }
        match header::read_headers(s) {
            Ok(hs) if !hs.other_valid => r
                .warnings
                .push("only one of the two headers is valid".to_string()),
            Ok(_) => {}
            Err(e) => r.errors.push(e.to_string()),
        }
        if !self.regions_agree {
            r.warnings
                .push("the two region table copies differ or one is damaged".to_string());
        }
        if !h.log_guid.is_zero() {
            r.warnings
                .push("the header names a log but it holds no active entries".to_string());
        }
        if st.meta.unknown_items > 0 {
            r.warnings.push(format!(
                "{} optional metadata items are not understood",
                st.meta.unknown_items
            ));
        }
        if let Some(p) = &self.parent {
            let pr = p.check()?;
            r.errors
                .extend(pr.errors.into_iter().map(|e| format!("parent: {e}")));
            r.warnings
                .extend(pr.warnings.into_iter().map(|w| format!("parent: {w}")));
        }
        Ok(r)
    }
}
