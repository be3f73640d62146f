//! The qcow2 header (`docs/interop/qcow2.txt`, "Header") and its
//! extensions: parsed once at open, checked for everything the driver later
//! relies on, so that no field of a hostile image can make it read or
//! allocate without bound.

use crate::error::{Error, Result};

/// `QFI\xfb`.
pub(crate) const MAGIC: u32 = 0x5146_49fb;
/// Largest L1 table accepted (QEMU's `QCOW_MAX_L1_SIZE`).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted (QEMU's `QCOW_MAX_REFTABLE_SIZE`).
const MAX_REFTABLE_BYTES: u64 = 8 << 20;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
/// bitmirror's activity log (ours; QEMU keeps unknown extensions).
pub(crate) const EXT_ACTIVITY: u32 = 0x6269_746d;

/// Byte offsets of header fields the driver rewrites.
pub(crate) mod field {
    /// `refcount_table_offset` (u64) followed by `refcount_table_clusters`
    /// (u32): rewritten together when the refcount table moves.
    pub const REFCOUNT_TABLE: u64 = 48;
    /// `autoclear_features` (u64, version 3).
    pub const AUTOCLEAR: u64 = 88;
}

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts).
pub(crate) const INCOMPAT_DIRTY: u64 = 1;
/// Incompatible feature bit 1: the image was found corrupt.
pub(crate) const INCOMPAT_CORRUPT: u64 = 2;
/// Autoclear feature bit 0: the bitmaps extension is valid.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1;
/// Autoclear feature bit 63 (ours): the activity log is valid. QEMU clears
/// it when it opens the image writable, as it must for bits it does not
/// know, so a log it could not keep up to date is never trusted.
pub(crate) const AUTOCLEAR_ACTIVITY: u64 = 1 << 63;

/// A header extension, as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The parsed image header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width in bits (4: 16-bit refcounts).
    pub refcount_order: u32,
    pub nb_snapshots: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// The bitmaps extension, when the autoclear bit says it is valid.
    pub bitmaps: Option<Vec<u8>>,
    /// Our activity log extension, when our autoclear bit says it is valid.
    pub activity: Option<Vec<u8>>,
    /// The fixed header as found (`header_length` bytes), every extension
    /// in order (unknown ones included) and the backing file name's bytes:
    /// what a rewrite of the header keeps.
    pub raw: Vec<u8>,
    pub extensions: Vec<Extension>,
    pub backing_raw: Option<Vec<u8>>,
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

impl Header {
    /// Bytes of the fixed header needed to learn the cluster size.
    pub(crate) const PROBE: usize = 104;

    /// Parses the header from `first`, the image's first cluster (or all of
    /// the file if shorter). Checks everything later reads rely on.
    pub(crate) fn parse(node: &str, first: &[u8], file_len: u64) -> Result<Header> {
        let bad = |reason: String| Error::BadImage {
            node: node.to_owned(),
            format: "qcow2",
            reason,
        };
        let unsupported = |feature: String| Error::UnsupportedFeature {
            node: node.to_owned(),
            feature,
        };
        if first.len() < 72 || be32(first, 0) != MAGIC {
            return Err(bad("no qcow2 magic".into()));
        }
        let version = be32(first, 4);
        if !(2..=3).contains(&version) {
            return Err(unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(first, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster bits {cluster_bits} outside 9..=21")));
        }
        let cluster_size = 1usize << cluster_bits;
        let (incompatible, autoclear, refcount_order, header_length, compression_type) =
            if version == 3 {
                if first.len() < Self::PROBE {
                    return Err(bad("version 3 header is truncated".into()));
                }
                let header_length = be32(first, 100);
                let compression = if header_length > 104 && first.len() > 104 {
                    first[104]
                } else {
                    0
                };
                (
                    be64(first, 72),
                    be64(first, 88),
                    be32(first, 96),
                    header_length as usize,
                    compression,
                )
            } else {
                (0, 0, 4, 72, 0)
            };
        if header_length < 72 || header_length > first.len().min(cluster_size) {
            return Err(bad(format!("header length {header_length}")));
        }
        if refcount_order > 6 {
            return Err(bad(format!("refcount order {refcount_order} above 6")));
        }
        let crypt_method = be32(first, 32);
        // Extensions follow the header, in the first cluster.
        let mut extensions = Vec::new();
        let mut at = header_length.next_multiple_of(8);
        if version == 3 || at < first.len() {
            while at + 8 <= first.len().min(cluster_size) {
                let (kind, len) = (be32(first, at), be32(first, at + 4) as usize);
                if kind == EXT_END {
                    break;
                }
                let data = first
                    .get(at + 8..(at + 8).saturating_add(len))
                    .ok_or_else(|| bad(format!("header extension {kind:#x} is truncated")))?;
                extensions.push(Extension {
                    kind,
                    data: data.to_vec(),
                });
                at = at.saturating_add(8 + len.next_multiple_of(8));
            }
        }
        let feature_name = |kind: u8, bit: u32| -> Option<String> {
            let table = extensions.iter().find(|e| e.kind == EXT_FEATURE_NAMES)?;
            table.data.chunks_exact(48).find_map(|entry| {
                (entry[0] == kind && u32::from(entry[1]) == bit).then(|| {
                    let name = &entry[2..];
                    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    String::from_utf8_lossy(&name[..end]).into_owned()
                })
            })
        };
        if crypt_method != 0 {
            return Err(unsupported("encryption".into()));
        }
        for bit in 0..64u32 {
            if incompatible & (1 << bit) == 0 {
                continue;
            }
            match bit {
                // Dirty (refcounts may be stale) and corrupt images are
                // readable; a writable open refuses them.
                0 | 1 => {}
                2 => return Err(unsupported("an external data file".into())),
                3 if compression_type != 0 => {
                    return Err(unsupported(format!(
                        "compression type {compression_type} (only zlib is supported)"
                    )));
                }
                3 => {}
                4 => return Err(unsupported("extended L2 entries".into())),
                _ => {
                    let name = feature_name(0, bit)
                        .unwrap_or_else(|| format!("incompatible feature bit {bit}"));
                    return Err(unsupported(name));
                }
            }
        }
        let size = be64(first, 24);
        let l1_size = be32(first, 36);
        let l1_table_offset = be64(first, 40);
        let l2_entries = (cluster_size / 8) as u64;
        let needed = size.div_ceil(cluster_size as u64).div_ceil(l2_entries);
        if u64::from(l1_size) < needed {
            return Err(bad(format!(
                "L1 table of {l1_size} entries is too small for {size} bytes"
            )));
        }
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(format!("L1 table of {l1_size} entries is too large")));
        }
        let inside = |offset: u64, len: u64| {
            offset % cluster_size as u64 == 0
                && offset.checked_add(len).is_some_and(|end| end <= file_len)
        };
        if !inside(l1_table_offset, u64::from(l1_size) * 8) {
            return Err(bad(format!(
                "L1 table at {l1_table_offset:#x} is outside the file"
            )));
        }
        let refcount_table_offset = be64(first, 48);
        let refcount_table_clusters = be32(first, 56);
        let reftable_bytes = u64::from(refcount_table_clusters) << cluster_bits;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!(
                "refcount table of {refcount_table_clusters} clusters is too large"
            )));
        }
        if !inside(refcount_table_offset, reftable_bytes) {
            return Err(bad(format!(
                "refcount table at {refcount_table_offset:#x} is outside the file"
            )));
        }
        let backing_raw = match (be64(first, 8), be32(first, 16) as usize) {
            (0, _) | (_, 0) => None,
            (offset, len) => Some(
                usize::try_from(offset)
                    .ok()
                    .and_then(|o| first.get(o..o.checked_add(len)?))
                    .ok_or_else(|| bad("backing file name is outside the first cluster".into()))?
                    .to_vec(),
            ),
        };
        let backing_file = backing_raw
            .as_deref()
            .map(|b| String::from_utf8_lossy(b).into_owned());
        let backing_format = extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned());
        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            refcount_order,
            nb_snapshots: be32(first, 60),
            incompatible,
            autoclear,
            backing_file,
            backing_format,
            // Autoclear bit 0: a writer that did not know the extension
            // would have cleared it, so the extension is stale without it.
            bitmaps: extensions
                .iter()
                .find(|e| e.kind == EXT_BITMAPS && autoclear & AUTOCLEAR_BITMAPS != 0)
                .map(|e| e.data.clone()),
            activity: extensions
                .iter()
                .find(|e| e.kind == EXT_ACTIVITY && autoclear & AUTOCLEAR_ACTIVITY != 0)
                .map(|e| e.data.clone()),
            raw: first[..header_length].to_vec(),
            extensions,
            backing_raw,
        })
    }

    /// Bytes per cluster.
    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The image's first bytes as they must be rewritten (version 3): the
    /// fixed header with the refcount table at `reftable` and `autoclear`,
    /// the extensions of the kinds in `replace` replaced by the data given
    /// (dropped for `None`), every other extension kept in order, then the
    /// backing file name.
    pub(crate) fn rewrite(
        &self,
        node: &str,
        reftable: (u64, u32),
        autoclear: u64,
        replace: &[(u32, Option<&[u8]>)],
    ) -> Result<Vec<u8>> {
        let mut out = self.raw.clone();
        out[48..56].copy_from_slice(&reftable.0.to_be_bytes());
        out[56..60].copy_from_slice(&reftable.1.to_be_bytes());
        out[88..96].copy_from_slice(&autoclear.to_be_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
        let kept = self
            .extensions
            .iter()
            .filter(|e| replace.iter().all(|r| r.0 != e.kind))
            .map(|e| (e.kind, e.data.as_slice()));
        let new = replace
            .iter()
            .filter_map(|&(kind, data)| Some((kind, data?)));
        for (kind, data) in kept.chain(new) {
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        out.extend_from_slice(&[0; 8]);
        if let Some(name) = &self.backing_raw {
            let at = out.len() as u64;
            out[8..16].copy_from_slice(&at.to_be_bytes());
            out.extend_from_slice(name);
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(Error::BadImage {
                node: node.to_owned(),
                format: "qcow2",
                reason: format!(
                    "the header and its extensions would take {} bytes, more than a cluster",
                    out.len()
                ),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A plausible version 3 header for a 1 MiB image, 64 KiB clusters.
    fn header() -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[40..48].copy_from_slice(&65536u64.to_be_bytes());
        h[48..56].copy_from_slice(&131072u64.to_be_bytes());
        h[56..60].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    #[test]
    fn a_plain_header_parses() {
        let h = Header::parse("n", &header(), 1 << 20).unwrap();
        assert_eq!(
            (h.version, h.cluster_bits, h.size, h.l1_size),
            (3, 16, 1 << 20, 1)
        );
        assert_eq!(
            (
                h.refcount_table_offset,
                h.refcount_table_clusters,
                h.refcount_order
            ),
            (131072, 1, 4)
        );
        assert!(h.backing_file.is_none());
    }

    #[test]
    fn a_refcount_table_outside_the_file_is_refused() {
        let mut h = header();
        h[48..56].copy_from_slice(&(1u64 << 20).to_be_bytes());
        let e = Header::parse("n", &h, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("refcount table at 0x100000"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 4000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Any bytes anywhere in the first cluster: an error or a header,
        /// never a panic, an overflow or a huge allocation.
        #[test]
        fn hostile_headers_never_panic(
            edits in prop::collection::vec((0usize..256, any::<u8>()), 1..24),
            extension_edits in prop::collection::vec((104usize..400, any::<u8>()), 0..24),
            truncate in prop::option::of(0usize..300),
            file_len in prop_oneof![Just(1u64 << 20), any::<u64>()],
        ) {
            let mut h = header();
            for (at, b) in edits.into_iter().chain(extension_edits) {
                h[at] = b;
            }
            if let Some(n) = truncate {
                h.truncate(n);
            }
            let _ = Header::parse("n", &h, file_len);
        }
    }
}
