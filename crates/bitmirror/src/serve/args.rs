//! Arguments shared by the command line and QMP: `--nbd-server` and
//! `nbd-server-start`, `--export` and `block-export-add`, `--object` and
//! `object-add`. Each is read from a [`qapi::Object`], so the command line
//! (key=value strings) and QMP (typed JSON) share one reader and QEMU's
//! error texts.

use block::SocketAddress;
use qapi::Object;
use serde_json::{Map, Value};

/// `nbd-server-start` / `--nbd-server`.
#[derive(Debug, Clone, PartialEq)]
pub struct NbdServerArgs {
    /// Where to listen.
    pub addr: SocketAddress,
    /// Most clients at once (0: no limit).
    pub max_connections: u32,
    /// Seconds a client may take to finish the handshake (QEMU 10.0:
    /// `handshake-max-seconds`, default 10; 0 waits forever).
    pub handshake_max_seconds: u32,
    /// The id of a `tls-creds-x509` object with `endpoint=server`.
    pub tls_creds: Option<String>,
    /// The id of an `authz-simple` object: the one client certificate
    /// subject let in.
    pub tls_authz: Option<String>,
}

impl NbdServerArgs {
    /// Reads the arguments; `legacy` for QMP's `nbd-server-start`, whose
    /// `addr` is a `SocketAddressLegacy` (`{"type": …, "data": {…}}`).
    pub fn read(obj: &mut Object, legacy: bool) -> block::Result<NbdServerArgs> {
        let mut addr_obj = obj.req_object("addr")?;
        let addr = if legacy {
            SocketAddress::read_legacy(&mut addr_obj)?
        } else {
            SocketAddress::read(&mut addr_obj)?
        };
        addr_obj.finish()?;
        let tls_creds = obj.opt_str("tls-creds")?;
        let tls_authz = obj.opt_str("tls-authz")?;
        let max_connections = obj.opt_u32("max-connections")?.unwrap_or(0);
        let handshake_max_seconds = obj.opt_u32("handshake-max-seconds")?.unwrap_or(10);
        Ok(NbdServerArgs {
            addr,
            max_connections,
            handshake_max_seconds,
            tls_creds,
            tls_authz,
        })
    }
}

/// A bitmap named by a node and a name, or by a name alone (QAPI's
/// `BlockDirtyBitmapOrStr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapRef {
    /// A bitmap of the node the command is about.
    Local(String),
    /// A bitmap of another node.
    External {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
}

impl BitmapRef {
    /// Reads one list element (`name` is its dotted name for errors).
    pub fn read(name: &str, value: &Value, keyval: bool) -> qapi::Result<BitmapRef> {
        match value {
            Value::String(s) => Ok(BitmapRef::Local(s.clone())),
            Value::Object(_) => {
                let mut o = Object::nested(value, name, keyval)?;
                let node = o.req_str("node")?;
                let bitmap = o.req_str("name")?;
                o.finish()?;
                Ok(BitmapRef::External { node, name: bitmap })
            }
            // QEMU names a mistyped alternate 'null'.
            _ => Err(qapi::Error::InvalidParameterType {
                name: "null".into(),
                expected: "BlockDirtyBitmapOrStr",
            }),
        }
    }
}

/// `block-export-add` / `--export` for `type=nbd`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportArgs {
    /// The export's id.
    pub id: String,
    /// The node exported.
    pub node_name: String,
    /// Whether clients may write.
    pub writable: bool,
    /// The name clients ask for (the node name by default).
    pub name: Option<String>,
    /// Sent to clients that ask.
    pub description: Option<String>,
    /// Bitmaps published as `qemu:dirty-bitmap:NAME`.
    pub bitmaps: Vec<BitmapRef>,
    /// Publish `qemu:allocation-depth`.
    pub allocation_depth: bool,
}

impl ExportArgs {
    /// Reads the arguments (the export `type` included).
    pub fn read(obj: &mut Object) -> qapi::Result<ExportArgs> {
        obj.req_enum("type", &[("nbd", ())])?;
        let id = obj.req_str("id")?;
        obj.opt_bool("fixed-iothread")?;
        obj.opt_str("iothread")?;
        let node_name = obj.req_str("node-name")?;
        let writable = obj.opt_bool("writable")?.unwrap_or(false);
        obj.opt_bool("writethrough")?;
        obj.opt_bool("allow-inactive")?;
        let name = obj.opt_str("name")?;
        let description = obj.opt_str("description")?;
        let keyval = obj.is_keyval();
        let bitmaps = match obj.opt_list("bitmaps")? {
            Some(items) => items
                .iter()
                .map(|(name, v)| BitmapRef::read(name, v, keyval))
                .collect::<qapi::Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let allocation_depth = obj.opt_bool("allocation-depth")?.unwrap_or(false);
        Ok(ExportArgs {
            id,
            node_name,
            writable,
            name,
            description,
            bitmaps,
            allocation_depth,
        })
    }
}

/// The object types `object-add` knows.
pub const OBJECT_TYPES: &[(&str, &str)] = &[
    ("iothread", "iothread"),
    ("throttle-group", "throttle-group"),
    ("tls-creds-x509", "tls-creds-x509"),
    ("authz-simple", "authz-simple"),
];

/// `object-add` / `--object`: a QOM type, an id, and its properties.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectArgs {
    /// The type (`iothread`, `throttle-group`, …).
    pub qom_type: String,
    /// The object's id.
    pub id: String,
    /// Everything else, to be read by the type.
    pub props: Map<String, Value>,
    /// Whether the properties are key=value strings.
    pub keyval: bool,
}

impl ObjectArgs {
    /// Reads the type and id; the remaining members are the properties.
    pub fn read(obj: &mut Object) -> qapi::Result<ObjectArgs> {
        let qom_type = obj.req_enum("qom-type", OBJECT_TYPES)?.to_owned();
        let id = obj.req_str("id")?;
        // QEMU's rule for ids: a letter, then letters, digits, '-', '.', '_'.
        let mut chars = id.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !well_formed {
            return Err(qapi::Error::ParameterRange {
                name: obj.name("id"),
                expected: "an identifier",
            });
        }
        let props = obj.take_rest();
        Ok(ObjectArgs {
            qom_type,
            id,
            props,
            keyval: obj.is_keyval(),
        })
    }
}
