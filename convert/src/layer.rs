//! Reading one source layer: check its digest while streaming, undo its
//! compression, and turn tar records into [`LayerEntry`] values with every
//! attribute the index keeps.

use std::collections::BTreeMap;
use std::io::{self, Read};

use stoker_format::{Digest, Hasher};

use crate::ConvertError;

/// How a layer blob is compressed, from its media type (or its first bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        if media_type.ends_with("gzip") || media_type.ends_with("+gzip") {
            Some(Compression::Gzip)
        } else if media_type.ends_with("zstd") {
            Some(Compression::Zstd)
        } else if media_type.ends_with(".tar") || media_type.ends_with("layer.v1.tar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

/// A reader that hashes what passes through it, so a layer's digest is checked
/// in the same pass that converts it.
pub struct DigestingReader<R> {
    inner: R,
    hasher: Hasher,
    bytes: u64,
    /// Zero bytes at the end of what was read so far.
    trailing_zeros: u64,
}

impl<R: Read> DigestingReader<R> {
    pub fn new(inner: R) -> Self {
        DigestingReader {
            inner,
            hasher: Hasher::new(),
            bytes: 0,
            trailing_zeros: 0,
        }
    }

    /// Whether the last 512 bytes read were zeros: a tar reader that stopped
    /// there stopped at an end-of-archive marker, not at a truncation.
    pub fn ends_with_zero_block(&self) -> bool {
        self.trailing_zeros >= 512
    }

    /// Reads whatever is left (tar padding after the end marker) and returns
    /// the digest and length of everything read.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.hasher.finish(), self.bytes))
    }
}

impl<R: Read> Read for DigestingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let data = &buf[..n];
        self.hasher.update(data);
        self.bytes += n as u64;
        match data.iter().rposition(|&b| b != 0) {
            Some(last) => self.trailing_zeros = (n - last - 1) as u64,
            None => self.trailing_zeros += n as u64,
        }
        Ok(n)
    }
}

/// What a tar record asks for, after path checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File { size: u64 },
    Symlink { target: Vec<u8> },
    Hardlink { target: Vec<Vec<u8>> },
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
}

/// One tar record. `path` is split into components, checked to stay inside the root.
#[derive(Clone, Debug)]
pub struct LayerEntry {
    pub path: Vec<Vec<u8>>,
    pub kind: EntryKind,
    pub permissions: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Splits a tar path into components, refusing anything that could leave the
/// root: absolute paths, `..`, and NUL bytes. `./` prefixes and repeated
/// slashes are tolerated, as every runtime does.
pub fn split_path(raw: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    if raw.contains(&0) {
        return Err("path contains a NUL byte".into());
    }
    let mut parts = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("path escapes the root with '..'".into()),
            name => parts.push(name.to_vec()),
        }
    }
    Ok(parts)
}

/// Reads the header (and PAX records) of a tar entry into a [`LayerEntry`].
/// The entry's data, if any, is still to be read from `entry`.
pub fn parse_entry<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<LayerEntry, String> {
    let path = split_path(&entry.path_bytes())?;
    let header = entry.header();
    let mut permissions = header.mode().map_err(|e| format!("bad mode: {e}"))? & 0o7777;
    let mut uid = header.uid().map_err(|e| format!("bad uid: {e}"))?;
    let mut gid = header.gid().map_err(|e| format!("bad gid: {e}"))?;
    let mut mtime_sec = header.mtime().map_err(|e| format!("bad mtime: {e}"))? as i64;
    let mut mtime_nsec = 0u32;
    let entry_type = header.entry_type();
    let (major, minor) = (
        header.device_major().ok().flatten().unwrap_or(0),
        header.device_minor().ok().flatten().unwrap_or(0),
    );
    let link_name = entry.link_name_bytes().map(|l| l.into_owned());
    let size = entry.size();

    let mut xattrs = BTreeMap::new();
    if let Some(extensions) = entry
        .pax_extensions()
        .map_err(|e| format!("bad PAX header: {e}"))?
    {
        for ext in extensions {
            let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.insert(name.to_vec(), value.to_vec());
            } else if key == b"uid" {
                uid = parse_decimal(value).ok_or("bad PAX uid")?;
            } else if key == b"gid" {
                gid = parse_decimal(value).ok_or("bad PAX gid")?;
            } else if key == b"mtime" {
                (mtime_sec, mtime_nsec) = parse_pax_time(value).ok_or("bad PAX mtime")?;
            }
        }
    }
    // Modes above 0o7777 never reach the index; keep the mask explicit.
    permissions &= 0o7777;
    let uid = u32::try_from(uid).map_err(|_| format!("uid {uid} out of range"))?;
    let gid = u32::try_from(gid).map_err(|_| format!("gid {gid} out of range"))?;

    use tar::EntryType as T;
    let kind = match entry_type {
        T::Directory => EntryKind::Dir,
        T::Regular | T::Continuous | T::GNUSparse => EntryKind::File { size },
        T::Symlink => EntryKind::Symlink {
            target: link_name.ok_or("symlink without a target")?,
        },
        T::Link => {
            let target = link_name.ok_or("hardlink without a target")?;
            let target = split_path(&target).map_err(|e| format!("hardlink target: {e}"))?;
            if target.is_empty() {
                return Err("hardlink to the root".into());
            }
            EntryKind::Hardlink { target }
        }
        T::Char => EntryKind::CharDevice { major, minor },
        T::Block => EntryKind::BlockDevice { major, minor },
        T::Fifo => EntryKind::Fifo,
        other => {
            return Err(format!(
                "unsupported tar entry type {:?}",
                other.as_byte() as char
            ));
        }
    };
    Ok(LayerEntry {
        path,
        kind,
        permissions,
        uid,
        gid,
        mtime_sec,
        mtime_nsec,
        xattrs,
    })
}

fn parse_decimal(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// PAX times are decimal seconds with an optional fraction: `1700000000.123456789`.
fn parse_pax_time(value: &[u8]) -> Option<(i64, u32)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nsec = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    Some((secs, nsec))
}

/// Wraps an I/O error from a layer with the layer and entry it came from.
pub fn layer_error(
    layer: &Digest,
    entry: Option<&[Vec<u8>]>,
    reason: impl std::fmt::Display,
) -> ConvertError {
    ConvertError::Layer {
        layer: *layer,
        entry: entry.map(display_path).unwrap_or_else(|| "-".into()),
        reason: reason.to_string(),
    }
}

pub fn display_path(parts: &[Vec<u8>]) -> String {
    let joined: Vec<u8> = parts.join(&b'/');
    String::from_utf8_lossy(&joined).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        assert_eq!(
            split_path(b"./usr//bin/").unwrap(),
            vec![b"usr".to_vec(), b"bin".to_vec()]
        );
        assert!(split_path(b"/etc/passwd").is_err());
        assert!(split_path(b"a/../../etc").is_err());
        assert!(split_path(b"a/\0b").is_err());
        assert!(split_path(b".").unwrap().is_empty());
    }

    #[test]
    fn pax_times_keep_nanoseconds() {
        assert_eq!(
            parse_pax_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_pax_time(b"12"), Some((12, 0)));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
