//! Named dirty bitmaps on a node, with QEMU's states and rules.
//!
//! A node owns a list of bitmaps behind one lock. Each bitmap is recording
//! (enabled) or disabled; it may be *busy* (used by a job: no monitor command
//! may touch it), *readonly* (loaded from a read-only image), *inconsistent*
//! (a persistent bitmap that was not saved cleanly: it can only be removed),
//! and *persistent* (saved with the image). A job that must not lose writes
//! while it consumes a bitmap gives it a *successor*: an anonymous bitmap
//! that records in its place; on success the successor takes over the name
//! (*abdicate*), on failure it is merged back (*reclaim*).
//!
//! Guarantee: every write that reaches [`Bitmaps::mark`] is recorded in
//! every bitmap that is recording at that moment, and in every successor
//! that is enabled, so a bitmap is a superset of the writes made while it
//! recorded.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use hbitmap::HBitmap;

use crate::error::{Error, Result};

/// Longest bitmap name, in bytes (QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`).
pub const MAX_BITMAP_NAME: usize = 1023;
/// Smallest granularity in bytes.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity in bytes.
pub const MAX_GRANULARITY: u64 = 1 << 31;

/// Identifies a bitmap on its node for as long as it exists, named or not;
/// jobs hold these for the anonymous bitmaps they create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BitmapId(u64);

/// What a query reports about a named bitmap (QEMU's `BlockDirtyInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The name.
    pub name: String,
    /// Dirty bytes as QEMU counts them: dirty granules × granularity.
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether writes are being recorded (by the bitmap or its successor).
    pub recording: bool,
    /// Whether a job is using it.
    pub busy: bool,
    /// Whether it is saved with the image.
    pub persistent: bool,
    /// Whether it was not saved cleanly and cannot be used.
    pub inconsistent: bool,
}

/// The old contents of a cleared bitmap, for undoing the clear when a
/// transaction aborts.
#[derive(Debug)]
pub struct ClearUndo {
    id: BitmapId,
    old: HBitmap,
}

/// The saved state of a bitmap being loaded, for [`Bitmaps::add_loaded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadedState {
    /// Not recording writes.
    pub disabled: bool,
    /// From a read-only image: must not be modified.
    pub readonly: bool,
    /// Saved with the image.
    pub persistent: bool,
    /// Not saved cleanly: unusable, may only be removed.
    pub inconsistent: bool,
}

/// A persistent bitmap as a driver stores it.
#[derive(Debug)]
pub(crate) struct Saved {
    pub name: String,
    pub bits: HBitmap,
    /// Recording writes: stored with QEMU's `auto` flag.
    pub recording: bool,
    /// Not loaded cleanly: stored still marked in use.
    pub inconsistent: bool,
}

/// Which states a command refuses (QEMU's `BDRV_BITMAP_*` check flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Refuse busy, readonly and inconsistent bitmaps: commands that modify.
    Default,
    /// Refuse busy and inconsistent bitmaps: commands that only read, or
    /// only change the recording state.
    AllowReadonly,
    /// Refuse busy and readonly bitmaps: removal, which is how an
    /// inconsistent bitmap is disposed of.
    AllowInconsistent,
}

#[derive(Debug)]
struct Bitmap {
    id: BitmapId,
    name: Option<String>,
    bits: HBitmap,
    disabled: bool,
    busy: bool,
    readonly: bool,
    persistent: bool,
    inconsistent: bool,
    successor: Option<Box<Bitmap>>,
}

impl Bitmap {
    fn new(id: BitmapId, name: Option<&str>, bits: HBitmap, state: LoadedState) -> Bitmap {
        Bitmap {
            id,
            name: name.map(str::to_owned),
            bits,
            disabled: state.disabled,
            busy: false,
            readonly: state.readonly,
            persistent: state.persistent,
            inconsistent: state.inconsistent,
            successor: None,
        }
    }

    fn recording(&self) -> bool {
        !self.disabled || self.successor.as_ref().is_some_and(|s| !s.disabled)
    }

    fn check(&self, check: Check) -> Result<()> {
        let name = || self.name.clone().unwrap_or_default();
        if self.busy {
            return Err(Error::BitmapBusy(name()));
        }
        if self.readonly && check != Check::AllowReadonly {
            return Err(Error::BitmapReadonly(name()));
        }
        if self.inconsistent && check != Check::AllowInconsistent {
            return Err(Error::BitmapInconsistent(name()));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct List {
    /// Newest first, as QEMU lists them.
    bitmaps: Vec<Bitmap>,
    next_id: u64,
}

impl List {
    fn new_id(&mut self) -> BitmapId {
        self.next_id += 1;
        BitmapId(self.next_id)
    }

    fn named(&mut self, name: &str) -> Result<&mut Bitmap> {
        self.bitmaps
            .iter_mut()
            .find(|b| b.name.as_deref() == Some(name))
            .ok_or_else(|| Error::BitmapNotFound(name.to_owned()))
    }

    fn named_ref(&self, name: &str) -> Result<&Bitmap> {
        self.bitmaps
            .iter()
            .find(|b| b.name.as_deref() == Some(name))
            .ok_or_else(|| Error::BitmapNotFound(name.to_owned()))
    }

    fn by_id(&mut self, id: BitmapId) -> Option<&mut Bitmap> {
        self.bitmaps.iter_mut().find(|b| b.id == id)
    }

    fn by_id_ref(&self, id: BitmapId) -> Option<&Bitmap> {
        self.bitmaps.iter().find(|b| b.id == id)
    }

    /// Puts a new bitmap first in the list, refusing a taken name.
    fn insert(
        &mut self,
        name: Option<&str>,
        bits: HBitmap,
        state: LoadedState,
    ) -> Result<BitmapId> {
        if let Some(name) = name {
            if self.bitmaps.iter().any(|b| b.name.as_deref() == Some(name)) {
                return Err(Error::BitmapExists(name.to_owned()));
            }
        }
        let id = self.new_id();
        self.bitmaps.insert(0, Bitmap::new(id, name, bits, state));
        Ok(id)
    }
}

/// The bitmaps of one node. All methods lock briefly and never wait for I/O.
#[derive(Debug)]
pub struct Bitmaps {
    node: String,
    length: u64,
    default_granularity: u64,
    /// Writers mark under the read side (marking is lock-free inside);
    /// everything that changes the list or clears bits takes the write side.
    list: RwLock<List>,
    /// Whether some bitmap is readonly: then the node refuses writes.
    has_readonly: AtomicBool,
    /// Whether the node's driver stores persistent bitmaps.
    persistence: AtomicBool,
    /// Whether some bitmap is persistent.
    has_persistent: AtomicBool,
    /// Bumped, under the lock, by every change other than marking: a write
    /// that sees the same value before and after it ran knows that nothing
    /// cleared its bits meanwhile, and can skip its second mark.
    epoch: AtomicU64,
}

/// What [`Bitmaps::mark`] saw, for [`Bitmaps::mark_again`].
#[derive(Debug, Clone, Copy)]
pub struct MarkTicket(u64);

impl Bitmaps {
    /// Bitmaps for node `node` of `length` bytes, whose default granularity
    /// derives from the node's cluster size: clamped to 4..=64 KiB, 64 KiB
    /// when unknown.
    pub fn new(node: &str, length: u64, cluster_size: Option<u64>) -> Bitmaps {
        Bitmaps {
            node: node.to_owned(),
            length,
            default_granularity: cluster_size.map_or(1 << 16, |c| c.clamp(1 << 12, 1 << 16)),
            list: RwLock::new(List::default()),
            has_readonly: AtomicBool::new(false),
            persistence: AtomicBool::new(false),
            has_persistent: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        }
    }

    /// Lets `persistent` bitmaps be added: the node's driver stores them.
    pub(crate) fn allow_persistence(&self) {
        self.persistence.store(true, Ordering::Release);
    }

    /// The names of the persistent bitmaps, sorted.
    pub(crate) fn persistent_names(&self) -> Vec<String> {
        let list = self.read();
        let mut names: Vec<String> = list
            .bitmaps
            .iter()
            .filter(|b| b.persistent)
            .filter_map(|b| b.name.clone())
            .collect();
        names.sort();
        names
    }

    /// What a driver stores at close: every persistent named bitmap, with
    /// the writes its successor recorded merged in (a superset is safe).
    pub(crate) fn to_store(&self) -> Result<Vec<Saved>> {
        let list = self.read();
        let mut out = Vec::new();
        for bm in list.bitmaps.iter().filter(|b| b.persistent) {
            let Some(name) = bm.name.clone() else {
                continue;
            };
            let mut bits = bm.bits.try_clone()?;
            if let Some(s) = &bm.successor {
                bits.merge(&s.bits)?;
            }
            out.push(Saved {
                name,
                bits,
                recording: bm.recording(),
                inconsistent: bm.inconsistent,
            });
        }
        Ok(out)
    }

    /// Whether some bitmap is readonly. Writes to the node must then fail,
    /// as in QEMU: the image and its bitmaps stay unchanged.
    pub fn has_readonly(&self) -> bool {
        self.has_readonly.load(Ordering::Acquire)
    }

    /// Refreshes the flags writers read without the lock.
    fn update_flags(&self, list: &List) {
        let any = list.bitmaps.iter().any(|b| b.readonly);
        self.has_readonly.store(any, Ordering::Release);
        let any = list.bitmaps.iter().any(|b| b.persistent);
        self.has_persistent.store(any, Ordering::Release);
    }

    /// Whether some bitmap is persistent: then writes pass the driver's
    /// activity log before they are issued.
    pub fn has_persistent(&self) -> bool {
        self.has_persistent.load(Ordering::Acquire)
    }

    /// Shared access: marking and queries.
    fn read(&self) -> RwLockReadGuard<'_, List> {
        // A panic while holding the lock cannot leave a bitmap half-updated
        // in a way that loses writes (HBitmap keeps its invariants per call),
        // so a poisoned lock is still usable.
        self.list.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Exclusive access for any change: bits may be cleared, bitmaps may
    /// appear, start recording or change hands, so writes in flight must mark
    /// again (the epoch tells them).
    fn lock_mut(&self) -> RwLockWriteGuard<'_, List> {
        let list = self.list.write().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        list
    }

    /// The granularity a new bitmap gets when none is asked for.
    pub fn default_granularity(&self) -> u64 {
        self.default_granularity
    }

    /// Records a write-type request on `offset..offset + len` in every
    /// recording bitmap and enabled successor, before it is issued. Ranges
    /// past the end are clipped. Pass the ticket to
    /// [`mark_again`](Self::mark_again) when the request has completed.
    pub fn mark(&self, offset: u64, len: u64) -> MarkTicket {
        let list = self.read();
        let ticket = MarkTicket(self.epoch.load(Ordering::SeqCst));
        self.mark_locked(list, offset, len);
        ticket
    }

    /// Records a completed write-type request again, unless nothing but
    /// marking happened to the bitmaps since [`mark`](Self::mark): then its
    /// bits are still set. This second mark makes sure that a job which
    /// cleared a bit and read the old data sees the bit again.
    pub fn mark_again(&self, offset: u64, len: u64, ticket: MarkTicket) {
        if self.epoch.load(Ordering::SeqCst) != ticket.0 {
            self.mark_locked(self.read(), offset, len);
        }
    }

    fn mark_locked(&self, list: RwLockReadGuard<'_, List>, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.length);
        if offset >= end {
            return;
        }
        for bm in &list.bitmaps {
            if !bm.disabled {
                // In range by the clipping above; lengths match the node.
                let _ = bm.bits.mark(offset, end - offset);
            }
            if let Some(s) = bm.successor.as_deref().filter(|s| !s.disabled) {
                let _ = s.bits.mark(offset, end - offset);
            }
        }
    }

    /// Adds a named bitmap (`block-dirty-bitmap-add`). `granularity` in
    /// bytes, the default when `None`.
    pub fn add(
        &self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::BitmapNameEmpty);
        }
        let granularity = match granularity {
            Some(g)
                if !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) || !g.is_power_of_two() =>
            {
                return Err(Error::BitmapGranularity);
            }
            Some(g) => g,
            None => self.default_granularity,
        };
        if persistent && !self.persistence.load(Ordering::Acquire) {
            return Err(Error::PersistenceUnsupported(self.node.clone()));
        }
        // QEMU's limit on the stored bits of one bitmap (qcow2's
        // `BME_MAX_PHYS_SIZE`); every store of ours is qcow2.
        if persistent && self.length.div_ceil(granularity).div_ceil(8) > 512 << 20 {
            return Err(Error::BitmapTooLarge {
                name: name.to_owned(),
                node: self.node.clone(),
            });
        }
        if name.len() > MAX_BITMAP_NAME {
            return Err(Error::BitmapNameTooLong(name.to_owned()));
        }
        let bits = HBitmap::new(self.length, granularity.trailing_zeros())?;
        let state = LoadedState {
            disabled,
            persistent,
            ..LoadedState::default()
        };
        let mut list = self.lock_mut();
        list.insert(Some(name), bits, state)?;
        self.update_flags(&list);
        Ok(())
    }

    /// Adds a bitmap loaded from storage (a qcow2 bitmap directory, a
    /// bitmirror bitmap store), with the state it was saved in. The bits must
    /// cover the node's length.
    pub fn add_loaded(&self, name: &str, bits: HBitmap, state: LoadedState) -> Result<()> {
        if bits.len() != self.length {
            return Err(Error::BitmapSizeMismatch {
                dest: self.length,
                src: bits.len(),
            });
        }
        let mut list = self.lock_mut();
        list.insert(Some(name), bits, state)?;
        self.update_flags(&list);
        Ok(())
    }

    /// Adds an anonymous, recording bitmap for a job; it is invisible to
    /// queries and to name lookups.
    pub fn add_anonymous(&self, granularity: u64) -> Result<BitmapId> {
        if granularity < MIN_GRANULARITY || !granularity.is_power_of_two() {
            return Err(Error::BitmapGranularity);
        }
        let bits = HBitmap::new(self.length, granularity.trailing_zeros())?;
        self.lock_mut().insert(None, bits, LoadedState::default())
    }

    /// Drops an anonymous bitmap; unknown ids are ignored.
    pub fn remove_anonymous(&self, id: BitmapId) {
        self.lock_mut().bitmaps.retain(|b| b.id != id);
    }

    /// Removes a named bitmap (`block-dirty-bitmap-remove`): refused while
    /// busy or readonly; inconsistent ones may go.
    pub fn remove(&self, name: &str) -> Result<()> {
        let mut list = self.lock_mut();
        list.named(name)?.check(Check::AllowInconsistent)?;
        list.bitmaps.retain(|b| b.name.as_deref() != Some(name));
        self.update_flags(&list);
        Ok(())
    }

    /// Clears a named bitmap (`block-dirty-bitmap-clear`) and returns what
    /// [`restore`](Self::restore) needs to undo it.
    pub fn clear(&self, name: &str) -> Result<ClearUndo> {
        let mut list = self.lock_mut();
        let bm = list.named(name)?;
        bm.check(Check::Default)?;
        let mut old = HBitmap::new(bm.bits.len(), bm.bits.granularity())?;
        std::mem::swap(&mut old, &mut bm.bits);
        Ok(ClearUndo { id: bm.id, old })
    }

    /// Undoes a [`clear`](Self::clear). Writes recorded since the clear are
    /// kept (QEMU drops them): the result is the old bits plus the new.
    pub fn restore(&self, undo: ClearUndo) {
        let mut list = self.lock_mut();
        if let Some(bm) = list.by_id(undo.id) {
            // Same length and granularity: it was this bitmap's.
            let _ = bm.bits.merge(&undo.old);
        }
    }

    /// [`merge`](Self::merge) into `target`, returning what
    /// [`revert`](Self::revert) needs to undo it (a transaction's abort).
    pub fn merge_undoable(&self, target: &str, sources: &[HBitmap]) -> Result<ClearUndo> {
        let (id, old) = {
            let list = self.read();
            let bm = list.named_ref(target)?;
            bm.check(Check::Default)?;
            (bm.id, bm.bits.try_clone()?)
        };
        self.merge(target, sources)?;
        Ok(ClearUndo { id, old })
    }

    /// Puts back the bits a [`merge_undoable`](Self::merge_undoable) (or a
    /// [`clear`](Self::clear)) replaced, exactly: bits recorded since are
    /// dropped, so the caller must have held the node's writes since (a
    /// transaction does), or the bitmap could miss a write.
    pub fn revert(&self, undo: ClearUndo) {
        let mut list = self.lock_mut();
        if let Some(bm) = list.by_id(undo.id) {
            bm.bits = undo.old;
        }
    }

    /// Starts recording (`block-dirty-bitmap-enable`).
    pub fn enable(&self, name: &str) -> Result<()> {
        self.set_disabled(name, false)
    }

    /// Stops recording (`block-dirty-bitmap-disable`).
    pub fn disable(&self, name: &str) -> Result<()> {
        self.set_disabled(name, true)
    }

    fn set_disabled(&self, name: &str, disabled: bool) -> Result<()> {
        let mut list = self.lock_mut();
        let bm = list.named(name)?;
        bm.check(Check::AllowReadonly)?;
        bm.disabled = disabled;
        Ok(())
    }

    /// A copy of a named bitmap's bits, for merging elsewhere or inspecting;
    /// refused while busy or inconsistent.
    pub fn snapshot(&self, name: &str) -> Result<HBitmap> {
        let list = self.read();
        let bm = list.named_ref(name)?;
        bm.check(Check::AllowReadonly)?;
        Ok(bm.bits.try_clone()?)
    }

    /// Checks that `name` exists and passes `check`, without changing it.
    pub fn check(&self, name: &str, check: Check) -> Result<()> {
        self.read().named_ref(name)?.check(check)
    }

    /// ORs `sources` (snapshots, possibly from other nodes of the same size,
    /// at any granularity) into the named bitmap (`block-dirty-bitmap-merge`).
    /// Nothing changes unless every source fits.
    pub fn merge(&self, target: &str, sources: &[HBitmap]) -> Result<()> {
        let mut list = self.lock_mut();
        let bm = list.named(target)?;
        bm.check(Check::Default)?;
        if let Some(src) = sources.iter().find(|s| s.len() != self.length) {
            return Err(Error::BitmapSizeMismatch {
                dest: self.length,
                src: src.len(),
            });
        }
        for src in sources {
            bm.bits.merge(src)?;
        }
        Ok(())
    }

    /// Marks a named bitmap busy or not (a job takes or releases it).
    pub fn set_busy(&self, name: &str, busy: bool) -> Result<()> {
        self.lock_mut().named(name)?.busy = busy;
        Ok(())
    }

    /// Gives a named bitmap a successor that records in its place: the
    /// successor is enabled iff the bitmap was; the bitmap becomes disabled
    /// and busy.
    pub fn create_successor(&self, name: &str) -> Result<()> {
        let mut list = self.lock_mut();
        let id = list.new_id();
        let bm = list.named(name)?;
        if bm.busy {
            return Err(Error::SuccessorOfBusy);
        }
        if bm.successor.is_some() {
            return Err(Error::SuccessorExists);
        }
        let bits = HBitmap::new(bm.bits.len(), bm.bits.granularity())?;
        let state = LoadedState {
            disabled: bm.disabled,
            ..LoadedState::default()
        };
        bm.successor = Some(Box::new(Bitmap::new(id, None, bits, state)));
        bm.disabled = true;
        bm.busy = true;
        Ok(())
    }

    /// On success of the operation: the successor takes the bitmap's name and
    /// persistence, and the old bits are dropped.
    pub fn abdicate(&self, name: &str) -> Result<()> {
        let mut list = self.lock_mut();
        let bm = list.named(name)?;
        let Some(mut successor) = bm.successor.take() else {
            return Err(Error::NoSuccessor("relinquish control"));
        };
        successor.name = bm.name.take();
        successor.persistent = bm.persistent;
        *bm = *successor;
        Ok(())
    }

    /// On failure of the operation: the successor's bits are merged back, the
    /// bitmap takes the successor's recording state and is no longer busy.
    pub fn reclaim(&self, name: &str) -> Result<()> {
        let mut list = self.lock_mut();
        let bm = list.named(name)?;
        let Some(successor) = bm.successor.take() else {
            return Err(Error::NoSuccessor("reclaim a successor"));
        };
        bm.bits.merge(&successor.bits)?;
        bm.disabled = successor.disabled;
        bm.busy = false;
        Ok(())
    }

    /// Runs `f` on the bits of a bitmap, named or anonymous, under the lock
    /// (jobs read and reset through this). `None` if it no longer exists.
    pub fn with_bits<R>(&self, id: BitmapId, f: impl FnOnce(&mut HBitmap) -> R) -> Option<R> {
        self.lock_mut().by_id(id).map(|bm| f(&mut bm.bits))
    }

    /// Runs `f` on the bits of a bitmap, named or anonymous, under the shared
    /// lock: writes keep marking meanwhile (marking is atomic), so `f` sees
    /// every write that completed before it was called. Exports read a
    /// published bitmap through this. `None` if it no longer exists.
    pub fn read_bits<R>(&self, id: BitmapId, f: impl FnOnce(&HBitmap) -> R) -> Option<R> {
        self.read().by_id_ref(id).map(|bm| f(&bm.bits))
    }

    /// The id of a named bitmap.
    pub fn id(&self, name: &str) -> Result<BitmapId> {
        Ok(self.read().named_ref(name)?.id)
    }

    /// SHA-256 of a named bitmap's bits (`x-debug-block-dirty-bitmap-sha256`).
    pub fn sha256(&self, name: &str) -> Result<String> {
        Ok(self.read().named_ref(name)?.bits.sha256())
    }

    /// The successors of the named bitmaps that have one (a backup's),
    /// each reported with the name of the bitmap it will replace; QEMU
    /// lists them, nameless, before the named ones.
    pub fn successors_info(&self) -> Vec<BitmapInfo> {
        self.read()
            .bitmaps
            .iter()
            .filter_map(|bm| {
                let s = bm.successor.as_ref()?;
                Some(BitmapInfo {
                    name: bm.name.clone()?,
                    count: s.bits.dirty_granules() << s.bits.granularity(),
                    granularity: 1 << s.bits.granularity(),
                    recording: s.recording(),
                    busy: s.busy,
                    persistent: false,
                    inconsistent: false,
                })
            })
            .collect()
    }

    /// What queries report, newest bitmap first; anonymous ones (a
    /// mirror's) are left out.
    pub fn info(&self) -> Vec<BitmapInfo> {
        self.read()
            .bitmaps
            .iter()
            .filter_map(|bm| {
                Some(BitmapInfo {
                    name: bm.name.clone()?,
                    count: bm.bits.dirty_granules() << bm.bits.granularity(),
                    granularity: 1 << bm.bits.granularity(),
                    recording: bm.recording(),
                    busy: bm.busy,
                    persistent: bm.persistent,
                    inconsistent: bm.inconsistent,
                })
            })
            .collect()
    }
}
