//! `BlockdevOptions`: how a node is described, parsed from QEMU's JSON.
//!
//! The same struct serves `blockdev-add` (JSON) and, later, `--blockdev`
//! (QEMU's key=value syntax, where every scalar arrives as a string: such
//! input is read with [`BlockdevOptions::from_keyval_json`]). Field names,
//! defaults and error texts are QEMU's.

use qapi::Object;
use serde_json::Value;

use crate::error::{Error, Result};

/// What the node does with discard requests (`discard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discard {
    /// Discards succeed and do nothing (QEMU's default).
    #[default]
    Ignore,
    /// Discards are passed down, punching holes where the driver can.
    Unmap,
}

/// Whether writes of zeroes are turned into write-zeroes (`detect-zeroes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Writes are written as they are.
    #[default]
    Off,
    /// All-zero writes become write-zeroes requests.
    On,
    /// All-zero writes become write-zeroes that may unmap.
    Unmap,
}

/// How the `file` driver submits I/O (`aio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aio {
    /// Blocking `pread`/`pwrite` on a thread pool (the default). QEMU's
    /// `native` (Linux AIO) is accepted as a synonym.
    #[default]
    Threads,
    /// io_uring, falling back to threads where the kernel refuses it.
    IoUring,
}

/// A child given either by reference to an existing node or inline.
#[derive(Debug, Clone, PartialEq)]
pub enum ChildRef {
    /// The name of an existing node.
    Reference(String),
    /// A new node, created with its parent and owned by it.
    Inline(Box<BlockdevOptions>),
}

/// The driver and its own options.
#[derive(Debug, Clone, PartialEq)]
pub enum DriverOptions {
    /// `file`: a regular file or block device.
    File {
        /// Path of the file.
        filename: String,
        /// Submission engine.
        aio: Aio,
    },
    /// `raw`: a format that passes requests to its `file` child, optionally
    /// restricted to a window `offset..offset + size`.
    Raw {
        /// The protocol child.
        file: ChildRef,
        /// Start of the window in the child.
        offset: u64,
        /// Length of the window; the rest of the child by default.
        size: Option<u64>,
    },
    /// `qcow2`: the QEMU image format over its `file` child.
    Qcow2 {
        /// The protocol child holding the image.
        file: ChildRef,
        /// The backing node: `None` to open the one the image names (resolved
        /// against the image's directory), `Some(None)` for no backing
        /// (`"backing": null`), `Some(Some(child))` for this one.
        backing: Option<Option<ChildRef>>,
        /// Memory for cached L2 tables in bytes (`l2-cache-size`; 32 MiB
        /// by default, at least two tables).
        l2_cache_size: Option<u64>,
        /// Whether the image's header may name its backing file with `json:`
        /// or a protocol (`x-backing-protocols`, ours; off by default, as a
        /// guest may have written the header).
        backing_protocols: bool,
    },
    /// `nbd`: an export on an NBD server (opened by the driver the NBD
    /// crate registers with [`crate::Graph::register_driver`]).
    Nbd {
        /// Where the server listens.
        server: SocketAddress,
        /// The export's name (`""` by default).
        export: Option<String>,
        /// A metadata context whose block status replaces `base:allocation`
        /// (QEMU's `x-dirty-bitmap`, e.g. `qemu:dirty-bitmap:B`).
        x_dirty_bitmap: Option<String>,
        /// The id of a `tls-creds-x509` object (client endpoint): TLS first.
        tls_creds: Option<String>,
        /// The name the server's certificate must carry.
        tls_hostname: Option<String>,
    },
    /// `rbd`: an image in a Ceph cluster (opened by the driver the `rbd`
    /// crate registers with [`crate::Graph::register_driver`]).
    Rbd(RbdOptions),
    /// `throttle`: a filter that passes requests to its `file` child at
    /// the pace of a throttle group.
    Throttle {
        /// The child.
        file: ChildRef,
        /// The throttle group's id (`throttle-group`).
        group: String,
    },
    /// `null-co`: a device that reads zeroes and forgets writes.
    NullCo {
        /// Length in bytes (QEMU's default: 1 GiB).
        size: u64,
        /// Whether reads fill the buffer with zeroes (they always do here;
        /// the option is kept for compatibility, and shows in the node's
        /// `json:` filename when given).
        read_zeroes: Option<bool>,
    },
}

impl DriverOptions {
    /// QEMU's name of the driver.
    pub fn name(&self) -> &'static str {
        match self {
            DriverOptions::File { .. } => "file",
            DriverOptions::Raw { .. } => "raw",
            DriverOptions::Qcow2 { .. } => "qcow2",
            DriverOptions::NullCo { .. } => "null-co",
            DriverOptions::Nbd { .. } => "nbd",
            DriverOptions::Rbd(_) => "rbd",
            DriverOptions::Throttle { .. } => "throttle",
        }
    }
}

/// Where an RBD image is and how to reach its cluster (QEMU's
/// `BlockdevOptionsRbd`, without encryption and `key-secret`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RbdOptions {
    /// The pool.
    pub pool: String,
    /// The namespace in the pool (none by default).
    pub namespace: Option<String>,
    /// The image.
    pub image: String,
    /// The Ceph configuration file (librados's search path by default).
    pub conf: Option<String>,
    /// A snapshot to open (read-only) instead of the image's head.
    pub snapshot: Option<String>,
    /// The Ceph user (`id`; librados's default, `admin`).
    pub user: Option<String>,
    /// Accepted authentication modes, in order (`cephx`, `none`).
    pub auth_client_required: Option<Vec<String>>,
    /// Monitors `(host, port)` to use instead of the configuration's.
    pub server: Option<Vec<(String, String)>>,
    /// Further librados options, from a filename's `key=value` pairs (QEMU's
    /// internal `=keyvalue-pairs`).
    pub conf_pairs: Vec<(String, String)>,
}

impl RbdOptions {
    /// The image as `POOL/[NAMESPACE/]IMAGE[@SNAPSHOT]`, for messages.
    pub fn spec(&self) -> String {
        let mut s = self.pool.clone();
        if let Some(ns) = &self.namespace {
            s.push('/');
            s.push_str(ns);
        }
        s.push('/');
        s.push_str(&self.image);
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s
    }

    /// The options as QAPI's `BlockdevOptionsRbd` members, in QAPI's order
    /// (with `"driver": "rbd"`), as `blockdev-add` takes them and a `json:`
    /// filename shows them. `conf_pairs` have no QAPI member and are left
    /// out.
    pub fn to_qapi(&self) -> serde_json::Value {
        let mut d = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            d.insert(k.to_owned(), v);
        };
        put("driver", "rbd".into());
        put("pool", self.pool.clone().into());
        if let Some(ns) = &self.namespace {
            put("namespace", ns.clone().into());
        }
        put("image", self.image.clone().into());
        if let Some(conf) = &self.conf {
            put("conf", conf.clone().into());
        }
        if let Some(snap) = &self.snapshot {
            put("snapshot", snap.clone().into());
        }
        if let Some(user) = &self.user {
            put("user", user.clone().into());
        }
        if let Some(modes) = &self.auth_client_required {
            put("auth-client-required", modes.clone().into());
        }
        if let Some(servers) = &self.server {
            let list = servers
                .iter()
                .map(|(host, port)| serde_json::json!({"host": host, "port": port}))
                .collect();
            put("server", serde_json::Value::Array(list));
        }
        d.into()
    }

    /// Reads QAPI's `BlockdevOptionsRbd` members from `f` (leaving the
    /// others for the caller), refusing encryption and `key-secret`.
    pub fn read(f: &mut Object) -> Result<RbdOptions> {
        let mut o = RbdOptions {
            pool: f.req_str("pool")?,
            namespace: f.opt_str("namespace")?,
            image: f.req_str("image")?,
            conf: f.opt_str("conf")?,
            snapshot: f.opt_str("snapshot")?,
            user: f.opt_str("user")?,
            ..RbdOptions::default()
        };
        if let Some(modes) = f.opt_list("auth-client-required")? {
            let mut list = Vec::new();
            for (name, v) in modes {
                match v.as_str() {
                    Some(m @ ("cephx" | "none")) => list.push(m.to_owned()),
                    _ => {
                        return Err(qapi::Error::InvalidValue {
                            name,
                            value: v.to_string().trim_matches('"').to_owned(),
                        }
                        .into());
                    }
                }
            }
            o.auth_client_required = Some(list);
        }
        if let Some(servers) = f.opt_list("server")? {
            let mut list = Vec::new();
            for (name, v) in servers {
                let mut server = Object::nested(&v, &name, f.is_keyval())?;
                let host = server.req_str("host")?;
                let port = server.req_str("port")?;
                server.finish()?;
                list.push((host, port));
            }
            o.server = Some(list);
        }
        for unsupported in ["encrypt", "key-secret"] {
            if f.has(unsupported) {
                return Err(Error::NotSupported(if unsupported == "encrypt" {
                    "RBD encryption (encrypt)"
                } else {
                    "RBD keys from secret objects (key-secret); give a keyring in the conf file"
                }));
            }
        }
        Ok(o)
    }
}

/// Where a network peer listens (QAPI's `SocketAddress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// A unix socket.
    Unix {
        /// Its path.
        path: String,
    },
    /// A TCP host and port.
    Inet {
        /// Host name or address.
        host: String,
        /// Port number or service name (a string, as in QAPI).
        port: String,
    },
}

impl SocketAddress {
    /// Reads QAPI's flat `SocketAddress` (`{"type": "unix", "path": …}` or
    /// `{"type": "inet", "host": …, "port": …}`) from `obj`, leaving any
    /// other member for the caller. Options that only tune the socket
    /// (`numeric`, `ipv4`, `ipv6`, `keep-alive`, `tight`, …) are accepted
    /// and have no effect.
    pub fn read(obj: &mut Object) -> Result<SocketAddress> {
        let unix = obj.req_enum("type", &[("unix", true), ("inet", false)])?;
        Self::read_members(obj, unix)
    }

    /// Reads QAPI's `SocketAddressLegacy` (`{"type": "unix", "data":
    /// {"path": …}}`), as `nbd-server-start` takes it.
    pub fn read_legacy(obj: &mut Object) -> Result<SocketAddress> {
        let unix = obj.req_enum("type", &[("unix", true), ("inet", false)])?;
        let mut data = obj.req_object("data")?;
        let address = Self::read_members(&mut data, unix)?;
        data.finish()?;
        Ok(address)
    }

    fn read_members(obj: &mut Object, unix: bool) -> Result<SocketAddress> {
        let address = if unix {
            let path = obj.req_str("path")?;
            obj.opt_bool("abstract")?;
            obj.opt_bool("tight")?;
            SocketAddress::Unix { path }
        } else {
            let host = obj.req_str("host")?;
            let port = obj.req_str("port")?;
            obj.opt_bool("numeric")?;
            obj.opt_u16("to")?;
            obj.opt_bool("ipv4")?;
            obj.opt_bool("ipv6")?;
            obj.opt_bool("keep-alive")?;
            obj.opt_bool("mptcp")?;
            SocketAddress::Inet { host, port }
        };
        Ok(address)
    }
}

impl std::fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddress::Unix { path } => write!(f, "{path}"),
            SocketAddress::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Everything needed to open a node: QEMU's `BlockdevOptions` for the
/// drivers bitmirror has.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    /// The node's name; required for nodes the user adds, generated for
    /// inline children.
    pub node_name: Option<String>,
    /// Refuse every write (`read-only`).
    pub read_only: bool,
    /// Open read-only where writing is not possible (`auto-read-only`).
    pub auto_read_only: bool,
    /// `discard`.
    pub discard: Discard,
    /// Bypass the host page cache (`cache.direct`).
    pub cache_direct: bool,
    /// Ignore flush requests (`cache.no-flush`).
    pub cache_no_flush: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// The driver and its options.
    pub driver: DriverOptions,
    /// Which inheritable options were given explicitly; an inline child
    /// takes the others from its parent, as in QEMU.
    pub explicit: Explicit,
}

/// Which of the options that children inherit were given explicitly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Explicit {
    /// `read-only` was given.
    pub read_only: bool,
    /// `auto-read-only` was given.
    pub auto_read_only: bool,
    /// `discard` was given.
    pub discard: bool,
    /// `cache.direct` was given.
    pub cache_direct: bool,
    /// `cache.no-flush` was given.
    pub cache_no_flush: bool,
}

impl BlockdevOptions {
    /// Takes the options this node did not set explicitly from `parent`
    /// (`read-only`, `auto-read-only`, `discard`, `cache.*`), as QEMU does
    /// for children created inline.
    pub fn inherit_from(&mut self, parent: &BlockdevOptions) {
        let e = self.explicit;
        if !e.read_only {
            self.read_only = parent.read_only;
        }
        if !e.auto_read_only {
            self.auto_read_only = parent.auto_read_only;
        }
        if !e.discard {
            self.discard = parent.discard;
        }
        if !e.cache_direct {
            self.cache_direct = parent.cache_direct;
        }
        if !e.cache_no_flush {
            self.cache_no_flush = parent.cache_no_flush;
        }
    }
}

/// QEMU's default length of a `null-co` node.
pub const NULL_CO_DEFAULT_SIZE: u64 = 1 << 30;

impl BlockdevOptions {
    /// Parses QMP's JSON form (`blockdev-add` arguments).
    pub fn from_json(value: &Value) -> Result<BlockdevOptions> {
        parse(Object::json(value)?)
    }

    /// Parses the JSON that QEMU's key=value syntax produces, where every
    /// scalar is a string (`"read-only": "on"`, `"size": "1G"`).
    pub fn from_keyval_json(value: &Value) -> Result<BlockdevOptions> {
        parse(Object::keyval(value)?)
    }

    /// Options for a node of `driver` with everything else at its default.
    pub fn new(node_name: Option<&str>, driver: DriverOptions) -> BlockdevOptions {
        BlockdevOptions {
            node_name: node_name.map(str::to_owned),
            read_only: false,
            auto_read_only: false,
            discard: Discard::default(),
            cache_direct: false,
            cache_no_flush: false,
            detect_zeroes: DetectZeroes::default(),
            driver,
            explicit: Explicit::default(),
        }
    }
}

fn parse(mut f: Object) -> Result<BlockdevOptions> {
    let driver_name = f.req_str("driver")?;
    let node_name = f.opt_str("node-name")?;
    let read_only = f.opt_bool("read-only")?;
    let auto_read_only = f.opt_bool("auto-read-only")?;
    let discard = f.opt_enum(
        "discard",
        &[("ignore", Discard::Ignore), ("unmap", Discard::Unmap)],
    )?;
    let (cache_direct, cache_no_flush) = match f.opt_object("cache")? {
        Some(mut cache) => {
            let direct = cache.opt_bool("direct")?;
            let no_flush = cache.opt_bool("no-flush")?;
            cache.finish()?;
            (direct, no_flush)
        }
        None => (None, None),
    };
    let explicit = Explicit {
        read_only: read_only.is_some(),
        auto_read_only: auto_read_only.is_some(),
        discard: discard.is_some(),
        cache_direct: cache_direct.is_some(),
        cache_no_flush: cache_no_flush.is_some(),
    };
    let read_only = read_only.unwrap_or(false);
    let auto_read_only = auto_read_only.unwrap_or(false);
    let discard = discard.unwrap_or_default();
    let cache_direct = cache_direct.unwrap_or(false);
    let cache_no_flush = cache_no_flush.unwrap_or(false);
    let detect_zeroes = f
        .opt_enum(
            "detect-zeroes",
            &[
                ("off", DetectZeroes::Off),
                ("on", DetectZeroes::On),
                ("unmap", DetectZeroes::Unmap),
            ],
        )?
        .unwrap_or_default();
    let driver = match driver_name.as_str() {
        "file" => DriverOptions::File {
            filename: f.req_str("filename")?,
            aio: f
                .opt_enum(
                    "aio",
                    &[
                        ("threads", Aio::Threads),
                        ("native", Aio::Threads),
                        ("io_uring", Aio::IoUring),
                    ],
                )?
                .unwrap_or_default(),
        },
        "raw" => DriverOptions::Raw {
            file: req_child(&mut f, "file")?,
            offset: f.opt_u64("offset")?.unwrap_or(0),
            size: f.opt_u64("size")?,
        },
        "qcow2" => DriverOptions::Qcow2 {
            file: req_child(&mut f, "file")?,
            backing: opt_nullable_child(&mut f, "backing")?,
            l2_cache_size: f.opt_u64("l2-cache-size")?,
            backing_protocols: f.opt_bool("x-backing-protocols")?.unwrap_or(false),
        },
        "nbd" => {
            let mut server = f.req_object("server")?;
            let address = SocketAddress::read(&mut server)?;
            server.finish()?;
            DriverOptions::Nbd {
                server: address,
                export: f.opt_str("export")?,
                x_dirty_bitmap: f.opt_str("x-dirty-bitmap")?,
                tls_creds: f.opt_str("tls-creds")?,
                tls_hostname: f.opt_str("tls-hostname")?,
            }
        }
        "rbd" => DriverOptions::Rbd(RbdOptions::read(&mut f)?),
        "throttle" => DriverOptions::Throttle {
            group: f.req_str("throttle-group")?,
            file: req_child(&mut f, "file")?,
        },
        "null-co" => DriverOptions::NullCo {
            // QAPI's `int`; QEMU 10.0 aborts on a negative one.
            size: match f.opt_i64("size")? {
                None => NULL_CO_DEFAULT_SIZE,
                Some(v) => u64::try_from(v).map_err(|_| qapi::Error::ParameterRange {
                    name: f.name("size"),
                    expected: "a non-negative size",
                })?,
            },
            read_zeroes: f.opt_bool("read-zeroes")?,
        },
        other => {
            return Err(qapi::Error::InvalidValue {
                name: "driver".into(),
                value: other.into(),
            }
            .into());
        }
    };
    f.finish()?;
    if detect_zeroes == DetectZeroes::Unmap && discard != Discard::Unmap {
        return Err(Error::DetectZeroesUnmap);
    }
    Ok(BlockdevOptions {
        node_name,
        read_only,
        auto_read_only,
        discard,
        cache_direct,
        cache_no_flush,
        detect_zeroes,
        driver,
        explicit,
    })
}

/// Reads a child member: a reference (`"file": "f0"`) or inline options.
fn req_child(f: &mut Object, key: &str) -> Result<ChildRef> {
    match f.take(key) {
        None => Err(f.missing(key).into()),
        Some(Value::String(s)) => Ok(ChildRef::Reference(s)),
        Some(v @ Value::Object(_)) => {
            let child = Object::nested(&v, &f.name(key), f.is_keyval())?;
            Ok(ChildRef::Inline(Box::new(parse(child)?)))
        }
        Some(_) => Err(f.type_error(key, "BlockdevRef").into()),
    }
}

/// A child that may also be `null` (none at all): absent → `None`.
fn opt_nullable_child(f: &mut Object, key: &str) -> Result<Option<Option<ChildRef>>> {
    match f.get(key) {
        None => Ok(None),
        Some(Value::Null) => {
            f.take(key);
            Ok(Some(None))
        }
        Some(_) => req_child(f, key).map(|c| Some(Some(c))),
    }
}

/// Checks a node name against QEMU's rules: 1..=31 bytes, letters, digits,
/// `-`, `.` and `_`, starting with a letter. (The duplicate check lies
/// between the two, as in QEMU, so callers check the length separately with
/// [`check_node_name_length`].)
pub fn check_node_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if well_formed {
        Ok(())
    } else {
        Err(Error::InvalidNodeName(name.to_owned()))
    }
}

/// Longest node name, in bytes.
pub const MAX_NODE_NAME: usize = 31;

/// The length half of QEMU's node-name rules.
pub fn check_node_name_length(name: &str) -> Result<()> {
    if name.len() > MAX_NODE_NAME {
        Err(Error::NodeNameTooLong)
    } else {
        Ok(())
    }
}

/// QEMU's NBD filenames (`nbd:unix:PATH[:exportname=E]`,
/// `nbd:HOST:PORT[:exportname=E]`, `nbd://HOST[:PORT]/E`,
/// `nbd+unix:///E?socket=PATH`) as a `driver=nbd` node's options; `None`
/// for anything else.
pub fn nbd_filename(name: &str) -> Option<serde_json::Value> {
    use serde_json::json;
    let (server, export) = if let Some(rest) = name.strip_prefix("nbd:unix:") {
        let (path, export) = match rest.split_once(":exportname=") {
            Some((p, e)) => (p, Some(e)),
            None => (rest, None),
        };
        (json!({"type": "unix", "path": path}), export)
    } else if let Some(rest) = name.strip_prefix("nbd+unix://") {
        let (path_part, query) = rest.split_once('?')?;
        let socket = query.split('&').find_map(|kv| kv.strip_prefix("socket="))?;
        let export = path_part.strip_prefix('/').filter(|e| !e.is_empty());
        (json!({"type": "unix", "path": socket}), export)
    } else if let Some(rest) = name.strip_prefix("nbd://") {
        let (hostport, export) = match rest.split_once('/') {
            Some((h, e)) => (h, Some(e).filter(|e| !e.is_empty())),
            None => (rest, None),
        };
        let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
        (json!({"type": "inet", "host": host, "port": port}), export)
    } else if let Some(rest) = name.strip_prefix("nbd:") {
        let (hostport, export) = match rest.split_once(":exportname=") {
            Some((h, e)) => (h, Some(e)),
            None => (rest, None),
        };
        let (host, port) = hostport.rsplit_once(':')?;
        (json!({"type": "inet", "host": host, "port": port}), export)
    } else {
        return None;
    };
    let mut o = json!({"driver": "nbd", "server": server});
    if let Some(e) = export {
        o["export"] = json!(e);
    }
    Some(o)
}

/// QEMU's RBD filenames, `rbd:POOL/[NAMESPACE/]IMAGE[@SNAPSHOT][:KEY=VALUE…]`,
/// split as QEMU splits them: `\\` escapes the next character (a lone
/// trailing one stands for itself); the pool ends at the first `/`, the
/// namespace (if any) at the next, the image at the first `@`; keys `conf`
/// and `id` become options, the others librados settings. `None` for
/// anything else or a malformed name (an empty pool, image, snapshot or
/// key, a `/` in the image, a field without `=`).
pub fn rbd_filename(name: &str) -> Option<RbdOptions> {
    let rest = name.strip_prefix("rbd:")?;
    let mut fields = split_unescaped(rest, ':').into_iter();
    let spec = fields.next()?;
    let (pool, after) = split_first(&spec, '/')?;
    let (namespace, after) = match split_first(&after, '/') {
        Some((ns, rest)) => (Some(unescape(&ns)), rest),
        None => (None, after),
    };
    let (image, snapshot) = match split_first(&after, '@') {
        Some((image, snap)) => (image, Some(unescape(&snap))),
        None => (after, None),
    };
    if pool.is_empty()
        || image.is_empty()
        || split_first(&image, '/').is_some()
        || snapshot.as_deref() == Some("")
    {
        return None;
    }
    let mut o = RbdOptions {
        pool: unescape(&pool),
        namespace,
        image: unescape(&image),
        snapshot,
        ..RbdOptions::default()
    };
    for field in fields {
        let (key, value) = split_first(&field, '=')?;
        let (key, value) = (unescape(&key), unescape(&value));
        match key.as_str() {
            "conf" => o.conf = Some(value),
            "id" => o.user = Some(value),
            "" => return None,
            _ => o.conf_pairs.push((key, value)),
        }
    }
    Some(o)
}

/// `s` split on the occurrences of `sep` that no `\\` escapes (escapes
/// kept).
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == sep {
            out.push(String::new());
            continue;
        }
        if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}

/// `s` cut at its first unescaped `sep` (escapes kept); `None` without one.
fn split_first(s: &str, sep: char) -> Option<(String, String)> {
    let mut parts = split_unescaped(s, sep).into_iter();
    let first = parts.next()?;
    let rest: Vec<String> = parts.collect();
    if rest.is_empty() {
        return None;
    }
    Some((first, rest.join(&sep.to_string())))
}

/// `s` without its `\\` escapes; a lone trailing `\\` stays.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next().unwrap_or('\\'));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        BlockdevOptions::from_json(&v).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_qemus() {
        let o =
            BlockdevOptions::from_json(&json!({"driver": "null-co", "node-name": "n0"})).unwrap();
        assert_eq!(o.node_name.as_deref(), Some("n0"));
        assert!(!o.read_only && !o.auto_read_only && !o.cache_direct && !o.cache_no_flush);
        assert_eq!(o.discard, Discard::Ignore);
        assert_eq!(o.detect_zeroes, DetectZeroes::Off);
        assert_eq!(
            o.driver,
            DriverOptions::NullCo {
                size: 1 << 30,
                read_zeroes: None
            }
        );
    }

    #[test]
    fn nested_children_and_cache() {
        let o = BlockdevOptions::from_json(&json!({
            "driver": "raw", "node-name": "disk0", "offset": 512,
            "discard": "unmap", "detect-zeroes": "unmap",
            "file": {"driver": "file", "filename": "/x", "aio": "io_uring",
                     "cache": {"direct": true}}
        }))
        .unwrap();
        let DriverOptions::Raw {
            file: ChildRef::Inline(child),
            offset: 512,
            size: None,
        } = o.driver
        else {
            panic!("{o:?}")
        };
        assert!(child.cache_direct);
        assert_eq!(
            child.driver,
            DriverOptions::File {
                filename: "/x".into(),
                aio: Aio::IoUring
            }
        );
    }

    #[test]
    fn errors_are_qemus() {
        assert_eq!(
            err(json!({"driver": "nosuch"})),
            "Parameter 'driver' does not accept value 'nosuch'"
        );
        assert_eq!(err(json!({})), "Parameter 'driver' is missing");
        assert_eq!(
            err(json!({"driver": "null-co", "read-only": "yes"})),
            "Invalid parameter type for 'read-only', expected: boolean"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "bogus": 1})),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "discard": "bogus"})),
            "Parameter 'discard' does not accept value 'bogus'"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "detect-zeroes": "unmap"})),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
        );
        assert_eq!(
            err(
                json!({"driver": "raw", "file": {"driver": "file", "filename": "/x", "cache": {"x": 1}}})
            ),
            "Parameter 'file.cache.x' is unexpected"
        );
        assert_eq!(err(json!({"driver": "raw"})), "Parameter 'file' is missing");
        assert_eq!(
            err(json!({"driver": "null-co", "size": -1})),
            "Parameter 'size' expects a non-negative size"
        );
    }

    #[test]
    fn keyval_scalars_are_strings() {
        let o = BlockdevOptions::from_keyval_json(&json!({
            "driver": "null-co", "node-name": "n", "size": "2147483648", "read-only": "on"
        }))
        .unwrap();
        assert!(o.read_only);
        assert_eq!(
            o.driver,
            DriverOptions::NullCo {
                size: 2 << 30,
                read_zeroes: None
            }
        );
    }

    #[test]
    fn rbd_options_and_filenames() {
        let o = BlockdevOptions::from_json(&json!({
            "driver": "rbd", "node-name": "r", "pool": "p", "image": "i",
            "conf": "/c", "user": "u", "namespace": "n", "snapshot": "s",
            "auth-client-required": ["cephx", "none"],
            "server": [{"host": "h", "port": "1"}]
        }))
        .unwrap();
        let DriverOptions::Rbd(r) = o.driver else {
            panic!("not rbd: {o:?}")
        };
        assert_eq!(r.spec(), "p/n/i@s");
        let mut back = r.to_qapi();
        back["node-name"] = json!("r");
        assert_eq!(
            BlockdevOptions::from_json(&back).unwrap().driver,
            DriverOptions::Rbd(r.clone())
        );
        assert_eq!(r.server, Some(vec![("h".into(), "1".into())]));
        assert_eq!(
            err(json!({"driver": "rbd", "pool": "p"})),
            "Parameter 'image' is missing"
        );
        assert!(
            err(json!({"driver": "rbd", "pool": "p", "image": "i", "encrypt": {}}))
                .contains("encryption")
        );
        assert!(
            err(json!({"driver": "rbd", "pool": "p", "image": "i", "auth-client-required": ["x"]}))
                .contains("auth-client-required[0]")
        );

        let f = rbd_filename("rbd:pool/img").unwrap();
        assert_eq!((f.pool.as_str(), f.image.as_str()), ("pool", "img"));
        let f =
            rbd_filename(r"rbd:pool/ns/im\:g@snap:conf=/etc/c\:x:id=admin:mon_host=1.2.3.4\:6789")
                .unwrap();
        assert_eq!(f.namespace.as_deref(), Some("ns"));
        assert_eq!(f.image, "im:g");
        assert_eq!(f.snapshot.as_deref(), Some("snap"));
        assert_eq!(f.conf.as_deref(), Some("/etc/c:x"));
        assert_eq!(f.user.as_deref(), Some("admin"));
        assert_eq!(
            f.conf_pairs,
            vec![("mon_host".into(), "1.2.3.4:6789".into())]
        );
        let f = rbd_filename(r"rbd:p/a\/b").unwrap();
        assert_eq!(f.image, "a/b");
        // QEMU's splits: the first unescaped '=' of a field, the first '@'.
        let f = rbd_filename(r"rbd:p/i@s@t:k\=x=v=w:z=tail\").unwrap_or_default();
        assert_eq!(f.snapshot.as_deref(), Some("s@t"));
        assert_eq!(
            f.conf_pairs,
            vec![("k=x".into(), "v=w".into()), ("z".into(), r"tail\".into())]
        );
        for bad in [
            "rbd:",
            "rbd:pool",
            "rbd:/img",
            "rbd:p/i@",
            "rbd:p/i:novalue",
            "nbd:x",
            "rbd:a/b/c/d",
        ] {
            assert!(rbd_filename(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn node_names() {
        for good in ["a", "disk0", "A-b.c_d", "x234567890123456789012345678901"] {
            check_node_name(good).unwrap();
        }
        for bad in ["", "1bad", "a#b", "-x", "ä"] {
            assert_eq!(
                check_node_name(bad).unwrap_err().to_string(),
                format!("Invalid node-name: '{bad}'")
            );
        }
        assert_eq!(
            check_node_name_length("abcdefghijabcdefghijabcdefghij12")
                .unwrap_err()
                .to_string(),
            "Node name too long"
        );
    }
}
