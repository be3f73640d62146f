//! Nodes as QEMU's query commands describe them (`BlockDeviceInfo`,
//! `ImageInfo`, `BlockDirtyInfo`), field by field as qemu-storage-daemon
//! 10.0 answers.

use std::sync::Arc;

use block::options::DetectZeroes;
use block::{ChildRole, FormatSpecific, Node};
use serde_json::{Map, Value, json};

/// `query-named-block-nodes`' entry for `node`; `flat` leaves out the
/// backing images.
pub fn block_device_info(node: &Arc<Node>, flat: bool) -> Value {
    let (direct, no_flush) = node.cache();
    let depth = if flat { 0 } else { backing_depth(node) };
    let mut info = json!({
        "file": filename(node),
        "node-name": node.name(),
        "ro": node.is_read_only(),
        "drv": node.driver_name(),
        "backing_file_depth": depth,
        "encrypted": false,
        "detect_zeroes": match node.detect_zeroes() {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        },
        "bps": 0, "bps_rd": 0, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "image": image_info(node, flat),
        "cache": {"writeback": true, "direct": direct, "no-flush": no_flush},
        "write_threshold": 0,
        "active": true,
    });
    if let Some(backing) = backing(node) {
        info["backing_file"] = json!(filename(&backing));
    }
    let bitmaps = dirty_bitmaps(node);
    if !bitmaps.is_empty() {
        info["dirty-bitmaps"] = Value::Array(bitmaps);
    }
    info
}

/// `ImageInfo` of `node`, with the backing chain unless `flat`.
fn image_info(node: &Arc<Node>, flat: bool) -> Value {
    let info = node.image_info();
    let mut image = Map::new();
    image.insert("filename".into(), json!(filename(node)));
    image.insert("format".into(), json!(node.driver_name()));
    // QEMU counts lengths in 512-byte sectors: a file's is rounded up.
    let length = match node.driver_name() {
        "file" => node.length().div_ceil(512) * 512,
        _ => node.length(),
    };
    image.insert("virtual-size".into(), json!(length));
    if let Some(size) = info.actual_size {
        image.insert("actual-size".into(), json!(size));
    }
    if let Some(size) = info.cluster_size {
        image.insert("cluster-size".into(), json!(size));
    }
    if let Some(dirty) = info.dirty {
        image.insert("dirty-flag".into(), json!(dirty));
    }
    if let Some(specific) = &info.format_specific {
        image.insert("format-specific".into(), format_specific(specific));
    }
    if !info.snapshots.is_empty() {
        // QEMU's SnapshotInfo for RBD snapshots: the name is the id, the
        // size the VM state size, no times.
        let list = info
            .snapshots
            .iter()
            .map(|(name, size)| {
                json!({"id": name, "name": name, "vm-state-size": size, "date-sec": 0,
                       "date-nsec": 0, "vm-clock-sec": 0, "vm-clock-nsec": 0, "icount": 0})
            })
            .collect();
        image.insert("snapshots".into(), Value::Array(list));
    }
    if let Some(name) = &info.backing_filename {
        image.insert("backing-filename".into(), json!(name));
        if let Some(format) = &info.backing_format {
            image.insert("backing-filename-format".into(), json!(format));
        }
    }
    if let Some(backing) = backing(node) {
        image.insert("full-backing-filename".into(), json!(filename(&backing)));
    }
    if let (Some(next), false) = (chain_next(node), flat) {
        image.insert("backing-image".into(), image_info(&next, false));
    }
    Value::Object(image)
}

fn format_specific(specific: &FormatSpecific) -> Value {
    match specific {
        FormatSpecific::File => json!({"type": "file", "data": {}}),
        FormatSpecific::Rbd => json!({"type": "rbd", "data": {}}),
        FormatSpecific::Qcow2 {
            compat,
            lazy_refcounts,
            refcount_bits,
            corrupt,
            extended_l2,
            compression_type,
        } => {
            let mut data = json!({
                "compat": compat,
                "compression-type": compression_type,
                "refcount-bits": refcount_bits,
            });
            if let Some(v) = lazy_refcounts {
                data["lazy-refcounts"] = json!(v);
            }
            if let Some(v) = corrupt {
                data["corrupt"] = json!(v);
            }
            if let Some(v) = extended_l2 {
                data["extended-l2"] = json!(v);
            }
            json!({"type": "qcow2", "data": data})
        }
    }
}

/// `BlockDirtyInfo` of each bitmap of `node`: a backup's nameless
/// successors first (they are the newest), then the named ones.
pub fn dirty_bitmaps(node: &Node) -> Vec<Value> {
    let bitmaps = node.bitmaps();
    let successors = bitmaps.successors_info().into_iter().map(|b| {
        json!({
            "recording": b.recording,
            "persistent": false,
            "busy": b.busy,
            "granularity": b.granularity,
            "count": b.count,
        })
    });
    successors
        .chain(bitmaps.info().into_iter().map(|b| {
            let mut v = json!({
                "name": b.name,
                "recording": b.recording,
                "persistent": b.persistent,
                "busy": b.busy,
                "granularity": b.granularity,
                "count": b.count,
            });
            if b.inconsistent {
                v["inconsistent"] = json!(true);
            }
            v
        }))
        .collect()
}

/// QEMU's `filename` of a node: the file a protocol driver opened, a
/// format driver's `file` child's, or a `json:` description.
pub fn filename(node: &Node) -> String {
    if is_filter(node) {
        return format!("json:{}", qmp::json::to_string(&description(node)));
    }
    if let Some(name) = node.filename() {
        return name.to_owned();
    }
    if let Some(child) = file_child(node) {
        return filename(&child);
    }
    if node.driver_name() == "null-co"
        && node.length() == block::options::NULL_CO_DEFAULT_SIZE
        && node.image_info().read_zeroes.is_none()
    {
        return "null-co://".into();
    }
    format!("json:{}", qmp::json::to_string(&description(node)))
}

/// The options that describe `node` in a `json:` filename.
fn description(node: &Node) -> Value {
    if let Some(d) = node.image_info().description {
        return d;
    }
    match node.driver_name() {
        "file" => json!({"driver": "file", "filename": node.filename().unwrap_or_default()}),
        "null-co" => {
            let mut d = json!({"driver": "null-co"});
            if node.length() != block::options::NULL_CO_DEFAULT_SIZE {
                d["size"] = json!(node.length());
            }
            if let Some(z) = node.image_info().read_zeroes {
                d["read-zeroes"] = json!(z);
            }
            d
        }
        "throttle" => {
            let mut d = json!({
                "driver": "throttle",
                "throttle-group": node.image_info().throttle_group.unwrap_or_default(),
            });
            if let Some(child) = file_child(node) {
                d["file"] = description(&child);
            }
            d
        }
        other => match file_child(node) {
            Some(child) => json!({"driver": other, "file": description(&child)}),
            None => json!({"driver": other}),
        },
    }
}

/// Whether `node` is a filter (its `file` child continues its chain).
fn is_filter(node: &Node) -> bool {
    node.driver_name() == "throttle"
}

fn file_child(node: &Node) -> Option<Arc<Node>> {
    node.children()
        .iter()
        .find(|(r, _)| *r == ChildRole::File)
        .map(|(_, e)| e.node())
}

/// The next node down the chain: the backing node, or a filter's child.
fn chain_next(node: &Node) -> Option<Arc<Node>> {
    backing(node).or_else(|| {
        if is_filter(node) {
            file_child(node)
        } else {
            None
        }
    })
}

fn backing(node: &Node) -> Option<Arc<Node>> {
    node.children()
        .iter()
        .find(|(r, _)| *r == ChildRole::Backing)
        .map(|(_, e)| e.node())
}

fn backing_depth(node: &Arc<Node>) -> u64 {
    let mut depth = 0;
    let mut cur = chain_next(node);
    while let Some(n) = cur {
        depth += 1;
        cur = chain_next(&n);
    }
    depth
}
