//! # stoker-lazyfs
//!
//! A read-only FUSE filesystem over a decoded Stoker image index: the node's
//! data path as a container sees it.
//!
//! registry → fetch → verify → cache → **filesystem** → snapshotter → container
//!
//! [`mount`] serves an [`Index`] at a mount point. Metadata (names, attributes,
//! symlinks, xattrs, directory listings) is answered from the index alone, so a
//! container can start as soon as the index has arrived. File bytes are read
//! from the node's chunk cache, and the chunks not there yet are fetched from the
//! registry by the [`Fetcher`], which verifies every chunk before it is cached or
//! served: a chunk that fails verification, a registry that stays down past the
//! fetch deadline, or a disk error makes the read fail with EIO, never return
//! wrong bytes.
//!
//! ## Behaviour
//!
//! - **Read-only**: every modifying operation is refused with EROFS, and the mount
//!   is `ro`. Inode numbers are the index's inode ids + 1, stable for the image, so
//!   hardlinks share one; owner, mode, times, nlink, rdev and xattrs come from the
//!   index (the index keeps one time, reported as atime, mtime and ctime). On an
//!   image without any xattr, the first `getxattr` answers ENOSYS, so the kernel
//!   answers every later one itself with EOPNOTSUPP, as for a file system without
//!   xattrs (overlayfs and exec's capability check ask on every lookup and open);
//!   `listxattr` answers an empty list.
//! - **Kernel caching**: names, attributes and negative lookups are cached for
//!   [`MountOptions::attr_timeout`] (a year by default: the image cannot change);
//!   files are opened with `FOPEN_KEEP_CACHE`; directories are opened by the
//!   kernel itself, without a request, and their listings cached
//!   (`FOPEN_CACHE_DIR`; the first `opendir` answers ENOSYS where the kernel
//!   allows that); symlink targets are cached; `readdirplus` returns attributes
//!   with names. A tree walked once is walked again without a single request.
//! - **Reads** map `offset..offset+size` to the chunks covering it (a binary search
//!   in the index), take each from a small table of open chunk files, the cache, or
//!   the fetcher (all missing chunks of one read in one call: coalesced, in
//!   parallel, single-flight across readers), zero-fill holes and stop at end of
//!   file.
//! - **Read-ahead**: each open file asks for the chunks one window
//!   ([`MountOptions::readahead_bytes`], 4 MiB by default) past its reads, at
//!   prefetch priority, in batches; the cached chunks of the next 16 MiB are
//!   opened and the kernel asked to read them from disk now, so a warm
//!   sequential read is not one disk wait per chunk. The kernel reads 1 MiB ahead
//!   on the mount ([`MountOptions::kernel_readahead_kb`]).
//! - **Read-ahead on a miss, in blob order**: a read that must go to the registry
//!   also fetches, in the same ranged request, the chunks that follow its last
//!   missing chunk in the blob, up to [`MountOptions::miss_readahead_bytes`]
//!   (compressed; 512 KiB by default). The converter writes chunks in layer order,
//!   so these are the next files of the same directory, which a starting program
//!   (an interpreter importing a package, a loader reading its libraries) tends
//!   to read next: one round trip then serves several files. They are verified
//!   and cached like any chunk, but the read does not wait for them beyond the
//!   shared request, and they are not part of the access trace unless read.
//! - **Passthrough** (kernel 6.9+): a file whose bytes are all cached is opened with
//!   a local backing file so the kernel reads it without this process. Single-chunk
//!   files use the chunk's cache file; other files use a per-file copy assembled in
//!   the background when [`MountOptions::assembly`] is set, or ahead of the mount
//!   with [`assemble_files`] (then their first open passes through). Detected at mount time
//!   and switched off cleanly if the kernel refuses. Cost of assembled files: the
//!   file's bytes on disk a second time (bounded by [`AssemblyOptions::max_bytes`],
//!   least recently used first out), one read and one write to assemble, one read
//!   to verify on first use per process. While an access trace is recorded, only
//!   single-chunk files pass through, and their open reports the chunk. Open
//!   modes and backing ids: `passthrough.rs`; assembled files: `assembly.rs`.
//! - **Page-cache warming**: [`warm_page_cache`] asks the kernel to read, in a
//!   prefetch plan's order, the local files a start will read (`warm.rs`).
//! - **Access tracing**: [`ChunkAccess`] events report each chunk's first read,
//!   for startup traces and prefetch plans (issue 5), through a bounded channel
//!   that never blocks a reader.
//! - **Metrics**: operation counts and latency by operation on the global
//!   OpenTelemetry meter `"stoker"` (`stoker.fuse.*`), and [`FsCounters`] from
//!   [`MountHandle::counters`].
//!
//! ## Threads and runtime
//!
//! FUSE requests are served by [`MountOptions::n_threads`] threads reading the one
//! `/dev/fuse` file of the mount (not per-thread clones, so that a process that
//! dies leaves its unanswered requests to the next one: see [`resume`]). The
//! [`Fetcher`] is async: reads that need the registry block their FUSE thread on a
//! tokio runtime — the caller's if
//! [`mount`] is called inside a multi-threaded one, otherwise a small runtime
//! shared by every mount in the process.
//!
//! ## Restarts
//!
//! [`resume`] serves a mount again from its kept `/dev/fuse` descriptor in a new
//! process, without the processes using it seeing an error (see `mount.rs`).
//! With an open-state file ([`MountOptions::open_state`], see `open_state.rs`) the
//! new process knows how every file still open was opened, and so keeps using
//! passthrough: the kernel only accepts an open in the mode (and with the backing
//! file) of the other opens of the same file.
//!
//! `unsafe` is limited to the `mount(2)`/`umount2(2)` calls, the FUSE
//! descriptor hand-over (`dup3(2)`, the resend notification), and passthrough
//! backing ids (wrapping a raw id for a reply, closing one).

mod assembly;
mod attr;
mod fs;
mod metrics;
mod mount;
mod open_state;
mod passthrough;
mod read;
mod trace;
mod warm;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use stoker_fetch::Fetcher;
use stoker_format::Index;
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

pub use assembly::{
    AssemblyOptions, AssemblyReport, VerifiedAssemblies, assemble_files, needs_assembly,
};
pub use metrics::FsCounters;
pub use mount::{MountHandle, MountOptions, unmount};
pub use trace::ChunkAccess;
pub use warm::warm_page_cache;

/// Everything that can go wrong mounting or unmounting.
#[derive(Debug, thiserror::Error)]
pub enum LazyFsError {
    #[error("cannot mount the image at {mountpoint}")]
    Mount {
        mountpoint: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resume serving the mount at {mountpoint}")]
    Resume {
        mountpoint: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot unmount {mountpoint}")]
    Unmount {
        mountpoint: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the passthrough assembly directory {dir}")]
    Assembly {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the fetch runtime")]
    Runtime(#[source] std::io::Error),
}

/// State the mount handle shares with the filesystem once the filesystem has
/// moved into its session.
pub(crate) struct Shared {
    metrics: Arc<metrics::Metrics>,
    trace: trace::AccessTrace,
    passthrough: passthrough::Passthrough,
}

/// Mounts `index` read-only at `mountpoint` and serves it on background threads
/// until the returned handle is unmounted or dropped. Needs root (it calls
/// `mount(2)`) and an existing directory as mount point.
pub fn mount(
    index: Arc<Index>,
    fetcher: Fetcher,
    mountpoint: &Path,
    options: MountOptions,
) -> Result<MountHandle, LazyFsError> {
    let state = options.open_state.as_deref().and_then(|path| {
        open_state::OpenStateFile::create(path)
            .inspect_err(|e| tracing::error!(path = %path.display(), error = %e, "cannot create the open-state file; after an agent restart this mount answers opens without passthrough"))
            .ok()
    });
    let (fs, shared) = filesystem(index, fetcher, &options, state, Vec::new())?;
    mount::mount_session(fs, shared, mountpoint, &options)
}

/// Serves `index` again on a mount that an earlier process made with [`mount`]
/// and that is still mounted at `mountpoint`: `fuse_device` is that mount's
/// `/dev/fuse` descriptor ([`MountHandle::fuse_device`]), kept open meanwhile by
/// another process. Processes using the mount see no error: their requests
/// waited in the kernel and are answered now, including those the earlier
/// process had read but not answered (Linux 6.9+). `index` must be the image the
/// mount served, and `options` its options.
///
/// The kernel refuses an open whose mode (cached or passthrough, and the backing
/// file) differs from the other opens of the same file still alive, so a resumed
/// mount must know how the earlier process answered them. It reads that from the
/// mount's open-state file ([`MountOptions::open_state`]): a file the earlier
/// process opened with passthrough and that is still open is opened again with
/// the same backing file, one still open in cached mode is opened in cached mode
/// until all those opens are closed, and every other file passes through as
/// usual. Without a usable open-state file (none configured, missing, or
/// damaged), the resumed mount never uses passthrough, and a file that the
/// earlier process opened with passthrough and that is still open cannot be
/// opened again until it is closed.
pub fn resume(
    index: Arc<Index>,
    fetcher: Fetcher,
    mountpoint: &Path,
    fuse_device: OwnedFd,
    options: MountOptions,
) -> Result<MountHandle, LazyFsError> {
    let restored = options.open_state.as_deref().and_then(|path| {
        open_state::OpenStateFile::resume(path, index.inode_count())
            .inspect_err(|e| tracing::error!(path = %path.display(), error = %e, "no usable open-state file; the resumed mount answers every open without passthrough"))
            .ok()
    });
    let (state, opens, passthrough) = match restored {
        Some((state, opens)) => (Some(state), opens, options.passthrough),
        None => (None, Vec::new(), false),
    };
    tracing::info!(mountpoint = %mountpoint.display(), open_inodes = opens.len(), passthrough, "resuming a mount");
    let options = MountOptions {
        passthrough,
        ..options
    };
    let (fs, shared) = filesystem(index, fetcher, &options, state, opens)?;
    // File handles the earlier process gave out may still be in use: number ours
    // from a point they cannot have reached.
    let fs = fs.with_first_file_handle(resumed_file_handle_base());
    mount::resume_session(fs, shared, mountpoint, fuse_device, &options)
}

/// The filesystem for `index` and the state its mount handle shares with it;
/// open modes are kept in `state`, starting from the `restored` opens.
fn filesystem(
    index: Arc<Index>,
    fetcher: Fetcher,
    options: &MountOptions,
    state: Option<open_state::OpenStateFile>,
    restored: Vec<(stoker_format::InodeId, open_state::OpenRecord)>,
) -> Result<(fs::LazyFs, Arc<Shared>), LazyFsError> {
    let runtime = fetch_runtime()?;
    let metrics = Arc::new(metrics::Metrics::new());
    let assembler = match &options.assembly {
        Some(assembly) if options.passthrough => Some(
            assembly::Assembler::start(
                assembly,
                Arc::clone(&index),
                fetcher.cache().clone(),
                Arc::clone(&metrics),
            )
            .map_err(|source| LazyFsError::Assembly {
                dir: assembly.dir.clone(),
                source,
            })?,
        ),
        _ => None,
    };
    let shared = Arc::new(Shared {
        metrics,
        trace: trace::AccessTrace::new(index.chunk_count()),
        passthrough: passthrough::Passthrough::new(assembler, state, restored),
    });
    if let Some(sender) = options.access_trace.clone() {
        shared.trace.start(sender);
    }
    let reader = read::Reader::new(
        Arc::clone(&index),
        Arc::clone(&shared),
        fetcher,
        runtime,
        options.readahead_bytes,
        options.miss_readahead_bytes,
    );
    let fs = fs::LazyFs::new(
        index,
        reader,
        Arc::clone(&shared),
        options.attr_timeout,
        options.passthrough,
        options.default_permissions,
    );
    Ok((fs, shared))
}

/// The first file handle of a resumed session: nanoseconds since the epoch.
/// An earlier session started at 1, or at its own (earlier) resume time, and
/// handed out at most one handle per open, so it cannot have reached this.
fn resumed_file_handle_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1 << 62, |elapsed| {
            u64::try_from(elapsed.as_nanos()).unwrap_or(1 << 62)
        })
}

/// The runtime fetches run on: the caller's if it is multi-threaded (a
/// current-thread runtime cannot make progress while its only thread waits in a
/// file system call), otherwise one shared by the process.
fn fetch_runtime() -> Result<Handle, LazyFsError> {
    if let Ok(handle) = Handle::try_current()
        && handle.runtime_flavor() == RuntimeFlavor::MultiThread
    {
        return Ok(handle);
    }
    static SHARED: OnceLock<Result<Runtime, String>> = OnceLock::new();
    let shared = SHARED.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("stoker-lazyfs-fetch")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match shared {
        Ok(runtime) => Ok(runtime.handle().clone()),
        Err(e) => Err(LazyFsError::Runtime(std::io::Error::other(e.clone()))),
    }
}
