//! Creating images: what `qemu-img create` does, for the formats we write.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::buf::IoBuf;
use crate::error::{Error, Result};
use crate::node::Node;

/// What a new qcow2 image looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Create {
    /// Virtual size in bytes.
    pub size: u64,
    /// Cluster size: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// Backing file name as stored in the image (relative names are
    /// relative to the image's directory) and its format.
    pub backing: Option<(String, String)>,
}

impl Qcow2Create {
    /// A `size`-byte image with 64 KiB clusters and no backing file.
    pub fn new(size: u64) -> Qcow2Create {
        Qcow2Create {
            size,
            cluster_size: 1 << 16,
            backing: None,
        }
    }
}

const MAGIC: u32 = 0x5146_49fb;
const HEADER_LENGTH: usize = 112;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// The pieces of a new, empty qcow2 image: `(offset, bytes)` to write, in
/// order, and the image's length.
pub(crate) struct Layout {
    pub(crate) pieces: Vec<(u64, Vec<u8>)>,
    pub(crate) length: u64,
}

/// Lays out a new, empty qcow2 (version 3, 16-bit refcounts, no lazy
/// refcounts): the header, a refcount table and the refcount blocks that
/// count the metadata clusters, and a zeroed L1 table. `name` is for
/// errors.
pub(crate) fn layout(name: &str, opts: &Qcow2Create) -> Result<Layout> {
    let invalid = |reason: String| Error::BadImage {
        node: name.to_owned(),
        format: "qcow2",
        reason,
    };
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(invalid(format!(
            "cluster size {cs} is not a power of two from 512 to 2097152"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    let l2_entries = cs / 8;
    let l1_size = opts.size.div_ceil(cs).div_ceil(l2_entries);
    if l1_size * 8 > 32 << 20 {
        return Err(invalid(format!(
            "{} bytes need too large an L1 table",
            opts.size
        )));
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    // Refcount blocks (16-bit entries) must count every metadata cluster,
    // themselves and the refcount table included: find the fixpoint.
    let per_block = cs / 2;
    let (mut table_clusters, mut blocks) = (1u64, 1u64);
    loop {
        let metadata = 1 + table_clusters + blocks + l1_clusters;
        let need_blocks = metadata.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cs);
        if (need_blocks, need_table) == (blocks, table_clusters) {
            break;
        }
        (blocks, table_clusters) = (need_blocks, need_table);
    }
    let table_offset = cs;
    let blocks_offset = table_offset + table_clusters * cs;
    let l1_offset = blocks_offset + blocks * cs;
    let metadata = 1 + table_clusters + blocks + l1_clusters;

    let mut header = vec![0u8; cs as usize];
    let mut put = |at: usize, bytes: &[u8]| header[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &MAGIC.to_be_bytes());
    put(4, &3u32.to_be_bytes());
    put(20, &cluster_bits.to_be_bytes());
    put(24, &opts.size.to_be_bytes());
    put(36, &(l1_size as u32).to_be_bytes());
    put(40, &l1_offset.to_be_bytes());
    put(48, &table_offset.to_be_bytes());
    put(56, &(table_clusters as u32).to_be_bytes());
    put(96, &4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    put(100, &(HEADER_LENGTH as u32).to_be_bytes());
    let mut at = HEADER_LENGTH;
    if let Some((name, format)) = &opts.backing {
        let needed = HEADER_LENGTH + 8 + format.len().next_multiple_of(8) + 8 + name.len();
        if needed > cs as usize {
            return Err(invalid(
                "the backing file name and format do not fit in the first cluster".into(),
            ));
        }
        put(at, &EXT_BACKING_FORMAT.to_be_bytes());
        put(at + 4, &(format.len() as u32).to_be_bytes());
        put(at + 8, format.as_bytes());
        at += 8 + format.len().next_multiple_of(8);
        at += 8; // end of extensions: type 0, length 0
        put(8, &(at as u64).to_be_bytes());
        put(16, &(name.len() as u32).to_be_bytes());
        put(at, name.as_bytes());
    }

    let mut table = vec![0u8; (table_clusters * cs) as usize];
    for b in 0..blocks {
        let entry = (blocks_offset + b * cs).to_be_bytes();
        table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&entry);
    }
    let mut refcounts = vec![0u8; (blocks * cs) as usize];
    for c in 0..metadata {
        refcounts[(c * 2) as usize..(c * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
    }

    let l1 = vec![0u8; (l1_size * 8).max(8) as usize];
    Ok(Layout {
        length: l1_offset + l1.len() as u64,
        pieces: vec![
            (0, header),
            (table_offset, table),
            (blocks_offset, refcounts),
            (l1_offset, l1),
        ],
    })
}

/// Writes a new, empty qcow2 (see [`Qcow2Create`]) at `path`, which must
/// not exist. `qemu-img check` finds it clean.
pub fn create_qcow2(path: &Path, opts: &Qcow2Create) -> Result<()> {
    let layout = layout(&path.display().to_string(), opts)?;
    let io = |e| Error::Open {
        path: path.display().to_string(),
        source: e,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    for (offset, bytes) in &layout.pieces {
        file.write_all_at(bytes, *offset).map_err(io)?;
    }
    file.set_len(layout.length).map_err(io)?;
    file.flush().map_err(io)?;
    file.sync_all().map_err(io)
}

/// Writes a new, empty qcow2 (see [`Qcow2Create`]) through `node` (a
/// writable protocol node, as `blockdev-create` with `driver=qcow2` does),
/// replacing what the image's metadata covers (growing a file that is
/// too short), and flushes it.
pub async fn create_qcow2_on(node: &Node, opts: &Qcow2Create) -> Result<()> {
    let layout = layout(node.name(), opts)?;
    for (offset, bytes) in layout.pieces {
        let buf = IoBuf::copy_from(&bytes, node.limits().memory_alignment);
        node.write_growing(offset, buf, false).await.0?;
    }
    node.flush().await
}
