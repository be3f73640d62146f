//! Connections to a cluster (librados) and I/O contexts on its pools.

use std::ffi::CString;
use std::ptr;
use std::sync::Arc;

use block::options::RbdOptions;

use crate::error::{Error, Result};
use crate::ffi;

/// What identifies a connection: images opened with equal keys share one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    /// The configuration file, or librados's search path.
    pub conf: Option<String>,
    /// The Ceph user (`client.USER`).
    pub user: Option<String>,
    /// librados settings applied after the configuration file, in order.
    pub settings: Vec<(String, String)>,
}

impl ClusterKey {
    /// The connection `options` ask for; `cache` turns librbd's write-back
    /// cache on (QEMU turns it off for `cache.direct=on`).
    pub fn new(options: &RbdOptions, cache: bool) -> ClusterKey {
        let mut settings = Vec::new();
        if let Some(servers) = &options.server {
            let hosts: Vec<String> = servers
                .iter()
                .map(|(host, port)| match host.contains(':') {
                    true => format!("[{host}]:{port}"),
                    false => format!("{host}:{port}"),
                })
                .collect();
            settings.push(("mon_host".to_owned(), hosts.join(";")));
        }
        if let Some(modes) = &options.auth_client_required {
            settings.push(("auth_client_required".to_owned(), modes.join(";")));
        }
        settings.extend(options.conf_pairs.iter().cloned());
        settings.push((
            "rbd_cache".to_owned(),
            if cache { "true" } else { "false" }.to_owned(),
        ));
        ClusterKey {
            conf: options.conf.clone(),
            user: options.user.clone(),
            settings,
        }
    }
}

/// A connection to a cluster. Thread-safe; shut down when dropped, after
/// every [`Pool`] made from it.
#[derive(Debug)]
pub struct Cluster {
    raw: ffi::rados_t,
}

// SAFETY: a rados_t may be used from any thread, concurrently (librados is
// thread-safe; QEMU shares one between iothreads).
unsafe impl Send for Cluster {}
// SAFETY: as above.
unsafe impl Sync for Cluster {}

/// How long connecting may take before it fails, unless the configuration
/// says otherwise (librados's default is 5 minutes, long enough to look like
/// a hang in `blockdev-add`).
const MOUNT_TIMEOUT_SECONDS: &str = "30";

fn cstring(what: &'static str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| Error::Nul {
        what,
        value: value.to_owned(),
    })
}

impl Cluster {
    /// Connects as `key` says. Blocks until the monitors answer: call it
    /// off the async runtime's threads.
    pub fn connect(key: &ClusterKey) -> Result<Cluster> {
        let user = key
            .user
            .as_deref()
            .map(|u| cstring("user", u))
            .transpose()?;
        let mut raw: ffi::rados_t = ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; `user` outlives the call or
        // is null (the default user).
        let r = unsafe {
            ffi::rados_create(&mut raw, user.as_ref().map_or(ptr::null(), |u| u.as_ptr()))
        };
        if r < 0 {
            return Err(Error::call("error initializing", r.into()));
        }
        // From here on, dropping `cluster` shuts the handle down.
        let cluster = Cluster { raw };
        cluster.set("client_mount_timeout", MOUNT_TIMEOUT_SECONDS)?;
        match &key.conf {
            Some(conf) => {
                let path = cstring("conf", conf)?;
                // SAFETY: valid handle, NUL-terminated path.
                let r = unsafe { ffi::rados_conf_read_file(cluster.raw, path.as_ptr()) };
                if r < 0 {
                    return Err(Error::call(
                        format!("error reading conf file {conf}"),
                        r.into(),
                    ));
                }
            }
            None => {
                // librados's search path ($CEPH_CONF, /etc/ceph/ceph.conf,
                // ~/.ceph/config, ./ceph.conf); none found is fine, as in
                // QEMU, when settings name the monitors.
                // SAFETY: valid handle; a null path means the search path.
                unsafe { ffi::rados_conf_read_file(cluster.raw, ptr::null()) };
            }
        }
        for (option, value) in &key.settings {
            cluster.set(option, value)?;
        }
        // SAFETY: valid, configured handle.
        let r = unsafe { ffi::rados_connect(cluster.raw) };
        if r < 0 {
            return Err(Error::call("error connecting", r.into()));
        }
        Ok(cluster)
    }

    fn set(&self, option: &str, value: &str) -> Result<()> {
        let o = cstring("option", option)?;
        let v = cstring("value", value)?;
        // SAFETY: valid handle, NUL-terminated strings.
        let r = unsafe { ffi::rados_conf_set(self.raw, o.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(Error::call(
                format!("invalid conf option {option}"),
                r.into(),
            ));
        }
        Ok(())
    }

    /// An I/O context on `pool` (and `namespace`, if given).
    pub fn pool(self: &Arc<Self>, pool: &str, namespace: Option<&str>) -> Result<Pool> {
        let name = cstring("pool", pool)?;
        let mut raw: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle, NUL-terminated name, valid out-pointer.
        let r = unsafe { ffi::rados_ioctx_create(self.raw, name.as_ptr(), &mut raw) };
        if r < 0 {
            return Err(Error::call(format!("error opening pool {pool}"), r.into()));
        }
        let io = Pool {
            raw,
            _cluster: self.clone(),
            name: pool.to_owned(),
            namespace: namespace.map(str::to_owned),
        };
        if let Some(ns) = namespace {
            let ns = cstring("namespace", ns)?;
            // SAFETY: valid ioctx; librados copies the name.
            unsafe { ffi::rados_ioctx_set_namespace(io.raw, ns.as_ptr()) };
        }
        Ok(io)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is valid and nothing uses it any more: every
        // Pool holds an Arc of its Cluster.
        unsafe { ffi::rados_shutdown(self.raw) };
    }
}

/// An I/O context: a pool (and namespace) of a [`Cluster`], where images
/// live. Thread-safe.
#[derive(Debug)]
pub struct Pool {
    pub(crate) raw: ffi::rados_ioctx_t,
    _cluster: Arc<Cluster>,
    name: String,
    namespace: Option<String>,
}

// SAFETY: an ioctx may be used from any thread concurrently for the calls
// this crate makes (image open/create/remove/rename), as QEMU does.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

impl Pool {
    /// `POOL` or `POOL/NAMESPACE`.
    pub fn spec(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}", self.name),
            None => self.name.clone(),
        }
    }

    /// Creates image `name` of `size` bytes with the cluster's default
    /// features (`rbd_default_features`, as QEMU's `blockdev-create` does)
    /// and objects of `1 << order` bytes (librbd's default, 4 MiB, when
    /// `None`). Blocks.
    pub fn create(&self, name: &str, size: u64, order: Option<u32>) -> Result<()> {
        let cname = cstring("image", name)?;
        let mut opts: ffi::rbd_image_options_t = ptr::null_mut();
        // SAFETY: valid out-pointer; destroyed below.
        unsafe { ffi::rbd_image_options_create(&mut opts) };
        let mut r = 0;
        if let Some(order) = order {
            // SAFETY: valid options handle.
            r = unsafe {
                ffi::rbd_image_options_set_uint64(opts, ffi::RBD_IMAGE_OPTION_ORDER, order.into())
            };
        }
        if r == 0 {
            // SAFETY: valid ioctx, name and options.
            r = unsafe { ffi::rbd_create4(self.raw, cname.as_ptr(), size, opts) };
        }
        // SAFETY: created above, used by no one else.
        unsafe { ffi::rbd_image_options_destroy(opts) };
        if r < 0 {
            // QEMU's words.
            return Err(Error::call("error rbd create", r.into()));
        }
        Ok(())
    }

    /// Removes image `name` and its data. Blocks.
    pub fn remove(&self, name: &str) -> Result<()> {
        let cname = cstring("image", name)?;
        // SAFETY: valid ioctx and name.
        let r = unsafe { ffi::rbd_remove(self.raw, cname.as_ptr()) };
        if r < 0 {
            return Err(Error::call(
                format!("error removing image {}/{name}", self.spec()),
                r.into(),
            ));
        }
        Ok(())
    }

    /// Whether an image with id `id` exists in the pool. Blocks.
    pub fn has_image_id(&self, id: &str) -> Result<bool> {
        let cid = cstring("image id", id)?;
        let mut raw: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: valid ioctx and id, valid out-pointer; a read-only open
        // sets no watch and is closed right away.
        let r =
            unsafe { ffi::rbd_open_by_id_read_only(self.raw, cid.as_ptr(), &mut raw, ptr::null()) };
        match r {
            0 => {
                // SAFETY: just opened, used by no one else.
                unsafe { ffi::rbd_close(raw) };
                Ok(true)
            }
            -2 => Ok(false),
            r => Err(Error::call(
                format!("error looking for image id {id} in {}", self.spec()),
                r.into(),
            )),
        }
    }

    /// Renames image `from` to `to`, which must not exist. Blocks.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let f = cstring("image", from)?;
        let t = cstring("image", to)?;
        // SAFETY: valid ioctx and names.
        let r = unsafe { ffi::rbd_rename(self.raw, f.as_ptr(), t.as_ptr()) };
        if r < 0 {
            return Err(Error::call(
                format!("error renaming image {}/{from} to {to}", self.spec()),
                r.into(),
            ));
        }
        Ok(())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: valid ioctx; every Image holds an Arc of its Pool, so none
        // uses it any more.
        unsafe { ffi::rados_ioctx_destroy(self.raw) };
    }
}
