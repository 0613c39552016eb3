//! Confinement for the worker's helper processes that parse guest data. Today: the boot
//! disk reader ([`crate::bootread`]).

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use anyhow::{Context, Result, bail};
use rustix::process::{Gid, Uid};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The user and group a confined helper runs as when started by root: nobody.
const NOBODY: u32 = 65534;

/// The system calls the boot disk reader may make once it reads the disk: read and write
/// the descriptors it has, seek and stat them, allocate and free memory, sleep (a test
/// hook), handle signals, exit.
const READER_SYSCALLS: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_close,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Confine this process as the boot disk reader and return the disk (its stdin). After
/// this it runs as nobody (when it was root), with no_new_privs, and any system call
/// outside [`READER_SYSCALLS`] kills it.
pub fn confine_reader() -> Result<std::fs::File> {
    // The uid and gid calls change only the calling thread: there must be no other.
    let threads = std::fs::read_dir("/proc/self/task")
        .context("cannot list this process's threads")?
        .count();
    if threads != 1 {
        bail!("the reader has {threads} threads; it must have one to drop privileges");
    }
    let disk = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("the reader was given no disk")?;
    if rustix::process::geteuid().is_root() {
        rustix::thread::set_thread_groups(&[]).context("cannot drop supplementary groups")?;
        let gid = Gid::from_raw(NOBODY);
        rustix::thread::set_thread_res_gid(gid, gid, gid).context("cannot become group nobody")?;
        let uid = Uid::from_raw(NOBODY);
        rustix::thread::set_thread_res_uid(uid, uid, uid).context("cannot become user nobody")?;
    }
    rustix::thread::set_no_new_privs(true).context("cannot set no_new_privs")?;
    let rules = READER_SYSCALLS
        .iter()
        .map(|&n| (n, Vec::new()))
        .collect::<BTreeMap<_, _>>();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .context("cannot build the seccomp filter")?;
    let prog: BpfProgram = filter
        .try_into()
        .context("cannot compile the seccomp filter")?;
    seccompiler::apply_filter(&prog).context("cannot apply the seccomp filter")?;
    Ok(std::fs::File::from(disk))
}
