//! Running SCSI commands against guest memory: the data buffer of an SRB is one or more page
//! lists (GPA-direct ranges), copied through a host buffer into and out of the disk. Disk
//! commands run on a small pool of I/O threads per controller so a queue depth of 32 keeps
//! 32 commands in flight; the channel thread only parses, dispatches and sends completions.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use scsi_disk::{Outcome, ScsiDisk, ScsiStatus};
use vmbus_core::{GuestMem, MemError, PageList, Wakeup};

use crate::protocol::{self, Direction, PACKET_LEN, Srb, SrbResult, srb_status};

/// Bytes a page-list sequence holds.
pub(crate) fn total_len(lists: &[PageList]) -> usize {
    lists.iter().map(PageList::len).sum()
}

/// Copy the first `buf.len()` bytes of `lists` into `buf`.
pub(crate) fn read_lists(
    mem: &GuestMem,
    lists: &[PageList],
    buf: &mut [u8],
) -> Result<(), MemError> {
    let mut pos = 0;
    for l in lists {
        if pos == buf.len() {
            break;
        }
        let n = l.len().min(buf.len() - pos);
        l.read(mem, 0, &mut buf[pos..pos + n])?;
        pos += n;
    }
    Ok(())
}

/// Copy `data` into the front of `lists`.
pub(crate) fn write_lists(mem: &GuestMem, lists: &[PageList], data: &[u8]) -> Result<(), MemError> {
    let mut pos = 0;
    for l in lists {
        if pos == data.len() {
            break;
        }
        let n = l.len().min(data.len() - pos);
        l.write(mem, 0, &data[pos..pos + n])?;
        pos += n;
    }
    Ok(())
}

/// The SRB result of a SCSI outcome.
pub(crate) fn srb_result(o: &Outcome, dir: Direction) -> SrbResult {
    match o.status {
        ScsiStatus::Good => SrbResult {
            srb_status: srb_status::SUCCESS,
            scsi_status: 0,
            transferred: match dir {
                Direction::In => o.data_in_len,
                Direction::Out => o.data_out_len,
                Direction::None => 0,
            } as u32,
            sense: None,
        },
        ScsiStatus::CheckCondition => SrbResult {
            srb_status: srb_status::ERROR,
            scsi_status: ScsiStatus::CheckCondition.code(),
            transferred: 0,
            sense: o.sense_data().map(|s| s.to_vec()),
        },
    }
}

/// Run `exec` for an SRB whose data buffer is `lists` (`srb.transfer_len` bytes of it),
/// moving the data through `buf`. `exec` gets (data_out, data_in).
pub(crate) fn run_srb(
    mem: &GuestMem,
    srb: &Srb,
    lists: &[PageList],
    buf: &mut Vec<u8>,
    exec: impl FnOnce(&[u8], &mut [u8]) -> Outcome,
) -> Result<SrbResult, MemError> {
    let len = srb.transfer_len as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    let data = &mut buf[..len];
    let outcome = match srb.direction {
        Direction::Out => {
            read_lists(mem, lists, data)?;
            exec(data, &mut [])
        }
        Direction::In => {
            let o = exec(&[], data);
            write_lists(mem, lists, &data[..o.data_in_len])?;
            o
        }
        Direction::None => exec(&[], &mut []),
    };
    Ok(srb_result(&outcome, srb.direction))
}

/// One disk command for the pool.
pub(crate) struct Job {
    pub trans_id: u64,
    pub srb: Srb,
    pub lists: Vec<PageList>,
    pub disk: Arc<ScsiDisk>,
    pub mem: GuestMem,
    pub generation: u64,
}

/// A finished command.
pub(crate) enum Done {
    /// Send this completion.
    Complete {
        trans_id: u64,
        packet: [u8; PACKET_LEN],
    },
    /// The guest named memory that is not RAM: give up on the channel.
    Fault(MemError),
}

/// Run a disk command.
pub(crate) fn execute(job: &Job, buf: &mut Vec<u8>) -> Done {
    let disk = &job.disk;
    match run_srb(&job.mem, &job.srb, &job.lists, buf, |out, inp| {
        disk.execute(job.srb.cdb(), out, inp)
    }) {
        Ok(r) => Done::Complete {
            trans_id: job.trans_id,
            packet: protocol::complete_srb(&job.srb, &r),
        },
        Err(e) => Done::Fault(e),
    }
}

/// Most commands queued or running per controller; the channel thread waits for room
/// (Linux keeps fewer than this outstanding per channel).
pub(crate) const MAX_IN_FLIGHT: usize = 1024;

#[derive(Default)]
struct Work {
    queue: VecDeque<Job>,
    /// Queued plus running.
    in_flight: usize,
    done: Vec<Done>,
    /// Completions of an older channel generation are dropped.
    generation: u64,
    stop: bool,
}

/// The I/O threads of one controller and what they share with its channel thread.
pub(crate) struct Pool {
    work: Mutex<Work>,
    more: Condvar,
    less: Condvar,
    wakeup: Arc<Wakeup>,
}

impl Pool {
    pub(crate) fn new(wakeup: Arc<Wakeup>) -> Self {
        Pool {
            work: Mutex::new(Work::default()),
            more: Condvar::new(),
            less: Condvar::new(),
            wakeup,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Work> {
        self.work.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start `n` I/O threads named after `name`.
    pub(crate) fn spawn(self: &Arc<Self>, name: &str, n: usize) -> std::io::Result<()> {
        for i in 0..n {
            let pool = self.clone();
            std::thread::Builder::new()
                .name(format!("{name}-io{i}"))
                .spawn(move || pool.worker())?;
        }
        Ok(())
    }

    fn worker(&self) {
        let mut buf = Vec::new();
        loop {
            let job = {
                let mut w = self.lock();
                loop {
                    if let Some(j) = w.queue.pop_front() {
                        break j;
                    }
                    if w.stop {
                        return;
                    }
                    w = self.more.wait(w).unwrap_or_else(|e| e.into_inner());
                }
            };
            let done = execute(&job, &mut buf);
            let generation = job.generation;
            drop(job);
            // A 2 MiB buffer per thread at most; shrink after an unusually large command.
            if buf.len() > scsi_disk::MAX_TRANSFER_BYTES {
                buf = Vec::new();
            }
            let mut w = self.lock();
            w.in_flight -= 1;
            // A reset while the job ran: its channel is gone.
            if w.generation == generation {
                w.done.push(done);
            }
            drop(w);
            self.less.notify_all();
            self.wakeup.signal();
        }
    }

    /// The current generation (jobs carry it).
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Queue a job, waiting while [`MAX_IN_FLIGHT`] are outstanding.
    pub(crate) fn submit(&self, job: Job) {
        let mut w = self.lock();
        while w.in_flight >= MAX_IN_FLIGHT && !w.stop {
            w = self.less.wait(w).unwrap_or_else(|e| e.into_inner());
        }
        if job.generation != w.generation {
            return;
        }
        w.in_flight += 1;
        w.queue.push_back(job);
        drop(w);
        self.more.notify_one();
    }

    /// Take the finished commands.
    pub(crate) fn take_done(&self) -> Vec<Done> {
        std::mem::take(&mut self.lock().done)
    }

    /// Wait until nothing is queued or running (at most `timeout`); whether that happened.
    pub(crate) fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut w = self.lock();
        while w.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            w = self
                .less
                .wait_timeout(w, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The channel closed: drop queued commands and everything not yet sent; commands
    /// still running finish, but their completions are dropped.
    pub(crate) fn reset(&self) {
        let mut w = self.lock();
        let dropped = w.queue.len();
        w.queue.clear();
        w.in_flight -= dropped;
        w.done.clear();
        w.generation += 1;
        drop(w);
        self.less.notify_all();
    }

    /// Stop the threads once the queue is empty.
    pub(crate) fn stop(&self) {
        self.lock().stop = true;
        self.more.notify_all();
        self.less.notify_all();
    }
}
