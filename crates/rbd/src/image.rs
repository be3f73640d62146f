//! Open RBD images and their asynchronous requests.

use std::ffi::CString;
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::Arc;

use block::IoBuf;
use tokio::sync::oneshot;

use crate::cluster::Pool;
use crate::error::{Error, Result};
use crate::ffi;

/// An open image. Thread-safe: librbd serialises what needs it, so
/// requests may be issued from any thread, concurrently. Closed when
/// dropped (which waits for librbd to write back its cache).
#[derive(Debug)]
pub struct Image {
    raw: ffi::rbd_image_t,
    pool: Arc<Pool>,
    name: String,
}

// SAFETY: librbd image handles are thread-safe for the calls made here
// (asynchronous I/O, size, diff, resize), as QEMU uses them from several
// iothreads.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

/// One extent reported by [`Image::diff`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether it holds data (`false`: it was discarded and reads zeroes).
    pub exists: bool,
}

/// What a request's completion callback owns: where to send the result and
/// the request's buffer, kept alive until librbd is done with it even when
/// the caller has gone away.
struct Pending {
    done: oneshot::Sender<(isize, Option<IoBuf>)>,
    buf: Option<IoBuf>,
}

/// librbd's completion callback (runs on a librbd thread): collects the
/// result, releases the completion and sends everything back. It never
/// blocks and cannot panic.
extern "C" fn complete(c: ffi::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: `arg` is the `Box<Pending>` leaked by `Image::submit` for this
    // completion alone, and librbd calls this exactly once per completion.
    let pending = unsafe { Box::from_raw(arg.cast::<Pending>()) };
    // SAFETY: `c` is the live completion this callback belongs to; it is
    // released here and never touched again.
    let ret = unsafe {
        let ret = ffi::rbd_aio_get_return_value(c);
        ffi::rbd_aio_release(c);
        ret
    };
    // A caller that went away does not want the result; the buffer is
    // dropped here, after librbd is done with it.
    let _ = pending.done.send((ret, pending.buf));
}

/// Sentinel that [`diff_callback`] returns to stop an iteration early.
const DIFF_STOP: c_int = -9000;

struct DiffState {
    segments: Vec<Segment>,
    limit: usize,
}

extern "C" fn diff_callback(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `DiffState` that `Image::diff` owns for the
    // duration of the (synchronous) iteration, used by no one else.
    let state = unsafe { &mut *arg.cast::<DiffState>() };
    state.segments.push(Segment {
        offset,
        len: len as u64,
        exists: exists != 0,
    });
    if state.segments.len() >= state.limit {
        DIFF_STOP
    } else {
        0
    }
}

fn cstring(what: &'static str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| Error::Nul {
        what,
        value: value.to_owned(),
    })
}

impl Image {
    /// Opens image `name` of `pool`, at `snapshot` if given (snapshots are
    /// read-only). Blocks: call it off the async runtime's threads.
    pub fn open(
        pool: &Arc<Pool>,
        name: &str,
        snapshot: Option<&str>,
        read_only: bool,
    ) -> Result<Image> {
        let cname = cstring("image", name)?;
        let csnap = snapshot.map(|s| cstring("snapshot", s)).transpose()?;
        let snap_ptr = csnap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut raw: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: valid ioctx, NUL-terminated names (or null for no
        // snapshot), valid out-pointer.
        let r = unsafe {
            if read_only {
                ffi::rbd_open_read_only(pool.raw, cname.as_ptr(), &mut raw, snap_ptr)
            } else {
                ffi::rbd_open(pool.raw, cname.as_ptr(), &mut raw, snap_ptr)
            }
        };
        if r < 0 {
            // QEMU's words: the image's name alone.
            return Err(Error::call(
                format!("error reading header from {name}"),
                r.into(),
            ));
        }
        Ok(Image {
            raw,
            pool: pool.clone(),
            name: name.to_owned(),
        })
    }

    /// The image's name in its pool.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pool the image lives in.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The image's size in bytes.
    pub fn size(&self) -> Result<u64> {
        let mut size = 0;
        // SAFETY: open image, valid out-pointer.
        let r = unsafe { ffi::rbd_get_size(self.raw, &mut size) };
        if r < 0 {
            return Err(self.error("error getting image size", r.into()));
        }
        Ok(size)
    }

    /// The size of the image's objects (its allocation unit in the
    /// cluster).
    pub fn object_size(&self) -> Result<u64> {
        // SAFETY: all-zero bytes are a valid rbd_image_info_t (integers and
        // byte arrays).
        let mut info: ffi::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: open image; `info` is writable and its size is passed.
        let r = unsafe {
            ffi::rbd_stat(
                self.raw,
                &mut info,
                std::mem::size_of::<ffi::rbd_image_info_t>(),
            )
        };
        if r < 0 {
            return Err(self.error("error reading image info", r.into()));
        }
        Ok(info.obj_size.max(512))
    }

    /// The image's id: unlike its name, it changes when the image is
    /// removed and made again.
    pub fn id(&self) -> Result<String> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: open image; `buf` is writable for its length.
            let r = unsafe { ffi::rbd_get_id(self.raw, buf.as_mut_ptr().cast(), buf.len()) };
            if r == -34 && buf.len() < 4096 {
                // ERANGE: a longer id.
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            if r < 0 {
                return Err(self.error("error reading the image id", r.into()));
            }
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            return Ok(String::from_utf8_lossy(&buf[..end]).into_owned());
        }
    }

    /// The image's metadata value for `key`, if it has one.
    pub fn metadata(&self, key: &str) -> Result<Option<String>> {
        let ckey = cstring("metadata key", key)?;
        let mut buf = vec![0u8; 256];
        loop {
            let mut len = buf.len();
            // SAFETY: open image, NUL-terminated key, `buf` writable for
            // `len` bytes; librbd writes the needed length to `len`.
            let r = unsafe {
                ffi::rbd_metadata_get(self.raw, ckey.as_ptr(), buf.as_mut_ptr().cast(), &mut len)
            };
            match r {
                -2 => return Ok(None),
                -34 if len > buf.len() && len <= 1 << 20 => buf.resize(len, 0),
                r if r < 0 => return Err(self.error("error reading image metadata", r.into())),
                _ => {
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                    return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
                }
            }
        }
    }

    /// Sets the image's metadata `key` to `value`.
    pub fn set_metadata(&self, key: &str, value: &str) -> Result<()> {
        let (k, v) = (
            cstring("metadata key", key)?,
            cstring("metadata value", value)?,
        );
        // SAFETY: open image, NUL-terminated strings.
        let r = unsafe { ffi::rbd_metadata_set(self.raw, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(self.error("error writing image metadata", r.into()));
        }
        Ok(())
    }

    /// The image's snapshots: name and size, oldest first.
    pub fn snapshots(&self) -> Result<Vec<(String, u64)>> {
        let mut max: std::os::raw::c_int = 16;
        loop {
            let mut infos: Vec<ffi::rbd_snap_info_t> = (0..max)
                .map(|_| ffi::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            // SAFETY: open image; `infos` holds `max` entries; on -ERANGE
            // librbd sets `max` to the count it needs and fills nothing.
            let r = unsafe { ffi::rbd_snap_list(self.raw, infos.as_mut_ptr(), &mut max) };
            if r == -34 && max > 0 && max <= 65536 {
                continue;
            }
            if r < 0 {
                return Err(self.error("error listing snapshots", r.into()));
            }
            let n = usize::try_from(r).unwrap_or(0).min(infos.len());
            let list = infos[..n]
                .iter()
                .map(|i| {
                    let name = if i.name.is_null() {
                        String::new()
                    } else {
                        // SAFETY: librbd filled a NUL-terminated name that
                        // lives until rbd_snap_list_end below.
                        unsafe { std::ffi::CStr::from_ptr(i.name) }
                            .to_string_lossy()
                            .into_owned()
                    };
                    (name, i.size)
                })
                .collect();
            // SAFETY: frees the names librbd allocated for these entries.
            unsafe { ffi::rbd_snap_list_end(infos.as_mut_ptr()) };
            return Ok(list);
        }
    }

    /// Whether the image has snapshot `name`.
    pub fn has_snapshot(&self, name: &str) -> Result<bool> {
        let cname = cstring("snapshot", name)?;
        let mut exists = false;
        // SAFETY: open image, NUL-terminated name, valid out-pointer.
        let r = unsafe { ffi::rbd_snap_exists(self.raw, cname.as_ptr(), &mut exists) };
        if r < 0 {
            return Err(self.error("error looking for a snapshot", r.into()));
        }
        Ok(exists)
    }

    /// Takes snapshot `name` of the image. Blocks.
    pub fn create_snapshot(&self, name: &str) -> Result<()> {
        self.on_snapshot(name, "error creating snapshot", ffi::rbd_snap_create)
    }

    /// Removes snapshot `name` of the image. Blocks.
    pub fn remove_snapshot(&self, name: &str) -> Result<()> {
        self.on_snapshot(name, "error removing snapshot", ffi::rbd_snap_remove)
    }

    /// Calls librbd's `call` on snapshot `name`; `what` names it in errors.
    fn on_snapshot(
        &self,
        name: &str,
        what: &str,
        call: unsafe extern "C" fn(ffi::rbd_image_t, *const std::os::raw::c_char) -> c_int,
    ) -> Result<()> {
        let cname = cstring("snapshot", name)?;
        // SAFETY: open image, NUL-terminated name: what rbd_snap_create and
        // rbd_snap_remove, the only `call`s, take.
        let r = unsafe { call(self.raw, cname.as_ptr()) };
        if r < 0 {
            return Err(self.error(&format!("{what} {name}"), r.into()));
        }
        Ok(())
    }

    /// Takes the image's exclusive lock and keeps it until the image is
    /// closed: no other client can write meanwhile (librbd otherwise hands
    /// the lock to any client that asks). A lock whose owner died is broken
    /// once the cluster notices. Blocks.
    pub fn lock_exclusive(&self) -> Result<()> {
        // SAFETY: open image.
        let r = unsafe { ffi::rbd_lock_acquire(self.raw, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        if r < 0 {
            return Err(self.error(
                "error taking the exclusive lock (is another client writing to it?)",
                r.into(),
            ));
        }
        Ok(())
    }

    /// Whether block status can come from the object map
    /// (`fast-diff` enabled and valid); otherwise [`Image::diff`] would
    /// have to ask every object.
    pub fn has_fast_diff(&self) -> bool {
        let (mut features, mut flags) = (0u64, 0u64);
        // SAFETY: open image, valid out-pointers.
        let ok = unsafe {
            ffi::rbd_get_features(self.raw, &mut features) == 0
                && ffi::rbd_get_flags(self.raw, &mut flags) == 0
        };
        ok && features & ffi::RBD_FEATURE_FAST_DIFF != 0
            && flags & ffi::RBD_FLAG_FAST_DIFF_INVALID == 0
    }

    /// Changes the image's size. Blocks.
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: open image.
        let r = unsafe { ffi::rbd_resize(self.raw, size) };
        if r < 0 {
            return Err(self.error("error resizing image", r.into()));
        }
        Ok(())
    }

    /// The extents in `offset..offset + len` written since snapshot
    /// `from` (since the image was made, the parent's data included, when
    /// `None`), at most `limit` of them. With `whole_object` they come from
    /// the object map, whole objects at a time, which may report more than
    /// was written but never less. Blocks.
    pub fn diff(
        &self,
        from: Option<&str>,
        offset: u64,
        len: u64,
        whole_object: bool,
        limit: usize,
    ) -> Result<Vec<Segment>> {
        let from = from.map(|f| cstring("snapshot", f)).transpose()?;
        let mut state = DiffState {
            segments: Vec::new(),
            limit: limit.max(1),
        };
        // SAFETY: open image; `state` outlives the synchronous iteration
        // and only the callback touches it meanwhile.
        let r = unsafe {
            ffi::rbd_diff_iterate2(
                self.raw,
                from.as_ref().map_or(ptr::null(), |f| f.as_ptr()),
                offset,
                len,
                1,
                u8::from(whole_object),
                diff_callback,
                (&mut state as *mut DiffState).cast(),
            )
        };
        if r < 0 && r != DIFF_STOP {
            return Err(self.error("error reading the allocation map", r.into()));
        }
        Ok(state.segments)
    }

    fn error(&self, what: &str, ret: i64) -> Error {
        Error::call(format!("{what} of {}/{}", self.pool.spec(), self.name), ret)
    }

    /// Issues one asynchronous request: `start` gets the completion and the
    /// buffer's address and returns what librbd's submission returned.
    /// Returns the request's result and its buffer.
    async fn submit(
        &self,
        what: &'static str,
        buf: Option<IoBuf>,
        start: impl FnOnce(ffi::rbd_completion_t, *mut u8) -> c_int,
    ) -> (Result<isize>, Option<IoBuf>) {
        let result = match self.issue(what, buf, start) {
            Ok(result) => result,
            Err((e, buf)) => return (Err(e), buf),
        };
        match result.await {
            Ok((ret, buf)) if ret < 0 => (Err(self.error(what, ret as i64)), buf),
            Ok((ret, buf)) => (Ok(ret), buf),
            // The callback always sends; this is librbd never calling it.
            Err(_) => (Err(self.error(what, -5)), None),
        }
    }

    /// The synchronous half of [`Image::submit`]: hands the request to
    /// librbd and returns where its result will arrive.
    #[allow(clippy::type_complexity)]
    fn issue(
        &self,
        what: &'static str,
        mut buf: Option<IoBuf>,
        start: impl FnOnce(ffi::rbd_completion_t, *mut u8) -> c_int,
    ) -> std::result::Result<oneshot::Receiver<(isize, Option<IoBuf>)>, (Error, Option<IoBuf>)>
    {
        let (done, result) = oneshot::channel();
        let data = buf
            .as_mut()
            .map_or(ptr::null_mut(), |b| b.as_mut_slice().as_mut_ptr());
        // The buffer's heap allocation does not move with the IoBuf, so
        // `data` stays valid while `Pending` owns it.
        let pending = Box::into_raw(Box::new(Pending { done, buf }));
        let mut c: ffi::rbd_completion_t = ptr::null_mut();
        // SAFETY: `pending` is a valid pointer handed to the completion,
        // `complete` matches librbd's callback type, `c` is an out-pointer.
        let r = unsafe { ffi::rbd_aio_create_completion(pending.cast(), complete, &mut c) };
        if r < 0 {
            // SAFETY: no completion exists, so no callback will take it.
            let pending = unsafe { Box::from_raw(pending) };
            return Err((self.error(what, r.into()), pending.buf));
        }
        let r = start(c, data);
        if r < 0 {
            // SAFETY: librbd refused the request, so the callback will not
            // run; the completion and `pending` are ours to free.
            let pending = unsafe {
                ffi::rbd_aio_release(c);
                Box::from_raw(pending)
            };
            return Err((self.error(what, r.into()), pending.buf));
        }
        Ok(result)
    }

    /// Fills `buf` from `offset`.
    pub async fn read(&self, offset: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        let len = buf.len();
        let (r, buf) = self
            .submit("error reading", Some(buf), |c, data| {
                // SAFETY: open image; `data` points to `len` writable bytes
                // owned by the pending request until completion.
                unsafe { ffi::rbd_aio_read(self.raw, offset, len, data.cast(), c) }
            })
            .await;
        let mut buf = buf.unwrap_or_else(|| IoBuf::zeroed(len, 1));
        match r {
            Ok(n) => {
                // A short read (past the end) reads zeroes.
                let n = usize::try_from(n).unwrap_or(0).min(len);
                buf.as_mut_slice()[n..].fill(0);
                (Ok(()), buf)
            }
            Err(e) => (Err(e), buf),
        }
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: IoBuf) -> (Result<()>, IoBuf) {
        let len = buf.len();
        let (r, buf) = self
            .submit("error writing", Some(buf), |c, data| {
                // SAFETY: open image; `data` points to `len` bytes owned by
                // the pending request until completion.
                unsafe { ffi::rbd_aio_write(self.raw, offset, len, data.cast_const().cast(), c) }
            })
            .await;
        (r.map(drop), buf.unwrap_or_else(|| IoBuf::zeroed(0, 1)))
    }

    /// Deallocates `offset..offset + len` (it reads zeroes afterwards).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.submit("error discarding", None, |c, _| {
            // SAFETY: open image, live completion.
            unsafe { ffi::rbd_aio_discard(self.raw, offset, len, c) }
        })
        .await
        .0
        .map(drop)
    }

    /// Makes `offset..offset + len` read as zeroes; `thick` keeps it
    /// allocated instead of deallocating what it can.
    pub async fn write_zeroes(&self, offset: u64, len: u64, thick: bool) -> Result<()> {
        let Ok(len) = usize::try_from(len) else {
            return Err(Error::Invalid(format!("write-zeroes of {len} bytes")));
        };
        let flags = if thick {
            ffi::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        } else {
            0
        };
        self.submit("error writing zeroes", None, |c, _| {
            // SAFETY: open image, live completion.
            unsafe { ffi::rbd_aio_write_zeroes(self.raw, offset, len, c, flags, 0) }
        })
        .await
        .0
        .map(drop)
    }

    /// Makes completed writes durable (librbd's cache acknowledges writes
    /// before the cluster has them).
    pub async fn flush(&self) -> Result<()> {
        self.submit("error flushing", None, |c, _| {
            // SAFETY: open image, live completion.
            unsafe { ffi::rbd_aio_flush(self.raw, c) }
        })
        .await
        .0
        .map(drop)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle is open and, the Image being dropped, no
        // request of ours is being submitted; librbd waits for those in
        // flight.
        let r = unsafe { ffi::rbd_close(self.raw) };
        if r < 0 {
            tracing::warn!(
                "closing RBD image {}/{}: {}",
                self.pool.spec(),
                self.name,
                Error::call("error closing", r.into())
            );
        }
    }
}
