//! [`LazyFs`]: the FUSE operations. Metadata comes straight from the index;
//! file bytes from [`crate::read`]; open modes from [`crate::passthrough`].
//! Everything that would modify the image is refused with EROFS.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, WriteFlags,
};
use stoker_format::{FileKind, Index, Inode, InodeId};
use tracing::{debug, info};

use crate::Shared;
use crate::attr::{self, BLOCK_SIZE, file_attr, id_of, ino_of};
use crate::metrics::Op;
use crate::passthrough::OpenMode;
use crate::read::{ReadState, Reader, log_read_error};

/// An open regular file.
struct OpenFile {
    id: InodeId,
    read: ReadState,
}

pub(crate) struct LazyFs {
    index: Arc<Index>,
    reader: Reader,
    shared: Arc<Shared>,
    files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    /// The first file handle of this session: lower ones were handed out by an
    /// earlier process of a resumed mount.
    first_fh: u64,
    /// How long the kernel may cache names and attributes.
    ttl: Duration,
    want_passthrough: bool,
    default_permissions: bool,
    /// The kernel accepts ENOSYS for `opendir` (see [`LazyFs::opendir`]).
    no_opendir: bool,
    /// For `statfs`: total file bytes in blocks, and inodes.
    total_blocks: u64,
}

impl LazyFs {
    pub(crate) fn new(
        index: Arc<Index>,
        reader: Reader,
        shared: Arc<Shared>,
        ttl: Duration,
        want_passthrough: bool,
        default_permissions: bool,
    ) -> Self {
        let file_bytes: u64 = (0..index.inode_count())
            .filter_map(|id| index.inode(id))
            .filter(|inode| inode.kind == FileKind::File)
            .map(|inode| inode.size)
            .sum();
        LazyFs {
            index,
            reader,
            shared,
            files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            first_fh: 1,
            ttl,
            want_passthrough,
            default_permissions,
            no_opendir: false,
            total_blocks: file_bytes.div_ceil(u64::from(BLOCK_SIZE)),
        }
    }

    /// Numbers this session's file handles from `first` on (a resumed session must
    /// not reuse the handles of the session before it).
    pub(crate) fn with_first_file_handle(mut self, first: u64) -> Self {
        self.next_fh.store(first, Ordering::Relaxed);
        self.first_fh = first;
        self
    }

    fn inode(&self, ino: INodeNo) -> Result<Inode, Errno> {
        id_of(ino)
            .and_then(|id| self.index.inode(id))
            .ok_or(Errno::ENOENT)
    }

    fn refuse(&self) -> Errno {
        let _op = self.shared.metrics.op(Op::Modify);
        Errno::EROFS
    }

    fn open_file(&self, fh: FileHandle) -> Option<Arc<OpenFile>> {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&fh.0)
            .cloned()
    }

    fn lookup_entry(&self, parent: INodeNo, name: &OsStr) -> Result<Option<Inode>, Errno> {
        let dir = self.inode(parent)?;
        if dir.kind != FileKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let child = match name.as_bytes() {
            b"." => Some(dir.id),
            b".." => Some(dir.parent),
            name => self.index.lookup(dir.id, name),
        };
        Ok(child.and_then(|id| self.index.inode(id)))
    }

    /// The `i`-th entry of a directory listing: `.`, `..`, then the index's entries.
    fn dir_listing_entry(&self, dir: &Inode, i: u64) -> Option<(&[u8], Inode)> {
        let entry = match i {
            0 => (&b"."[..], dir.id),
            1 => (&b".."[..], dir.parent),
            _ => self.index.dir_entry(dir.id, u32::try_from(i - 2).ok()?)?,
        };
        Some((entry.0, self.index.inode(entry.1)?))
    }
}

/// What a negative lookup answers: inode 0 with a timeout makes the kernel cache
/// "no such name" like any other entry.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: std::time::UNIX_EPOCH,
        mtime: std::time::UNIX_EPOCH,
        ctime: std::time::UNIX_EPOCH,
        crtime: std::time::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// Answers a `getxattr`/`listxattr` size probe or value request.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    let Ok(len) = u32::try_from(value.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let available = config.capabilities();
        // Always readdirplus (not "auto"): attributes cost nothing extra here, and
        // a listing followed by stat calls then needs no lookup per entry.
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_PARALLEL_DIROPS;
        let _ = config.add_capabilities(wanted & available);
        self.no_opendir = available.contains(InitFlags::FUSE_NO_OPENDIR_SUPPORT);
        let _ = config.set_max_background(64);
        if self.want_passthrough {
            if available.contains(InitFlags::FUSE_PASSTHROUGH) {
                let _ = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH);
                // Depth 1: backing files on a plain file system, and this mount can
                // still be an overlayfs lower layer.
                let _ = config.set_max_stack_depth(1);
                self.shared.passthrough.enable();
            } else {
                info!(
                    "the kernel does not offer FUSE passthrough; every read goes through the filesystem"
                );
            }
        }
        debug!(abi = %config.kernel_abi(), "FUSE session initialised");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _op = self.shared.metrics.op(Op::Lookup);
        match self.lookup_entry(parent, name) {
            Ok(Some(inode)) => reply.entry(&self.ttl, &file_attr(&inode), Generation(0)),
            Ok(None) => reply.entry(&self.ttl, &negative_entry(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _op = self.shared.metrics.op(Op::Getattr);
        match self.inode(ino) {
            Ok(inode) => reply.attr(&self.ttl, &file_attr(&inode)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _op = self.shared.metrics.op(Op::Readlink);
        let Some(id) = id_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match self.index.symlink_target(id) {
            Some(target) => reply.data(target),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.shared.metrics.op(Op::Open);
        let inode = match self.inode(ino) {
            Ok(inode) => inode,
            Err(e) => return reply.error(e),
        };
        if inode.kind == FileKind::Dir {
            return reply.error(Errno::EISDIR);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(self.refuse());
        }
        let mode = self.shared.passthrough.open(
            &self.index,
            self.reader.cache(),
            inode.id,
            &self.shared.trace,
            &self.shared.metrics,
        );
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let file = Arc::new(OpenFile {
            id: inode.id,
            read: ReadState::default(),
        });
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(fh, file);
        // Nothing is ever written, so `close` has nothing to flush: no FLUSH
        // request per close.
        match mode {
            OpenMode::Passthrough(id) => {
                self.shared.metrics.passthrough_opened();
                // SAFETY: `id` is registered on this session's connection (by this
                // process, or by an earlier one of a resumed mount) and stays
                // registered while the inode has opens: `Passthrough` closes it
                // after the last release. `into_raw` hands it back below, so the
                // wrapper does not close it when dropped.
                let backing = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &backing);
                backing.into_raw();
            }
            // The image never changes: keep the page cache across opens.
            OpenMode::Cached => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            ),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let metrics = &self.shared.metrics;
        let _op = metrics.op(Op::Read);
        let inode = match self.inode(ino) {
            Ok(inode) if inode.kind == FileKind::File => inode,
            Ok(_) => return reply.error(Errno::EINVAL),
            Err(e) => return reply.error(e),
        };
        // A read on a handle this session did not hand out still works, without
        // read-ahead memory.
        let file = self.open_file(fh).filter(|f| f.id == inode.id);
        let fallback = ReadState::default();
        let state = file.as_ref().map_or(&fallback, |f| &f.read);
        let mut reply = Some(reply);
        let result = self
            .reader
            .read(inode.id, inode.size, offset, size, state, |bytes| {
                if let Some(reply) = reply.take() {
                    reply.data(bytes);
                }
            });
        if let Err(e) = result {
            log_read_error(&self.index, inode.id, offset, &e);
            metrics.read_failed();
            if let Some(reply) = reply.take() {
                reply.error(Errno::EIO);
            }
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.metrics.op(Op::Release);
        let file = self
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&fh.0);
        // Reply first: the kernel has already ended this open's I/O mode, and a
        // release counted before a crash but not answered would be counted
        // twice (the kernel resends it).
        reply.ok();
        if let Some(file) = file {
            self.shared.passthrough.release(file.id);
        } else if fh.0 < self.first_fh
            && let Some(id) = id_of(ino)
        {
            // An open answered by an earlier process of this mount.
            self.shared.passthrough.release(id);
        }
        self.shared.metrics.release_done();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    /// Directories need no per-open state. Where the kernel allows it (Linux
    /// 5.1+), the first `opendir` is answered ENOSYS: the kernel then stops
    /// sending `opendir` and `releasedir` for this mount and opens directories
    /// itself with `FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE`, so a walk of a tree
    /// whose listings are cached makes no request at all.
    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _op = self.shared.metrics.op(Op::Opendir);
        match self.inode(ino) {
            Ok(inode) if inode.kind == FileKind::Dir && self.no_opendir => {
                reply.error(Errno::ENOSYS)
            }
            Ok(inode) if inode.kind == FileKind::Dir => reply.opened(
                FileHandle(0),
                // Let the kernel cache listings and keep them across opens.
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _op = self.shared.metrics.op(Op::Readdir);
        let dir = match self.inode(ino) {
            Ok(dir) if dir.kind == FileKind::Dir => dir,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let mut i = offset;
        while let Some((name, child)) = self.dir_listing_entry(&dir, i) {
            // The offset of an entry is where the listing continues after it.
            let full = reply.add(
                ino_of(child.id),
                i + 1,
                attr::file_type(child.kind),
                OsStr::from_bytes(name),
            );
            if full {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _op = self.shared.metrics.op(Op::Readdirplus);
        let dir = match self.inode(ino) {
            Ok(dir) if dir.kind == FileKind::Dir => dir,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let mut i = offset;
        while let Some((name, child)) = self.dir_listing_entry(&dir, i) {
            let full = reply.add(
                ino_of(child.id),
                i + 1,
                OsStr::from_bytes(name),
                &self.ttl,
                &file_attr(&child),
                Generation(0),
            );
            if full {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _op = self.shared.metrics.op(Op::Releasedir);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _d: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _op = self.shared.metrics.op(Op::Statfs);
        reply.statfs(
            self.total_blocks,
            0,
            0,
            u64::from(self.index.inode_count()),
            0,
            BLOCK_SIZE,
            255,
            BLOCK_SIZE,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _op = self.shared.metrics.op(Op::Getxattr);
        let Some(id) = id_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if self.index.xattr_count() == 0 {
            // An image without extended attributes: ENOSYS makes the kernel answer
            // every later getxattr on this mount itself, with EOPNOTSUPP ("this file
            // system has no extended attributes"), which overlayfs, exec's file
            // capabilities and copy tools treat as "none". Overlayfs and many
            // programs ask on every lookup and open; this saves a round trip each.
            return reply.error(Errno::ENOSYS);
        }
        match self.index.xattr(id, name.as_bytes()) {
            Some(value) => reply_xattr(reply, size, value),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _op = self.shared.metrics.op(Op::Listxattr);
        let Some(id) = id_of(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (name, _) in self.index.xattrs(id) {
            names.extend_from_slice(name);
            names.push(0);
        }
        reply_xattr(reply, size, &names);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _op = self.shared.metrics.op(Op::Access);
        let inode = match self.inode(ino) {
            Ok(inode) => inode,
            Err(e) => return reply.error(e),
        };
        let mask = mask.bits();
        if mask & libc::W_OK != 0 {
            return reply.error(Errno::EROFS);
        }
        if self.default_permissions || attr::may_access(&inode, req.uid(), req.gid(), mask) {
            reply.ok();
        } else {
            reply.error(Errno::EACCES);
        }
    }

    // ---- everything that would modify the image ----

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(self.refuse());
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse());
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse());
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse());
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse());
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse());
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse());
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse());
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(self.refuse());
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(self.refuse());
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse());
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse());
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse());
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(self.refuse());
    }
}
