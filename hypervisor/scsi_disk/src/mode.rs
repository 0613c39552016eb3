//! MODE SENSE and MODE SELECT: the caching page (08h), the control page (0Ah) and "all
//! pages" (3Fh).
//!
//! Linux reads page 3Fh for the write-protect bit, then page 08h for WCE/RCD and the
//! DPOFUA bit, and writes the caching page back (MODE SELECT, PF = 1, SP = 0) when a user
//! writes `/sys/class/scsi_disk/*/cache_type`. WCE and RCD are the only changeable fields:
//! with WCE clear every write is followed by a backend flush (write-through); RCD is only
//! reported. Every other field must be sent back unchanged, else the MODE SELECT fails
//! with INVALID FIELD IN PARAMETER LIST and nothing changes.

use std::sync::atomic::Ordering;

use crate::ScsiDisk;
use crate::cdb::{self, Cdb, be16_at, be32_at, be64_at};
use crate::sense::{Asc, Sense, SenseKey, Xfer, put};

const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0A;
const PAGE_ALL: u8 = 0x3F;

/// Caching page length including its 2-byte header (page length 12h).
const CACHING_LEN: usize = 20;
/// Control page length including its header (page length 0Ah).
const CONTROL_LEN: usize = 12;

/// Caching page byte 2: write cache enable, read cache disable.
const WCE: u8 = 0x04;
const RCD: u8 = 0x01;

/// Device-specific parameter of the mode parameter header: write protect, DPO/FUA.
const DSP_WP: u8 = 0x80;
const DSP_DPOFUA: u8 = 0x10;

/// Page control field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

impl ScsiDisk {
    pub(crate) fn mode_sense(&self, cdb: &Cdb, data_in: &mut [u8]) -> Result<Xfer, Sense> {
        let ten = cdb.op() == cdb::MODE_SENSE_10;
        let dbd = cdb.u8(1) & 0x08 != 0;
        let llbaa = ten && cdb.u8(1) & 0x10 != 0;
        let pc = match cdb.u8(2) >> 6 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => {
                return Err(Sense::new(
                    SenseKey::IllegalRequest,
                    Asc::SAVING_PARAMETERS_NOT_SUPPORTED,
                ));
            }
        };
        let page = cdb.u8(2) & 0x3F;
        // Subpage 00h, or FFh ("the page and all its subpages": there are none).
        if !matches!(cdb.u8(3), 0x00 | 0xFF) {
            return Err(Sense::invalid_cdb_field(3, None));
        }
        let alloc = if ten {
            usize::from(cdb.be16(7))
        } else {
            usize::from(cdb.u8(4))
        };

        let mut pages = [0u8; CACHING_LEN + CONTROL_LEN];
        let pages_len = match page {
            PAGE_CACHING => {
                pages[..CACHING_LEN].copy_from_slice(&self.caching_page(pc));
                CACHING_LEN
            }
            PAGE_CONTROL => {
                pages[..CONTROL_LEN].copy_from_slice(&control_page(pc));
                CONTROL_LEN
            }
            PAGE_ALL => {
                pages[..CACHING_LEN].copy_from_slice(&self.caching_page(pc));
                pages[CACHING_LEN..].copy_from_slice(&control_page(pc));
                CACHING_LEN + CONTROL_LEN
            }
            _ => return Err(Sense::invalid_cdb_field(2, Some(5))),
        };

        let mut dsp = DSP_DPOFUA;
        if self.disk.read_only() {
            dsp |= DSP_WP;
        }
        let bd = if dbd {
            BlockDescriptor::None
        } else if llbaa {
            BlockDescriptor::Long
        } else {
            BlockDescriptor::Short
        };
        let bd_len = bd.len();
        let header_len = if ten { 8 } else { 4 };
        let total = header_len + bd_len + pages_len;
        let mut d = [0u8; 8 + 16 + CACHING_LEN + CONTROL_LEN];
        if ten {
            // Mode data length excludes its own two bytes.
            d[0..2].copy_from_slice(&((total - 2) as u16).to_be_bytes());
            d[3] = dsp;
            if bd == BlockDescriptor::Long {
                d[4] = 0x01; // LONGLBA
            }
            d[6..8].copy_from_slice(&(bd_len as u16).to_be_bytes());
        } else {
            d[0] = (total - 1) as u8;
            d[2] = dsp;
            d[3] = bd_len as u8;
        }
        // Nothing in a block descriptor is changeable.
        if pc != PageControl::Changeable {
            self.block_descriptor(bd, &mut d[header_len..header_len + bd_len]);
        }
        d[header_len + bd_len..total].copy_from_slice(&pages[..pages_len]);
        Ok(Xfer::data_in(put(data_in, &d[..total], alloc)))
    }

    /// Fill a block descriptor: number of blocks (saturated in the short form) and the
    /// logical block length.
    fn block_descriptor(&self, bd: BlockDescriptor, out: &mut [u8]) {
        let blocks = self.capacity_blocks();
        let bs = self.block_size().to_be_bytes();
        match bd {
            BlockDescriptor::None => {}
            BlockDescriptor::Short => {
                let n = u32::try_from(blocks).unwrap_or(u32::MAX);
                out[0..4].copy_from_slice(&n.to_be_bytes());
                out[5..8].copy_from_slice(&bs[1..4]);
            }
            BlockDescriptor::Long => {
                out[0..8].copy_from_slice(&blocks.to_be_bytes());
                out[12..16].copy_from_slice(&bs);
            }
        }
    }

    /// The caching page as reported for `pc`.
    fn caching_page(&self, pc: PageControl) -> [u8; CACHING_LEN] {
        let mut p = [0u8; CACHING_LEN];
        p[0] = PAGE_CACHING;
        p[1] = (CACHING_LEN - 2) as u8;
        p[2] = match pc {
            PageControl::Current => {
                let mut b = 0;
                if self.write_cache.load(Ordering::Relaxed) {
                    b |= WCE;
                }
                if self.read_cache_disabled.load(Ordering::Relaxed) {
                    b |= RCD;
                }
                b
            }
            PageControl::Changeable => WCE | RCD,
            PageControl::Default => WCE,
        };
        p
    }

    pub(crate) fn mode_select(&self, cdb: &Cdb, data_out: &[u8]) -> Result<Xfer, Sense> {
        let ten = cdb.op() == cdb::MODE_SELECT_10;
        let flags = cdb.u8(1);
        if flags & 0x01 != 0 {
            // SP: nothing can be saved.
            return Err(Sense::invalid_cdb_field(1, Some(0)));
        }
        let len = if ten {
            usize::from(cdb.be16(7))
        } else {
            usize::from(cdb.u8(4))
        };
        if len == 0 {
            return Ok(Xfer::NONE);
        }
        if flags & 0x10 == 0 {
            // PF = 0 means vendor-specific page formats.
            return Err(Sense::invalid_cdb_field(1, Some(4)));
        }
        let list = data_out.get(..len).ok_or_else(Sense::param_list_length)?;
        let (wce, rcd) = self.parse_mode_parameters(list, ten)?;
        if let Some(wce) = wce {
            self.write_cache.store(wce, Ordering::Relaxed);
        }
        if let Some(rcd) = rcd {
            self.read_cache_disabled.store(rcd, Ordering::Relaxed);
        }
        Ok(Xfer::data_out(len))
    }

    /// Validate a whole MODE SELECT parameter list before anything changes; returns the
    /// requested WCE and RCD if the caching page is in it.
    fn parse_mode_parameters(
        &self,
        list: &[u8],
        ten: bool,
    ) -> Result<(Option<bool>, Option<bool>), Sense> {
        let header_len = if ten { 8 } else { 4 };
        if list.len() < header_len {
            return Err(Sense::param_list_length());
        }
        // The mode data length and the device-specific parameter are reserved in MODE
        // SELECT; the medium type must be 0 as reported.
        let medium = if ten { 2 } else { 1 };
        if list[medium] != 0 {
            return Err(Sense::invalid_param_field(medium, None));
        }
        let (bd_len, bd_field, long) = if ten {
            (usize::from(be16_at(list, 6)), 6, list[4] & 0x01 != 0)
        } else {
            (usize::from(list[3]), 3, false)
        };
        let expected = if long { 16 } else { 8 };
        if bd_len != 0 && bd_len != expected {
            return Err(Sense::invalid_param_field(bd_field, None));
        }
        if list.len() < header_len + bd_len {
            return Err(Sense::param_list_length());
        }
        if bd_len != 0 {
            self.check_block_descriptor(&list[header_len..header_len + bd_len], header_len)?;
        }

        let mut wce = None;
        let mut rcd = None;
        let mut off = header_len + bd_len;
        while off < list.len() {
            if list.len() - off < 2 {
                return Err(Sense::param_list_length());
            }
            if list[off] & 0x40 != 0 {
                // SPF: no subpages here.
                return Err(Sense::invalid_param_field(off, Some(6)));
            }
            let code = list[off] & 0x3F;
            let page_len = 2 + usize::from(list[off + 1]);
            let Some(page) = list.get(off..off + page_len) else {
                return Err(Sense::param_list_length());
            };
            match code {
                PAGE_CACHING if page_len == CACHING_LEN => {
                    let current = self.caching_page(PageControl::Current);
                    // Byte 0's PS bit is reserved in MODE SELECT; byte 2 may change WCE and
                    // RCD only; everything else must match.
                    if page[2] & !(WCE | RCD) != current[2] & !(WCE | RCD) {
                        return Err(Sense::invalid_param_field(off + 2, None));
                    }
                    if let Some(i) = (3..CACHING_LEN).find(|&i| page[i] != current[i]) {
                        return Err(Sense::invalid_param_field(off + i, None));
                    }
                    wce = Some(page[2] & WCE != 0);
                    rcd = Some(page[2] & RCD != 0);
                }
                PAGE_CONTROL if page_len == CONTROL_LEN => {
                    let current = control_page(PageControl::Current);
                    if let Some(i) = (2..CONTROL_LEN).find(|&i| page[i] != current[i]) {
                        return Err(Sense::invalid_param_field(off + i, None));
                    }
                }
                PAGE_CACHING | PAGE_CONTROL => {
                    return Err(Sense::invalid_param_field(off + 1, None));
                }
                _ => return Err(Sense::invalid_param_field(off, Some(5))),
            }
            off += page_len;
        }
        Ok((wce, rcd))
    }

    /// A block descriptor in MODE SELECT may restate the disk's geometry but not change it:
    /// the block length must be the logical block size, the number of blocks 0 (no change)
    /// or the current capacity (as MODE SENSE reports it).
    fn check_block_descriptor(&self, bd: &[u8], at: usize) -> Result<(), Sense> {
        let blocks = self.capacity_blocks();
        let (count, count_ok, len, len_at) = if bd.len() == 16 {
            (be64_at(bd, 0), blocks, be32_at(bd, 12), 12)
        } else {
            let short = u64::from(u32::try_from(blocks).unwrap_or(u32::MAX));
            let len = be32_at(bd, 4) & 0x00FF_FFFF;
            (u64::from(be32_at(bd, 0)), short, len, 5)
        };
        if count != 0 && count != count_ok {
            return Err(Sense::invalid_param_field(at, None));
        }
        if len != self.block_size() {
            return Err(Sense::invalid_param_field(at + len_at, None));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockDescriptor {
    None,
    Short,
    Long,
}

impl BlockDescriptor {
    fn len(self) -> usize {
        match self {
            BlockDescriptor::None => 0,
            BlockDescriptor::Short => 8,
            BlockDescriptor::Long => 16,
        }
    }
}

/// The control page: fixed-format sense (D_SENSE 0), unrestricted command reordering
/// (queue algorithm modifier 1); nothing changeable.
fn control_page(pc: PageControl) -> [u8; CONTROL_LEN] {
    let mut p = [0u8; CONTROL_LEN];
    p[0] = PAGE_CONTROL;
    p[1] = (CONTROL_LEN - 2) as u8;
    if pc != PageControl::Changeable {
        p[3] = 0x10;
    }
    p
}
