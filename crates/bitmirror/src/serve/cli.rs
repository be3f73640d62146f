//! qemu-storage-daemon's command line: every option parsed and checked
//! before anything is opened, so a bad option touches no image.

use std::path::PathBuf;

use block::BlockdevOptions;
use qapi::{Object, keyval};
use serde_json::Value;

use super::args::{ExportArgs, NbdServerArgs, ObjectArgs};

/// One option that makes something, in command-line order.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The option as written (`--blockdev driver=…`), for error messages.
    pub origin: String,
    /// What it makes.
    pub kind: ItemKind,
}

/// What an [`Item`] makes.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemKind {
    /// `--blockdev`: a node.
    Blockdev(BlockdevOptions),
    /// `--chardev`: a character device for monitors.
    Chardev(Chardev),
    /// `--monitor`: a QMP monitor on a chardev.
    Monitor {
        /// The chardev's id.
        chardev: String,
    },
    /// `--nbd-server`: start the NBD server.
    NbdServer(NbdServerArgs),
    /// `--export`: an export.
    Export(ExportArgs),
    /// `--object`: a user-creatable object.
    Object(ObjectArgs),
}

/// A `--chardev` that monitors can use.
#[derive(Debug, Clone, PartialEq)]
pub struct Chardev {
    /// Its id.
    pub id: String,
    /// Its backend.
    pub backend: ChardevBackend,
}

/// Where a chardev's bytes go.
#[derive(Debug, Clone, PartialEq)]
pub enum ChardevBackend {
    /// A unix socket we listen on (`server=on`) or connect to.
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// Listen (`server=on`) rather than connect.
        server: bool,
        /// With `server=on`: wait for the first client before going on
        /// (QEMU's default, `wait=on`).
        wait: bool,
    },
    /// A TCP socket we listen on or connect to.
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: String,
        /// Listen rather than connect.
        server: bool,
        /// Wait for the first client before going on.
        wait: bool,
    },
    /// Standard input and output.
    Stdio,
}

/// The whole command line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Options {
    /// Options that make things, in order.
    pub items: Vec<Item>,
    /// `--pidfile`.
    pub pidfile: Option<PathBuf>,
    /// `--daemonize`.
    pub daemonize: bool,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// Run the daemon.
    Run(Options),
    /// Print the help and exit.
    Help,
    /// Print the version and exit.
    Version,
}

/// A command-line error, worded as qemu-storage-daemon words it (the
/// program name is added by the caller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

/// Options that take an argument, with their implied key.
const WITH_ARGUMENT: &[(&str, Option<&str>)] = &[
    ("blockdev", Some("driver")),
    ("chardev", Some("backend")),
    ("export", Some("type")),
    ("monitor", Some("chardev")),
    ("nbd-server", None),
    ("object", Some("qom-type")),
    ("pidfile", None),
    ("trace", Some("enable")),
];

/// Parses qemu-storage-daemon's arguments (without the program name).
pub fn parse(args: &[String]) -> Result<Parsed, CliError> {
    let mut options = Options::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let (name, inline) = match arg.strip_prefix("--") {
            Some(rest) => match rest.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (rest.to_owned(), None),
            },
            None => match arg.as_str() {
                "-h" => ("help".to_owned(), None),
                "-V" => ("version".to_owned(), None),
                "-T" => ("trace".to_owned(), None),
                _ if arg.starts_with('-') && arg.len() > 1 => {
                    return Err(CliError(format!("invalid option -- '{}'", &arg[1..])));
                }
                _ => return Err(CliError(format!("{arg}: Unexpected argument"))),
            },
        };
        match name.as_str() {
            "help" => return Ok(Parsed::Help),
            "version" => return Ok(Parsed::Version),
            "daemonize" => {
                if inline.is_some() {
                    return Err(CliError(
                        "option '--daemonize' doesn't allow an argument".into(),
                    ));
                }
                options.daemonize = true;
                continue;
            }
            _ => {}
        }
        let Some(&(_, implied)) = WITH_ARGUMENT.iter().find(|(n, _)| *n == name) else {
            return Err(CliError(format!("unrecognized option '{arg}'")));
        };
        let value = match inline {
            Some(v) => v,
            None => {
                let Some(v) = args.get(i) else {
                    return Err(CliError(format!("option '--{name}' requires an argument")));
                };
                i += 1;
                v.clone()
            }
        };
        let origin = format!("--{name} {value}");
        let fail = |message: String| CliError(format!("{origin}: {message}"));
        let kind = match name.as_str() {
            "pidfile" => {
                options.pidfile = Some(PathBuf::from(&value));
                continue;
            }
            // Tracing goes through RUST_LOG; the option is accepted so
            // scripts that pass it keep working.
            "trace" => continue,
            "blockdev" => {
                let json = structured(&value, implied).map_err(&fail)?;
                let options = if value.starts_with('{') {
                    BlockdevOptions::from_json(&json)
                } else {
                    BlockdevOptions::from_keyval_json(&json)
                };
                ItemKind::Blockdev(options.map_err(|e| fail(e.to_string()))?)
            }
            "chardev" => {
                let json = keyval::parse(&value, implied).map_err(|e| fail(e.to_string()))?;
                ItemKind::Chardev(chardev(&json).map_err(fail)?)
            }
            "monitor" => {
                let json = structured(&value, implied).map_err(&fail)?;
                let mut o = reader(&value, &json).map_err(|e| fail(e.to_string()))?;
                let read = (|| {
                    let chardev = o.req_str("chardev")?;
                    let mode = o.opt_enum("mode", &[("control", true), ("readline", false)])?;
                    let pretty = o.opt_bool("pretty")?;
                    o.finish()?;
                    Ok::<_, qapi::Error>((chardev, mode, pretty))
                })();
                let (chardev, mode, pretty) = read.map_err(|e| fail(e.to_string()))?;
                if mode == Some(false) {
                    return Err(fail("Only QMP is supported".into()));
                }
                if pretty == Some(true) {
                    return Err(fail("pretty=on is not supported by bitmirror".into()));
                }
                ItemKind::Monitor { chardev }
            }
            "nbd-server" => {
                let json = structured(&value, implied).map_err(&fail)?;
                let mut o = reader(&value, &json).map_err(|e| fail(e.to_string()))?;
                let args = NbdServerArgs::read(&mut o, false)
                    .and_then(|a| o.finish().map(|()| a).map_err(Into::into))
                    .map_err(|e| fail(e.to_string()))?;
                ItemKind::NbdServer(args)
            }
            "export" => {
                let json = structured(&value, implied).map_err(&fail)?;
                let mut o = reader(&value, &json).map_err(|e| fail(e.to_string()))?;
                let args = ExportArgs::read(&mut o)
                    .and_then(|a| o.finish().map(|()| a))
                    .map_err(|e| fail(e.to_string()))?;
                ItemKind::Export(args)
            }
            "object" => {
                let json = structured(&value, implied).map_err(&fail)?;
                let mut o = reader(&value, &json).map_err(|e| fail(e.to_string()))?;
                ItemKind::Object(ObjectArgs::read(&mut o).map_err(|e| fail(e.to_string()))?)
            }
            _ => return Err(CliError(format!("unrecognized option '{arg}'"))),
        };
        options.items.push(Item { origin, kind });
    }
    Ok(Parsed::Run(options))
}

/// An option's value as JSON: JSON when it starts with `{`, key=value
/// otherwise.
fn structured(value: &str, implied: Option<&str>) -> Result<Value, String> {
    if value.starts_with('{') {
        let json: Value =
            serde_json::from_str(value).map_err(|e| format!("JSON parse error, {e}"))?;
        if !json.is_object() {
            return Err("JSON value must be an object".into());
        }
        Ok(json)
    } else {
        keyval::parse(value, implied).map_err(|e| e.to_string())
    }
}

/// A reader for `json`, typed or key=value as `value` was written.
fn reader(value: &str, json: &Value) -> qapi::Result<Object> {
    if value.starts_with('{') {
        Object::json(json)
    } else {
        Object::keyval(json)
    }
}

/// Reads a `--chardev` (QEMU's QemuOpts for chardevs; monitors only need
/// `socket` and `stdio`).
fn chardev(json: &Value) -> Result<Chardev, String> {
    let mut o = Object::keyval(json).map_err(|e| e.to_string())?;
    let read = (|| {
        let backend = o.req_str("backend")?;
        let id = o.req_str("id")?;
        Ok::<_, qapi::Error>((backend, id))
    })();
    let (backend, id) = match read {
        Ok(v) => v,
        Err(qapi::Error::MissingParameter(p)) if p == "id" => {
            return Err("Parameter 'id' is missing".into());
        }
        Err(e) => return Err(e.to_string()),
    };
    let backend = match backend.as_str() {
        "socket" => {
            let read = (|| {
                let path = o.opt_str("path")?;
                let host = o.opt_str("host")?;
                let port = o.opt_str("port")?;
                let server = o.opt_bool("server")?.unwrap_or(false);
                let wait = o.opt_bool("wait")?.unwrap_or(true);
                o.opt_bool("nodelay")?;
                o.opt_bool("telnet")?;
                o.opt_u32("reconnect")?;
                o.opt_u32("reconnect-ms")?;
                Ok::<_, qapi::Error>((path, host, port, server, wait))
            })();
            let (path, host, port, server, wait) = read.map_err(|e| e.to_string())?;
            match (path, host, port) {
                (Some(path), None, None) => ChardevBackend::Socket {
                    path: PathBuf::from(path),
                    server,
                    wait,
                },
                (None, host, Some(port)) => ChardevBackend::Tcp {
                    host: host.unwrap_or_else(|| "0.0.0.0".into()),
                    port,
                    server,
                    wait,
                },
                (None, _, None) => return Err("chardev: socket: no host given".into()),
                _ => {
                    return Err(
                        "chardev: socket: 'path' and 'host'/'port' exclude each other".into(),
                    );
                }
            }
        }
        "stdio" => {
            o.opt_bool("signal").map_err(|e| e.to_string())?;
            ChardevBackend::Stdio
        }
        other => return Err(format!("'{other}' is not a valid char driver name")),
    };
    o.opt_str("logfile").map_err(|e| e.to_string())?;
    o.opt_bool("logappend").map_err(|e| e.to_string())?;
    o.opt_bool("mux").map_err(|e| e.to_string())?;
    if let Some(key) = o.take_rest().keys().next() {
        return Err(format!("Invalid parameter '{key}'"));
    }
    Ok(Chardev { id, backend })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn err(s: &[&str]) -> String {
        parse(&args(s)).unwrap_err().to_string()
    }

    #[test]
    fn options_in_order() {
        let Parsed::Run(o) = parse(&args(&[
            "--blockdev",
            "null-co,node-name=n,size=1048576",
            "--chardev",
            "socket,path=/tmp/q.sock,server=on,wait=off,id=m0",
            "--monitor",
            "m0",
            "--nbd-server",
            "addr.type=unix,addr.path=/tmp/n.sock,max-connections=4",
            "--export=nbd,id=e0,node-name=n,writable=on,bitmaps.0=b",
            "--object",
            "iothread,id=io0",
            "--pidfile",
            "/tmp/p",
            "--daemonize",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(o.items.len(), 6);
        assert!(o.daemonize);
        assert_eq!(o.pidfile, Some(PathBuf::from("/tmp/p")));
        assert!(
            matches!(&o.items[0].kind, ItemKind::Blockdev(b) if b.node_name.as_deref() == Some("n"))
        );
        assert_eq!(
            o.items[1].kind,
            ItemKind::Chardev(Chardev {
                id: "m0".into(),
                backend: ChardevBackend::Socket {
                    path: "/tmp/q.sock".into(),
                    server: true,
                    wait: false
                }
            })
        );
        assert_eq!(
            o.items[2].kind,
            ItemKind::Monitor {
                chardev: "m0".into()
            }
        );
        let ItemKind::NbdServer(n) = &o.items[3].kind else {
            panic!()
        };
        assert_eq!(n.max_connections, 4);
        let ItemKind::Export(e) = &o.items[4].kind else {
            panic!()
        };
        assert!(e.writable);
        assert_eq!(
            e.bitmaps,
            vec![super::super::args::BitmapRef::Local("b".into())]
        );
        assert_eq!(
            o.items[4].origin,
            "--export nbd,id=e0,node-name=n,writable=on,bitmaps.0=b"
        );
    }

    #[test]
    fn json_form() {
        let Parsed::Run(o) = parse(&args(&[
            "--blockdev",
            r#"{"driver": "null-co", "node-name": "j", "size": 4096}"#,
        ]))
        .unwrap() else {
            panic!()
        };
        assert!(
            matches!(&o.items[0].kind, ItemKind::Blockdev(b) if b.node_name.as_deref() == Some("j"))
        );
    }

    #[test]
    fn errors_are_qemus() {
        assert_eq!(
            err(&["--blockdev", "driver=nosuch,node-name=x"]),
            "--blockdev driver=nosuch,node-name=x: Parameter 'driver' does not accept value 'nosuch'"
        );
        assert_eq!(err(&["--frobnicate"]), "unrecognized option '--frobnicate'");
        assert_eq!(err(&["stray"]), "stray: Unexpected argument");
        assert_eq!(
            err(&["--blockdev"]),
            "option '--blockdev' requires an argument"
        );
        assert_eq!(
            err(&["--nbd-server", "addr.type=inet,addr.host=127.0.0.1"]),
            "--nbd-server addr.type=inet,addr.host=127.0.0.1: Parameter 'addr.port' is missing"
        );
        assert_eq!(
            err(&["--export", "nbd,id=e0,node-name=n,writable=maybe"]),
            "--export nbd,id=e0,node-name=n,writable=maybe: Parameter 'writable' expects 'on' or 'off'"
        );
        assert_eq!(
            parse(&args(&["--help", "--frobnicate"])).unwrap(),
            Parsed::Help
        );
    }
}
