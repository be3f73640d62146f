//! Whether the page cache holds a range of a file right now, asked with
//! `cachestat(2)` (Linux 6.5). A read of such a range by the kernel
//! (`sendfile`) does not wait for the disk, so it may run on an async
//! runtime's thread.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

/// `cachestat`'s number: syscalls added since Linux 5.1 have one number on
/// every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// Set once the kernel (or a seccomp filter) refused the call: every range
/// then counts as not resident.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// The kernel's `struct cachestat_range`.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// The kernel's `struct cachestat`.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Whether every page of `offset..offset + len` of `file` is in the page
/// cache at the moment of the call. `false` when the kernel cannot tell:
/// the answer only ever lets a caller take a faster path.
pub(crate) fn resident(file: &File, offset: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    let Some(last) = offset.checked_add(len - 1) else {
        return false;
    };
    let page = rustix::param::page_size() as u64;
    let pages = last / page - offset / page + 1;
    stat(file, offset, len).is_some_and(|stat| stat.nr_cache >= pages)
}

/// The pages of `offset..offset + len` of `file` that are dirty and not
/// yet being written back; `None` when the kernel cannot tell.
#[cfg(test)]
pub(crate) fn dirty(file: &File, offset: u64, len: u64) -> Option<u64> {
    stat(file, offset, len).map(|stat| stat.nr_dirty)
}

/// `cachestat` of `offset..offset + len` (`len` > 0); `None` when the
/// kernel cannot tell.
fn stat(file: &File, offset: u64, len: u64) -> Option<Cachestat> {
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    let mut range = CachestatRange { off: offset, len };
    let mut stat = Cachestat::default();
    // SAFETY: `cachestat(fd, range, stat, flags)` reads `range` and writes
    // `stat`, both live locals laid out as the kernel's structs for the
    // whole call; `file` keeps the descriptor open meanwhile.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &mut range as *mut CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if r != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        if matches!(errno, Some(libc::ENOSYS) | Some(libc::EPERM)) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        return None;
    }
    Some(stat)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn written_pages_are_resident_and_dropped_ones_are_not() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 1 << 20]).unwrap();
        assert!(resident(&file, 0, 1 << 20), "pages just written are cached");
        assert!(resident(&file, 4096 + 17, 100_000));
        assert!(!resident(&file, 0, 2 << 20), "pages past the end are not");
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        assert!(
            !resident(&file, 0, 1 << 20),
            "pages dropped from the cache are not"
        );
    }
}
