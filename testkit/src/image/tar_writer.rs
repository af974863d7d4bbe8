//! Writes [`Entry`]s as tar entries, byte-exact and without path checks.
//!
//! Headers are ustar; paths or link targets longer than 100 bytes and all xattrs go into
//! a PAX extended header written just before the entry (`path`, `linkpath`,
//! `SCHILY.xattr.NAME`), as Docker and BuildKit do.

use std::io::{self, Write};

use super::entry::{Entry, EntryKind};

/// Appends one entry (with its PAX header if it needs one) to `builder`.
pub(crate) fn append_entry<W: Write>(
    builder: &mut tar::Builder<W>,
    entry: &Entry,
) -> io::Result<()> {
    let path = entry.tar_path();
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    if path.len() > 100 {
        pax.push(("path".into(), path.clone()));
    }
    let link_name: &[u8] = match &entry.kind {
        EntryKind::Symlink(target) | EntryKind::Hardlink(target) => target,
        _ => &[],
    };
    if link_name.len() > 100 {
        pax.push(("linkpath".into(), link_name.to_vec()));
    }
    for (name, value) in &entry.xattrs {
        pax.push((format!("SCHILY.xattr.{name}"), value.clone()));
    }
    if !pax.is_empty() {
        append_pax_header(builder, &pax)?;
    }

    let mut header = tar::Header::new_ustar();
    copy_truncated(&mut header.as_old_mut().name, &path);
    copy_truncated(&mut header.as_old_mut().linkname, link_name);
    header.set_mode(entry.mode & 0o7777);
    header.set_uid(u64::from(entry.uid));
    header.set_gid(u64::from(entry.gid));
    header.set_mtime(entry.mtime);
    header.set_size(0);
    let (entry_type, device) = match &entry.kind {
        EntryKind::Dir => (tar::EntryType::Directory, None),
        EntryKind::File(_) | EntryKind::Whiteout | EntryKind::OpaqueWhiteout => {
            (tar::EntryType::Regular, None)
        }
        EntryKind::Symlink(_) => (tar::EntryType::Symlink, None),
        EntryKind::Hardlink(_) => (tar::EntryType::Link, None),
        EntryKind::CharDevice { major, minor } => (tar::EntryType::Char, Some((*major, *minor))),
        EntryKind::BlockDevice { major, minor } => (tar::EntryType::Block, Some((*major, *minor))),
        EntryKind::Fifo => (tar::EntryType::Fifo, None),
    };
    header.set_entry_type(entry_type);
    if let Some((major, minor)) = device {
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
    }
    match &entry.kind {
        EntryKind::File(content) => {
            header.set_size(content.size());
            header.set_cksum();
            builder.append(&header, content.reader())
        }
        _ => {
            header.set_cksum();
            builder.append(&header, io::empty())
        }
    }
}

/// Writes a PAX extended header ('x') with these records.
fn append_pax_header<W: Write>(
    builder: &mut tar::Builder<W>,
    records: &[(String, Vec<u8>)],
) -> io::Result<()> {
    let mut data = Vec::new();
    for (key, value) in records {
        // "LEN KEY=VALUE\n", where LEN counts itself.
        let rest = key.len() + value.len() + 3;
        let mut len = rest + 1;
        while rest + len.to_string().len() != len {
            len = rest + len.to_string().len();
        }
        data.extend_from_slice(format!("{len} {key}=").as_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let mut header = tar::Header::new_ustar();
    copy_truncated(&mut header.as_old_mut().name, b"PaxHeader");
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_entry_type(tar::EntryType::XHeader);
    header.set_cksum();
    builder.append(&header, data.as_slice())
}

fn copy_truncated(field: &mut [u8], value: &[u8]) {
    let n = value.len().min(field.len());
    field[..n].copy_from_slice(&value[..n]);
}

/// The uncompressed tar stream of these entries, in memory (for small layers).
pub fn layer_tar(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        append_entry(&mut builder, entry)?;
    }
    builder.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_xattrs_and_raw_bytes_round_trip_through_the_tar_crate() {
        let long = format!("{}/file", "d".repeat(150));
        let entries = vec![
            Entry::file(&long, "x").xattr("user.a", b"\xff\x00v".to_vec()),
            Entry::file(b"caf\xe9", "y"),
            Entry::symlink("l", "t".repeat(200)),
            Entry::char_device("c", 1, 3),
        ];
        let bytes = layer_tar(&entries).expect("tar");
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path_bytes().into_owned();
            let xattrs: Vec<(String, Vec<u8>)> = entry
                .pax_extensions()
                .expect("pax")
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
                .filter(|e| e.key().is_ok_and(|k| k.starts_with("SCHILY.xattr.")))
                .map(|e| (e.key().unwrap_or("").to_string(), e.value_bytes().to_vec()))
                .collect();
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            let major = entry.header().device_major().ok().flatten();
            seen.push((path, xattrs, link, major));
        }
        assert_eq!(seen[0].0, long.as_bytes());
        assert_eq!(
            seen[0].1,
            vec![("SCHILY.xattr.user.a".to_string(), b"\xff\x00v".to_vec())]
        );
        assert_eq!(seen[1].0, b"caf\xe9");
        assert_eq!(seen[2].2.as_deref(), Some("t".repeat(200).as_bytes()));
        assert_eq!(seen[3].3, Some(1));
    }
}
