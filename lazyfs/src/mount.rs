//! Mounting and unmounting: the `mount(2)` call, the FUSE session threads, and
//! the handle that ends them.
//!
//! This crate opens `/dev/fuse` and calls `mount(2)` itself (as root) instead of
//! letting fuser do it, so the process owns the FUSE connection's file
//! descriptor explicitly: [`MountHandle::fuse_device`] can be kept by another
//! process (the agent's supervisor), and [`resume_session`] serves the same
//! connection again in a new process, so that a restarted agent keeps its mounts
//! alive.
//!
//! ## Resuming a connection
//!
//! The kernel negotiates a FUSE connection once, with the `INIT` request, and a
//! connection stays alive while any process holds its `/dev/fuse` descriptor:
//! requests made while nobody serves it wait in the kernel's queue. fuser can only
//! start a session with that handshake, so a resumed session is started on one end
//! of a socket pair that carries a synthetic `INIT` (the kernel never sees the
//! answer), and the session's descriptor is then replaced, with `dup3(2)`, by the
//! connection's own. Requests the dead process had read but not answered are
//! handed out again with `FUSE_NOTIFY_RESEND` (Linux 6.9+); every operation of
//! this read-only filesystem is safe to run twice.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::mpsc::SyncSender;

use fuser::{BackgroundSession, Config, InitFlags, Session, SessionACL};
use tracing::{info, warn};

use crate::assembly::AssemblyOptions;
use crate::trace::ChunkAccess;
use crate::{FsCounters, LazyFsError, Shared};

/// How to mount an image.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let every user (not only root) use the mount: containers run as any uid.
    pub allow_other: bool,
    /// Let the kernel check permission bits against the caller (recommended: it
    /// is how a container's users are kept apart). Without it the filesystem
    /// answers `access(2)` itself and does not check `open`.
    pub default_permissions: bool,
    /// Honour device files in the image (`nodev` if false).
    pub dev: bool,
    /// Honour setuid/setgid bits and `security.capability` (`nosuid` if false).
    pub suid: bool,
    /// Source name shown in `/proc/mounts`.
    pub fsname: String,
    /// File system subtype: mounts show as `fuse.<subtype>`.
    pub subtype: Option<String>,
    /// FUSE worker threads. Each read that waits for the registry holds one.
    pub n_threads: usize,
    /// How long the kernel may cache names and attributes. The image never
    /// changes, so this is long.
    pub attr_timeout: std::time::Duration,
    /// Bytes past each read that are fetched ahead (at prefetch priority).
    /// 0 turns read-ahead off.
    pub readahead_bytes: u64,
    /// On a read that misses the cache, the compressed bytes of the chunks that
    /// follow the missed ones in their blob that are fetched in the same ranged
    /// request (see the crate docs). 0 turns it off.
    pub miss_readahead_bytes: u64,
    /// The kernel's page-cache read-ahead for this mount (`read_ahead_kb` of its
    /// backing device), which also sets how large one FUSE read is (up to 1 MiB,
    /// the kernel's request limit) and how many are in flight. The kernel's
    /// default for FUSE is 128 KiB. Measured on warm sequential reads, 1 MiB
    /// gives about 1.5× the throughput of 256 KiB from a cache on disk and the
    /// same from memory; 4 MiB is a little faster again from disk, but this is
    /// also how much a page fault in a mapped file reads around the fault, and
    /// for a lazily loaded library every extra MiB is chunks fetched that the
    /// container may never touch. `None` leaves it alone.
    pub kernel_readahead_kb: Option<u32>,
    /// Use FUSE passthrough for files whose chunks are all cached, if the kernel
    /// supports it. See the crate docs for what is passed through.
    pub passthrough: bool,
    /// Where and how much to assemble per-file backing files, so that multi-chunk
    /// files can use passthrough too. `None`: only single-chunk files pass through.
    pub assembly: Option<AssemblyOptions>,
    /// Start recording first chunk accesses right away (see [`ChunkAccess`]).
    pub access_trace: Option<SyncSender<ChunkAccess>>,
    /// A file (on a tmpfs, e.g. under `/run`) where the mount keeps how its open
    /// files were opened, so that [`crate::resume`] can go on using passthrough
    /// (see `open_state.rs`). Truncated by [`crate::mount`], deleted at unmount.
    /// `None`: a resumed mount never uses passthrough.
    pub open_state: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: true,
            default_permissions: true,
            dev: true,
            suid: true,
            fsname: "stoker".into(),
            subtype: Some("stoker".into()),
            n_threads: 8,
            attr_timeout: std::time::Duration::from_secs(365 * 24 * 3600),
            readahead_bytes: 4 << 20,
            miss_readahead_bytes: 512 << 10,
            kernel_readahead_kb: Some(1024),
            passthrough: true,
            assembly: None,
            access_trace: None,
            open_state: None,
        }
    }
}

/// A mounted image. Unmounts when dropped; [`MountHandle::unmount`] does the same
/// and reports errors.
pub struct MountHandle {
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
    fuse_device: OwnedFd,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MountHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountHandle")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish_non_exhaustive()
    }
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The filesystem's counters since it was mounted.
    pub fn counters(&self) -> FsCounters {
        self.shared.metrics.snapshot()
    }

    /// True if the kernel accepted FUSE passthrough for this mount and no backing
    /// file has been refused since.
    pub fn passthrough_enabled(&self) -> bool {
        self.shared.passthrough.is_enabled()
    }

    /// Starts a new access trace: each chunk's first read from now on is sent to
    /// `sender` (see [`ChunkAccess`]). Replaces any trace under way.
    pub fn start_access_trace(&self, sender: SyncSender<ChunkAccess>) {
        self.shared.trace.start(sender);
    }

    /// Stops the access trace under way, if any.
    pub fn stop_access_trace(&self) {
        self.shared.trace.stop();
    }

    /// The FUSE connection's `/dev/fuse` descriptor (a duplicate kept by this
    /// handle). While any process holds it the kernel keeps the mount's requests
    /// queued instead of failing them, which is what a handover to a restarted
    /// agent needs. Not used by this crate otherwise.
    pub fn fuse_device(&self) -> BorrowedFd<'_> {
        self.fuse_device.as_fd()
    }

    /// Unmounts and waits for the session threads to finish. If the mount is busy
    /// (a process has a file open or its working directory there) it is detached
    /// lazily instead: it disappears from the tree now and the session ends when
    /// the last user lets go, in the background.
    pub fn unmount(mut self) -> Result<(), LazyFsError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), LazyFsError> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match umount(&self.mountpoint, 0) {
            Ok(()) => {}
            // Unmounted behind our back (e.g. `fusermount3 -u`): the session ends by itself.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                umount(&self.mountpoint, libc::MNT_DETACH).map_err(|source| {
                    LazyFsError::Unmount {
                        mountpoint: self.mountpoint.clone(),
                        source,
                    }
                })?;
                warn!(
                    mountpoint = %self.mountpoint.display(),
                    "mount busy: detached lazily; it ends when its last user closes"
                );
                drop(session.guard);
                self.shared.passthrough.end();
                return Ok(());
            }
            Err(source) => {
                self.session = Some(session);
                return Err(LazyFsError::Unmount {
                    mountpoint: self.mountpoint.clone(),
                    source,
                });
            }
        }
        match session.join() {
            Ok(()) => {}
            Err(e) => {
                warn!(mountpoint = %self.mountpoint.display(), error = %e, "FUSE session ended with an error")
            }
        }
        self.shared.passthrough.end();
        info!(mountpoint = %self.mountpoint.display(), "unmounted");
        Ok(())
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            warn!(error = %e, "unmount on drop failed");
        }
    }
}

/// Mounts `fs` at `mountpoint` and starts its session threads.
pub(crate) fn mount_session(
    fs: crate::fs::LazyFs,
    shared: Arc<Shared>,
    mountpoint: &Path,
    options: &MountOptions,
) -> Result<MountHandle, LazyFsError> {
    let mountpoint = checked_mountpoint(mountpoint)?;
    let mount_error = |source: io::Error| LazyFsError::Mount {
        mountpoint: mountpoint.clone(),
        source,
    };
    let device: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(|e| {
            mount_error(io::Error::new(
                e.kind(),
                format!("cannot open /dev/fuse: {e}"),
            ))
        })?;
    let device = OwnedFd::from(device);
    sys_mount(&device, &mountpoint, options).map_err(mount_error)?;

    // From here on the kernel has a mount; undo it on any failure.
    let started = (|| {
        let kept = device.try_clone()?;
        shared.passthrough.set_device(device.try_clone()?);
        let session = Session::from_fd(fs, device, session_acl(options), session_config(options))?;
        Ok::<_, io::Error>((session.spawn()?, kept))
    })();
    match started {
        Ok((session, fuse_device)) => {
            if let Some(kb) = options.kernel_readahead_kb {
                set_kernel_readahead(&mountpoint, kb);
            }
            info!(mountpoint = %mountpoint.display(), threads = options.n_threads, passthrough = shared.passthrough.is_enabled(), "mounted");
            Ok(MountHandle {
                mountpoint,
                session: Some(session),
                fuse_device,
                shared,
            })
        }
        Err(e) => {
            if let Err(undo) = umount(&mountpoint, libc::MNT_DETACH) {
                warn!(mountpoint = %mountpoint.display(), error = %undo, "cannot undo a failed mount");
            }
            Err(mount_error(e))
        }
    }
}

/// Serves `fs` on the live FUSE connection `device` that is mounted at
/// `mountpoint` and was negotiated by an earlier process (see the module docs).
/// Requests that waited while nobody served the connection are answered now.
pub(crate) fn resume_session(
    fs: crate::fs::LazyFs,
    shared: Arc<Shared>,
    mountpoint: &Path,
    device: OwnedFd,
    options: &MountOptions,
) -> Result<MountHandle, LazyFsError> {
    let mountpoint = checked_mountpoint(mountpoint)?;
    let resume_error = |source: io::Error| LazyFsError::Resume {
        mountpoint: mountpoint.clone(),
        source,
    };
    let (session_end, kernel_side) = UnixDatagram::pair().map_err(resume_error)?;
    kernel_side
        .send(&synthetic_init(options))
        .map_err(resume_error)?;
    let session = Session::from_fd(
        fs,
        OwnedFd::from(session_end),
        session_acl(options),
        session_config(options),
    )
    .map_err(resume_error)?;
    drop(kernel_side);
    // SAFETY: both descriptors are open: `device` is owned here and the session's
    // descriptor is owned by `session`, which no thread uses yet (it is not
    // spawned). dup3 atomically makes the session's descriptor number refer to the
    // FUSE connection; `session` keeps owning (and will close) that number.
    let rc = unsafe {
        libc::dup3(
            device.as_raw_fd(),
            session.as_fd().as_raw_fd(),
            libc::O_CLOEXEC,
        )
    };
    if rc < 0 {
        return Err(resume_error(io::Error::last_os_error()));
    }
    shared
        .passthrough
        .set_device(device.try_clone().map_err(resume_error)?);
    resend_pending_requests(&device, &mountpoint);
    let session = session.spawn().map_err(resume_error)?;
    info!(mountpoint = %mountpoint.display(), threads = options.n_threads, "resumed the FUSE connection of a mount");
    Ok(MountHandle {
        mountpoint,
        session: Some(session),
        fuse_device: device,
        shared,
    })
}

/// The canonical path of `mountpoint`, which must be a directory.
fn checked_mountpoint(mountpoint: &Path) -> Result<PathBuf, LazyFsError> {
    let canonical = mountpoint
        .canonicalize()
        .map_err(|source| LazyFsError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        })?;
    if !canonical.is_dir() {
        return Err(LazyFsError::Mount {
            mountpoint: canonical,
            source: io::Error::new(
                io::ErrorKind::NotADirectory,
                "mount point is not a directory",
            ),
        });
    }
    Ok(canonical)
}

fn session_acl(options: &MountOptions) -> SessionACL {
    if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    }
}

/// Every session thread reads from the one `/dev/fuse` file, not from clones of
/// it: the kernel fails a clone's unanswered requests when the clone is closed, so
/// requests in flight when the process dies would fail (ECONNABORTED) instead of
/// waiting for the next process, which can resume the connection only through a
/// file someone kept open.
fn session_config(options: &MountOptions) -> Config {
    let mut config = Config::default();
    config.n_threads = Some(options.n_threads.max(1));
    config.clone_fd = false;
    config
}

/// A FUSE `INIT` request, as the kernel sends it, offering what this filesystem
/// asks for (see `LazyFs::init`). Its answer goes nowhere: the kernel keeps what it
/// negotiated with the first process. Passthrough is offered when wanted; if the
/// connection did not negotiate it, opening a backing file fails and the
/// filesystem switches passthrough off.
fn synthetic_init(options: &MountOptions) -> Vec<u8> {
    const FUSE_INIT: u32 = 26;
    const IN_HEADER_LEN: usize = 40;
    const INIT_IN_LEN: usize = 64;
    let mut offered = InitFlags::FUSE_INIT_EXT
        | InitFlags::FUSE_ASYNC_READ
        | InitFlags::FUSE_DO_READDIRPLUS
        | InitFlags::FUSE_CACHE_SYMLINKS
        | InitFlags::FUSE_PARALLEL_DIROPS
        | InitFlags::FUSE_MAX_PAGES;
    if options.passthrough {
        offered |= InitFlags::FUSE_PASSTHROUGH;
    }
    let flags = offered.bits();
    let len = (IN_HEADER_LEN + INIT_IN_LEN) as u32;
    let mut message = Vec::with_capacity(IN_HEADER_LEN + INIT_IN_LEN);
    // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, extlen + padding.
    message.extend_from_slice(&len.to_ne_bytes());
    message.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    message.extend_from_slice(&1u64.to_ne_bytes());
    message.extend_from_slice(&0u64.to_ne_bytes());
    message.extend_from_slice(&[0u8; 16]);
    // fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11].
    message.extend_from_slice(&7u32.to_ne_bytes());
    message.extend_from_slice(&40u32.to_ne_bytes());
    message.extend_from_slice(&(128u32 << 10).to_ne_bytes());
    message.extend_from_slice(&(flags as u32).to_ne_bytes());
    message.extend_from_slice(&((flags >> 32) as u32).to_ne_bytes());
    message.resize(IN_HEADER_LEN + INIT_IN_LEN, 0);
    message
}

/// Asks the kernel to queue again the requests a dead server had read but not
/// answered (`FUSE_NOTIFY_RESEND`, Linux 6.9+). Without it those requests, and the
/// processes waiting on them, would wait forever; so a kernel that refuses is
/// logged as an error, and the rest of the connection is still served.
fn resend_pending_requests(device: &OwnedFd, mountpoint: &Path) {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    // fuse_out_header: len, error (the notification code), unique 0 for notifications.
    let mut notification = [0u8; 16];
    notification[..4].copy_from_slice(&16u32.to_ne_bytes());
    notification[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: `device` is an open /dev/fuse descriptor and `notification` is a
    // readable buffer of the length passed; write(2) does not keep the pointer.
    let rc = unsafe {
        libc::write(
            device.as_raw_fd(),
            notification.as_ptr().cast(),
            notification.len(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        tracing::error!(mountpoint = %mountpoint.display(), error = %e, "the kernel cannot resend requests the previous agent had read (needs Linux 6.9+); processes waiting on those requests stay blocked");
    }
}

/// `mount -t fuse.<subtype> <fsname> <mountpoint> -o fd=N,...`, read-only.
fn sys_mount(device: &OwnedFd, mountpoint: &Path, options: &MountOptions) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid}",
        device.as_raw_fd()
    );
    if options.default_permissions {
        data.push_str(",default_permissions");
    }
    if options.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_RDONLY | libc::MS_NOATIME;
    if !options.dev {
        flags |= libc::MS_NODEV;
    }
    if !options.suid {
        flags |= libc::MS_NOSUID;
    }
    let fstype = match &options.subtype {
        Some(subtype) => format!("fuse.{subtype}"),
        None => "fuse".to_string(),
    };
    let c = |s: &[u8]| {
        CString::new(s).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "mount argument contains a NUL byte",
            )
        })
    };
    let source = c(options.fsname.as_bytes())?;
    let target = c(mountpoint.as_os_str().as_bytes())?;
    let fstype = c(fstype.as_bytes())?;
    let data = c(data.as_bytes())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the
    // call; `data` is the text options string the fuse file system type expects.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) => " (mounting needs root or CAP_SYS_ADMIN)",
            Some(libc::ENODEV) => " (the fuse kernel module is not loaded)",
            _ => "",
        };
        return Err(io::Error::new(
            e.kind(),
            format!("mount(2) failed: {e}{hint}"),
        ));
    }
    Ok(())
}

/// Writes `read_ahead_kb` of the mount's (anonymous) backing device. A failure
/// only costs speed, so it is logged, not returned.
fn set_kernel_readahead(mountpoint: &Path, kb: u32) {
    use std::os::unix::fs::MetadataExt;
    let result = std::fs::metadata(mountpoint).and_then(|meta| {
        let dev = meta.dev();
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
        std::fs::write(&path, kb.to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("writing {path}: {e}")))
    });
    if let Err(e) = result {
        warn!(mountpoint = %mountpoint.display(), error = %e, "cannot set the kernel read-ahead; keeping the default");
    }
}

fn umount(mountpoint: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `target` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(target.as_ptr(), flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts whatever FUSE file system is mounted at `mountpoint` (for `stoker
/// unmount`): `umount2(2)`, detaching lazily if it is busy, and `fusermount3 -u -z`
/// if this process may not unmount (not root).
pub fn unmount(mountpoint: &Path) -> Result<(), LazyFsError> {
    let error = |source: io::Error| LazyFsError::Unmount {
        mountpoint: mountpoint.to_path_buf(),
        source,
    };
    match umount(mountpoint, 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            warn!(mountpoint = %mountpoint.display(), "mount busy: detaching lazily");
            umount(mountpoint, libc::MNT_DETACH).map_err(error)
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            let output = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg("--")
                .arg(mountpoint)
                .output()
                .map_err(|e| {
                    error(io::Error::new(
                        e.kind(),
                        format!("running fusermount3: {e}"),
                    ))
                })?;
            if output.status.success() {
                Ok(())
            } else {
                Err(error(io::Error::other(format!(
                    "fusermount3 -u failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ))))
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(error(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a mount point",
        ))),
        Err(e) => Err(error(e)),
    }
}
