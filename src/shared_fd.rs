//! [`SharedFd`]: an fd owned jointly by its holders and closed by the last,
//! like `Arc<OwnedFd>` but, for fd numbers below [`COUNTED_FDS`], without a
//! heap allocation: the holders' count lives in a static table indexed by
//! the fd number. A dma-buf and every mapping of it share one fd this way,
//! so an export allocates nothing and a close is the one `close(2)`; the
//! handles of an iommufd share its fd the same way, so an IOAS reaches it
//! without a pointer to chase.
//!
//! Why the table is sound: an fd number names one open file from the moment
//! the kernel returns it until `close` removes it. A slot is set when an
//! fd is wrapped and read only by holders of that fd, and the last holder
//! closes the fd after its count reaches zero, so the number cannot be
//! handed out again (and its slot set again) while any holder exists.
//! Larger fd numbers fall back to an `Arc<OwnedFd>`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering, fence};

/// How many fd numbers (0 up to this, exclusive) are counted in the table:
/// 256 KiB of zeroed static memory, of which only the pages of fds in use
/// are ever touched.
pub(crate) const COUNTED_FDS: usize = 1 << 16;

/// The holders of each counted fd; 0 for an fd no `SharedFd` holds.
static HOLDERS: [AtomicU32; COUNTED_FDS] = [const { AtomicU32::new(0) }; COUNTED_FDS];

/// More holders than this of one fd is a leak in the caller (each holder is
/// a live value); like `Arc`, the process aborts rather than wrap.
const MAX_HOLDERS: u32 = u32::MAX / 2;

/// An fd with shared ownership: `clone` adds a holder, `drop` removes one,
/// and the last holder's drop closes the fd.
#[derive(Debug, Clone)]
pub(crate) struct SharedFd(Holder);

#[derive(Debug, Clone)]
enum Holder {
    /// Counted in [`HOLDERS`].
    Counted(CountedFd),
    /// An fd number past the table.
    Boxed(Arc<OwnedFd>),
}

/// One holder of an fd counted in [`HOLDERS`].
#[derive(Debug)]
struct CountedFd {
    fd: RawFd,
    /// `HOLDERS[fd]`.
    holders: &'static AtomicU32,
}

/// The table's count of fd number `fd`, if the table has one.
#[inline]
fn table_slot(fd: RawFd) -> Option<&'static AtomicU32> {
    HOLDERS.get(usize::try_from(fd).ok()?)
}

impl SharedFd {
    /// Takes ownership of `fd`, as its only holder.
    #[inline]
    pub(crate) fn new(fd: OwnedFd) -> Self {
        match table_slot(fd.as_raw_fd()) {
            Some(holders) => {
                // We own this open fd, so nobody else reads or writes its
                // slot now.
                holders.store(1, Ordering::Relaxed);
                Self(Holder::Counted(CountedFd {
                    fd: fd.into_raw_fd(),
                    holders,
                }))
            }
            None => Self::boxed(fd),
        }
    }

    /// Takes ownership of `fd` in an `Arc`, as its only holder.
    fn boxed(fd: OwnedFd) -> Self {
        Self(Holder::Boxed(Arc::new(fd)))
    }

    /// The fd back, if this is its only holder; otherwise `self`.
    pub(crate) fn into_owned(self) -> Result<OwnedFd, Self> {
        match self.0 {
            Holder::Counted(counted) => counted
                .into_owned()
                .map_err(|counted| Self(Holder::Counted(counted))),
            Holder::Boxed(arc) => Arc::try_unwrap(arc).map_err(|arc| Self(Holder::Boxed(arc))),
        }
    }

    /// Whether `self` and `other` hold the same fd. While both exist the
    /// fd number names it: the number is not reused before the last holder
    /// closes it.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.as_raw_fd() == other.as_raw_fd()
    }

    /// How many holders the fd has.
    #[cfg(test)]
    pub(crate) fn holders(&self) -> usize {
        match &self.0 {
            Holder::Counted(counted) => counted.holders.load(Ordering::Relaxed) as usize,
            Holder::Boxed(arc) => Arc::strong_count(arc),
        }
    }
}

impl CountedFd {
    /// The fd, if this is its only holder.
    fn into_owned(self) -> Result<OwnedFd, Self> {
        if self
            .holders
            .compare_exchange(1, 0, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(self);
        }
        let fd = self.fd;
        // The count is 0 now: this holder must not decrement it again.
        std::mem::forget(self);
        // SAFETY: the count went from 1 (this holder) to 0, so the fd is
        // open and nobody else holds it: its ownership passes to the
        // `OwnedFd`.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

impl Clone for CountedFd {
    #[inline]
    fn clone(&self) -> Self {
        // Relaxed as in `Arc::clone`: the new holder comes from an existing
        // one, which keeps the fd open meanwhile.
        if self.holders.fetch_add(1, Ordering::Relaxed) > MAX_HOLDERS {
            std::process::abort();
        }
        Self {
            fd: self.fd,
            holders: self.holders,
        }
    }
}

impl Drop for CountedFd {
    #[inline]
    fn drop(&mut self) {
        if self.holders.fetch_sub(1, Ordering::Release) == 1 {
            // Every other holder's use of the fd happens before the close.
            fence(Ordering::Acquire);
            // SAFETY: the count just went from 1 to 0: this was the last
            // holder of the open fd, so this is its one close.
            drop(unsafe { OwnedFd::from_raw_fd(self.fd) });
        }
    }
}

impl AsFd for SharedFd {
    #[inline]
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.0 {
            // SAFETY: this holder is counted, so the fd stays open at least
            // as long as `self`, which the borrow cannot outlive.
            Holder::Counted(counted) => unsafe { BorrowedFd::borrow_raw(counted.fd) },
            Holder::Boxed(arc) => arc.as_fd(),
        }
    }
}

impl AsRawFd for SharedFd {
    #[inline]
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_open(fd: RawFd) -> bool {
        std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists()
    }

    fn memfd() -> OwnedFd {
        crate::memfd::Memfd::new("shared-fd-test", 4096)
            .expect("memfd")
            .into()
    }

    #[test]
    fn the_last_holder_closes() {
        let a = SharedFd::new(memfd());
        let raw = a.as_raw_fd();
        let b = a.clone();
        let c = b.clone();
        assert_eq!(a.holders(), 3);
        assert!(a.same_as(&c));
        let other = SharedFd::new(memfd());
        assert!(!a.same_as(&other));
        drop(a);
        drop(c);
        assert!(is_open(raw));
        assert_eq!(b.holders(), 1);
        drop(b);
        assert!(!is_open(raw));
    }

    /// `into_owned` gives the fd back only to its one holder, open.
    fn into_owned_only_for_the_only_holder(a: SharedFd) {
        let raw = a.as_raw_fd();
        let b = a.clone();
        assert_eq!(b.holders(), 2);
        let a = a.into_owned().expect_err("two holders");
        drop(b);
        let owned = a.into_owned().expect("one holder");
        assert_eq!(owned.as_raw_fd(), raw);
        assert!(is_open(raw));
        drop(owned);
        assert!(!is_open(raw));
    }

    #[test]
    fn a_counted_fd_comes_back_only_to_its_one_holder() {
        let a = SharedFd::new(memfd());
        assert!(matches!(a.0, Holder::Counted(_)));
        into_owned_only_for_the_only_holder(a);
    }

    #[test]
    fn a_boxed_fd_behaves_the_same() {
        let a = SharedFd::boxed(memfd());
        assert!(matches!(a.0, Holder::Boxed(_)));
        into_owned_only_for_the_only_holder(a);
    }

    #[test]
    fn only_fd_numbers_below_the_table_are_counted() {
        assert!(table_slot(0).is_some());
        #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
        let end = COUNTED_FDS as RawFd;
        assert!(table_slot(end - 1).is_some());
        assert!(table_slot(end).is_none());
        assert!(table_slot(-1).is_none());
    }

    #[test]
    fn holders_on_many_threads() {
        let a = SharedFd::new(memfd());
        let raw = a.as_raw_fd();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let mine = a.clone();
                s.spawn(move || {
                    for _ in 0..10_000 {
                        drop(mine.clone());
                    }
                    drop(mine);
                });
            }
        });
        assert_eq!(a.holders(), 1);
        drop(a);
        assert!(!is_open(raw));
    }
}
