//! Guest memory as a device reaches it: by guest-physical address, or through a page list (a
//! GPA-direct packet's range, or one range of a GPADL). Every access is bounds-checked
//! against the list and against guest RAM; nothing the guest names can make the host touch
//! anything else.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Page size of page lists and GPADLs.
pub const PAGE: u64 = 4096;
/// Most pages one list may name (64 MiB): more than any Linux driver puts in one range.
pub const MAX_LIST_PAGES: usize = 16 * 1024;

/// A guest memory access that cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The address range is not guest RAM.
    #[error("{len} bytes at guest address {gpa:#x} are not guest RAM")]
    NotRam { gpa: u64, len: usize },
    /// Outside the list.
    #[error("{len} bytes at offset {at} are outside a {size}-byte page list")]
    OutOfRange { at: usize, len: usize, size: usize },
    /// A page list that does not describe its bytes.
    #[error("bad page list: {0}")]
    BadList(&'static str),
}

/// The guest's RAM, shared by every device of a partition.
#[derive(Debug, Clone)]
pub struct GuestMem(Arc<GuestMemoryMmap>);

impl GuestMem {
    pub fn new(mem: Arc<GuestMemoryMmap>) -> Self {
        GuestMem(mem)
    }

    /// The vm-memory view (for the ring layer).
    pub fn inner(&self) -> &Arc<GuestMemoryMmap> {
        &self.0
    }

    /// Copy guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemError::NotRam {
                gpa,
                len: buf.len(),
            })
    }

    /// Copy `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemError> {
        self.0
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| MemError::NotRam {
                gpa,
                len: data.len(),
            })
    }
}

/// `len` bytes in guest pages, starting `offset` bytes into the first one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageList {
    offset: u32,
    len: u32,
    pfns: Vec<u64>,
}

impl PageList {
    /// Check a list as the guest gave it: the offset lies in the first page, the pages hold
    /// every byte, and no page number overflows an address.
    pub fn new(offset: u32, len: u32, pfns: Vec<u64>) -> Result<Self, MemError> {
        if u64::from(offset) >= PAGE {
            return Err(MemError::BadList("the offset is not inside the first page"));
        }
        if pfns.len() > MAX_LIST_PAGES {
            return Err(MemError::BadList("too many pages"));
        }
        let need = (u64::from(offset) + u64::from(len)).div_ceil(PAGE);
        if (pfns.len() as u64) < need {
            return Err(MemError::BadList("fewer pages than its bytes need"));
        }
        if pfns.iter().any(|p| p.checked_mul(PAGE).is_none()) {
            return Err(MemError::BadList("a page number beyond the address space"));
        }
        Ok(PageList { offset, len, pfns })
    }

    /// Bytes in the list.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The list's page numbers.
    pub fn pfns(&self) -> &[u64] {
        &self.pfns
    }

    /// Offset into the first page.
    pub fn offset(&self) -> u32 {
        self.offset
    }

    /// Run `f(gpa, from, to)` over the guest pieces holding bytes `at..at + len` of the list
    /// (`from..to` within those bytes).
    fn pieces(
        &self,
        at: usize,
        len: usize,
        mut f: impl FnMut(u64, usize, usize) -> Result<(), MemError>,
    ) -> Result<(), MemError> {
        let end = at.checked_add(len).filter(|e| *e <= self.len());
        if end.is_none() {
            return Err(MemError::OutOfRange {
                at,
                len,
                size: self.len(),
            });
        }
        let mut done = 0;
        while done < len {
            let pos = self.offset as usize + at + done;
            let page = pos / PAGE as usize;
            let in_page = pos % PAGE as usize;
            let n = (PAGE as usize - in_page).min(len - done);
            // `new` checked that the pages cover every byte and that no address overflows.
            let gpa = self.pfns[page] * PAGE + in_page as u64;
            f(gpa, done, done + n)?;
            done += n;
        }
        Ok(())
    }

    /// Copy bytes `at..at + buf.len()` of the list into `buf`.
    pub fn read(&self, mem: &GuestMem, at: usize, buf: &mut [u8]) -> Result<(), MemError> {
        self.pieces(at, buf.len(), |gpa, a, b| mem.read(gpa, &mut buf[a..b]))
    }

    /// Copy `data` into bytes `at..at + data.len()` of the list.
    pub fn write(&self, mem: &GuestMem, at: usize, data: &[u8]) -> Result<(), MemError> {
        self.pieces(at, data.len(), |gpa, a, b| mem.write(gpa, &data[a..b]))
    }
}

/// A GPADL: guest memory the guest described to the host once (its ranges, in order) and
/// names by id afterwards: a channel's rings, or a buffer a device shares with its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpadl {
    ranges: Vec<PageList>,
    len: usize,
}

impl Gpadl {
    pub fn new(ranges: Vec<PageList>) -> Self {
        let len = ranges.iter().map(PageList::len).sum();
        Gpadl { ranges, len }
    }

    /// Bytes in all ranges.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every page of every range, in order (a ring GPADL is whole pages).
    pub fn pfns(&self) -> Vec<u64> {
        self.ranges
            .iter()
            .flat_map(|r| r.pfns().iter().copied())
            .collect()
    }

    /// Run `f(range, at_in_range, from, to)` over the ranges holding bytes `at..at + len`.
    fn pieces(
        &self,
        at: usize,
        len: usize,
        mut f: impl FnMut(&PageList, usize, usize, usize) -> Result<(), MemError>,
    ) -> Result<(), MemError> {
        if at.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(MemError::OutOfRange {
                at,
                len,
                size: self.len,
            });
        }
        let (mut start, mut done) = (0usize, 0usize);
        for r in &self.ranges {
            let end = start + r.len();
            let pos = at + done;
            if done < len && pos < end {
                let n = (end - pos).min(len - done);
                f(r, pos - start, done, done + n)?;
                done += n;
            }
            start = end;
        }
        Ok(())
    }

    /// Copy bytes `at..at + buf.len()` into `buf`.
    pub fn read(&self, mem: &GuestMem, at: usize, buf: &mut [u8]) -> Result<(), MemError> {
        self.pieces(at, buf.len(), |r, o, a, b| r.read(mem, o, &mut buf[a..b]))
    }

    /// Copy `data` into bytes `at..at + data.len()`.
    pub fn write(&self, mem: &GuestMem, at: usize, data: &[u8]) -> Result<(), MemError> {
        self.pieces(at, data.len(), |r, o, a, b| r.write(mem, o, &data[a..b]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        GuestMem::new(Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 * PAGE as usize)]).unwrap(),
        ))
    }

    #[test]
    fn lists_cross_scattered_pages() {
        let m = mem();
        // 6000 bytes from offset 3000 of page 7, then pages 2 and 9.
        let l = PageList::new(3000, 6000, vec![7, 2, 9]).unwrap();
        let data: Vec<u8> = (0..6000u32).map(|i| (i * 7) as u8).collect();
        l.write(&m, 0, &data).unwrap();
        let mut back = vec![0u8; 6000];
        l.read(&m, 0, &mut back).unwrap();
        assert_eq!(back, data);
        // Where the bytes went: 1096 at the end of page 7, 4096 in page 2, the rest in 9.
        let mut b = [0u8; 1];
        m.read(7 * PAGE + 3000, &mut b).unwrap();
        assert_eq!(b[0], data[0]);
        m.read(2 * PAGE, &mut b).unwrap();
        assert_eq!(b[0], data[1096]);
        m.read(9 * PAGE, &mut b).unwrap();
        assert_eq!(b[0], data[1096 + 4096]);
        let mut part = [0u8; 10];
        l.read(&m, 1090, &mut part).unwrap();
        assert_eq!(&part, &data[1090..1100]);
    }

    #[test]
    fn gpadls_run_their_ranges_together() {
        let m = mem();
        let g = Gpadl::new(vec![
            PageList::new(100, 50, vec![4]).unwrap(),
            PageList::new(0, 8192, vec![5, 6]).unwrap(),
        ]);
        assert_eq!(g.len(), 8242);
        assert_eq!(g.pfns(), vec![4, 5, 6]);
        let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        g.write(&m, 20, &data).unwrap();
        let mut b = [0u8; 1];
        m.read(4 * PAGE + 120, &mut b).unwrap();
        assert_eq!(b[0], 0);
        m.read(5 * PAGE, &mut b).unwrap();
        assert_eq!(b[0], 30, "the first range holds 30 of the bytes");
        let mut back = vec![0u8; 200];
        g.read(&m, 20, &mut back).unwrap();
        assert_eq!(back, data);
        assert!(g.read(&m, 8200, &mut [0u8; 43]).is_err());
    }

    #[test]
    fn hostile_lists_and_accesses_are_refused() {
        let m = mem();
        assert!(PageList::new(4096, 1, vec![1]).is_err());
        assert!(
            PageList::new(100, 4000, vec![1]).is_err(),
            "needs two pages"
        );
        assert!(PageList::new(0, 1, vec![u64::MAX]).is_err());
        assert!(PageList::new(0, 0, vec![0; MAX_LIST_PAGES + 1]).is_err());
        let l = PageList::new(0, 100, vec![3]).unwrap();
        let mut buf = [0u8; 10];
        assert!(matches!(
            l.read(&m, 95, &mut buf),
            Err(MemError::OutOfRange { .. })
        ));
        assert!(l.read(&m, usize::MAX, &mut buf).is_err());
        // A page beyond guest RAM.
        let far = PageList::new(0, 10, vec![1 << 30]).unwrap();
        assert!(matches!(
            far.read(&m, 0, &mut buf),
            Err(MemError::NotRam { .. })
        ));
    }
}
